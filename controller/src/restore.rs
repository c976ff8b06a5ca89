//! CreateVolume with a content source: restore from a snapshot, or clone a
//! volume.
//!
//! volumed creates the new volume at once (an ordinary group, placed
//! anywhere) and copies the source's data into it in the background; the
//! volume refuses I/O until the copy is done, and reports its progress. So
//! CreateVolume answers only once the copy finished: until then it says
//! ABORTED ("operation pending", with the progress), which the
//! external-provisioner retries with back-off; the retry finds the same
//! volume by name and waits again. Each wait ends before the caller's
//! deadline, so the CO always gets an answer.

use std::time::Duration;

use volumed_csi::capacity::{self, ALLOCATION_UNIT};
use volumed_csi::deadline;
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
use volumed_csi::proto::{self as csi};
use volumed_proto::volumed::v1 as vd;

use crate::service::ControllerService;

/// How long CreateVolume waits for a copy when the caller set no deadline.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Time kept to answer before the caller's deadline.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);
const MIN_WAIT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(250);

/// How long this call may wait for a restore, from its gRPC deadline.
pub(crate) fn wait_budget(meta: &tonic::metadata::MetadataMap) -> Duration {
    deadline::budget(meta, DEFAULT_WAIT, ANSWER_MARGIN, MIN_WAIT)
}

/// `volume_content_source` of a CreateVolume, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ContentSource {
    Snapshot(String),
    Volume(String),
}

impl ContentSource {
    pub(crate) fn parse(source: Option<&csi::VolumeContentSource>) -> Result<Option<ContentSource>, CsiError> {
        let Some(source) = source else { return Ok(None) };
        match &source.r#type {
            None => {
                Err(CsiError::InvalidArgument("volume_content_source names neither a snapshot nor a volume".into()))
            }
            Some(Type::Snapshot(s)) if s.snapshot_id.is_empty() => {
                Err(CsiError::Missing("volume_content_source.snapshot.snapshot_id"))
            }
            Some(Type::Snapshot(s)) => Ok(Some(ContentSource::Snapshot(s.snapshot_id.clone()))),
            Some(Type::Volume(v)) if v.volume_id.is_empty() => {
                Err(CsiError::Missing("volume_content_source.volume.volume_id"))
            }
            Some(Type::Volume(v)) => Ok(Some(ContentSource::Volume(v.volume_id.clone()))),
        }
    }

    pub(crate) fn to_csi(&self) -> csi::VolumeContentSource {
        csi::VolumeContentSource {
            r#type: Some(match self {
                ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
                ContentSource::Volume(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
            }),
        }
    }

    /// The source fields of volumed's CreateVolumeRequest (the rest
    /// default). `no_wait`: volumed answers once the volume exists, and this
    /// plugin watches the copy itself, within the CO's deadline.
    pub(crate) fn request_fields(source: Option<&ContentSource>) -> vd::CreateVolumeRequest {
        match source {
            None => vd::CreateVolumeRequest::default(),
            Some(ContentSource::Snapshot(id)) => {
                vd::CreateVolumeRequest { source_snapshot: id.clone(), no_wait: true, ..Default::default() }
            }
            Some(ContentSource::Volume(id)) => {
                vd::CreateVolumeRequest { source_volume: id.clone(), no_wait: true, ..Default::default() }
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            ContentSource::Snapshot(id) => format!("snapshot {id}"),
            ContentSource::Volume(id) => format!("volume {id}"),
        }
    }
}

/// The size of a volume made from a source of `min` bytes. A request that
/// names a size smaller than its source is OUT_OF_RANGE (the spec's own
/// example); without a required size the volume gets the source's size.
pub(crate) fn size_for(range: Option<&csi::CapacityRange>, min: u64) -> Result<u64, CsiError> {
    // Validates the range (negative fields, limit below required, too large).
    capacity::resolve(range, min.max(ALLOCATION_UNIT))?;
    let (required, limit) = range
        .map(|r| (u64::try_from(r.required_bytes).unwrap_or(0), u64::try_from(r.limit_bytes).unwrap_or(0)))
        .unwrap_or((0, 0));
    if limit > 0 && limit < min {
        return Err(CsiError::OutOfRange(format!(
            "capacity_range.limit_bytes ({limit}) is smaller than the content source ({min} bytes); a restored or \
             cloned volume is at least as large as its source"
        )));
    }
    if required == 0 {
        return Ok(min);
    }
    let size = capacity::round_up(required.max(ALLOCATION_UNIT))
        .ok_or_else(|| CsiError::OutOfRange(format!("{required} bytes is too large")))?;
    if size < min {
        return Err(CsiError::OutOfRange(format!(
            "capacity_range.required_bytes ({required}) is smaller than the content source ({min} bytes); ask for \
             at least that"
        )));
    }
    Ok(size)
}

/// Progress of a restore, for messages.
fn progress(v: &vd::Volume) -> String {
    match v.restore_bytes_done.saturating_mul(100).checked_div(v.restore_bytes_total) {
        Some(pct) => format!("{} of {} bytes copied, {pct}%", v.restore_bytes_done, v.restore_bytes_total),
        None => "copy starting".into(),
    }
}

impl ControllerService {
    /// Size of the source: what the new volume needs at least. NOT_FOUND
    /// when the source does not exist.
    pub(crate) async fn source_size(&self, source: &ContentSource) -> Result<u64, CsiError> {
        match source {
            ContentSource::Snapshot(id) => {
                let s = self.snapshot_by_id(id).await?.ok_or_else(|| {
                    CsiError::NotFound(format!("volume_content_source: snapshot {id} does not exist"))
                })?;
                if !s.ready_to_use {
                    return Err(CsiError::Unavailable(format!(
                        "volume_content_source: snapshot {id} is not cut yet; retry"
                    )));
                }
                Ok(s.restore_size_bytes)
            }
            ContentSource::Volume(id) => {
                let v = self
                    .volume_by_id(id)
                    .await?
                    .ok_or_else(|| CsiError::NotFound(format!("volume_content_source: volume {id} does not exist")))?;
                Ok(v.size_bytes)
            }
        }
    }

    /// A volume named like the request exists (its spec already checked):
    /// volumed confirms it was made from the same source (ALREADY_EXISTS
    /// otherwise) and answers with it. The request repeats the volume's own
    /// spec, so only the source can differ.
    pub(crate) async fn confirm_source(
        &self,
        existing: &vd::Volume,
        source: &ContentSource,
    ) -> Result<vd::Volume, CsiError> {
        let vreq = vd::CreateVolumeRequest {
            name: existing.name.clone(),
            size_bytes: existing.size_bytes,
            replica_count: existing.replica_count,
            kind: existing.kind,
            parameters: existing.parameters.clone(),
            ..ContentSource::request_fields(Some(source))
        };
        self.volumed
            .call("CreateVolume", |mut c| {
                let r = vreq.clone();
                async move { c.create_volume(r).await }
            })
            .await
            .map_err(|s| from_volumed(s, format!("volume named \"{}\" from {}", existing.name, source.describe())))
    }

    /// Waits (within `budget`) until the copy into `v` is done; ABORTED with
    /// the progress when it is not, so the CO retries.
    pub(crate) async fn wait_restored(&self, mut v: vd::Volume, budget: Duration) -> Result<vd::Volume, CsiError> {
        let deadline = tokio::time::Instant::now() + budget;
        while vd::VolumeState::try_from(v.state) == Ok(vd::VolumeState::Creating) {
            if tokio::time::Instant::now() + POLL > deadline {
                return Err(CsiError::Aborted(format!(
                    "volume {} (\"{}\") is still being filled from its content source ({}); the copy goes on, \
                     retry the same request",
                    v.id,
                    v.name,
                    progress(&v)
                )));
            }
            tokio::time::sleep(POLL).await;
            v = self.volume_by_id(&v.id).await?.ok_or_else(|| {
                CsiError::Aborted(format!("volume {} disappeared while it was being filled; retry", v.id))
            })?;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn range(req: i64, lim: i64) -> csi::CapacityRange {
        csi::CapacityRange { required_bytes: req, limit_bytes: lim }
    }

    #[test]
    fn parse_sources() {
        assert_eq!(ContentSource::parse(None).unwrap(), None);
        let snap = ContentSource::Snapshot("s1".into());
        assert_eq!(ContentSource::parse(Some(&snap.to_csi())).unwrap(), Some(snap));
        let vol = ContentSource::Volume("v1".into());
        assert_eq!(ContentSource::parse(Some(&vol.to_csi())).unwrap(), Some(vol));
        let e = ContentSource::parse(Some(&csi::VolumeContentSource { r#type: None })).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = ContentSource::parse(Some(&ContentSource::Snapshot(String::new()).to_csi())).unwrap_err();
        assert_eq!(e, CsiError::Missing("volume_content_source.snapshot.snapshot_id"));
        let e = ContentSource::parse(Some(&ContentSource::Volume(String::new()).to_csi())).unwrap_err();
        assert_eq!(e, CsiError::Missing("volume_content_source.volume.volume_id"));
    }

    #[test]
    fn request_fields_name_the_source_and_do_not_wait() {
        let r = ContentSource::request_fields(Some(&ContentSource::Snapshot("s".into())));
        assert_eq!((r.source_snapshot.as_str(), r.source_volume.as_str(), r.no_wait), ("s", "", true));
        let r = ContentSource::request_fields(Some(&ContentSource::Volume("v".into())));
        assert_eq!((r.source_snapshot.as_str(), r.source_volume.as_str(), r.no_wait), ("", "v", true));
        assert_eq!(ContentSource::request_fields(None), vd::CreateVolumeRequest::default());
    }

    #[test]
    fn sizes_from_a_source() {
        let src = 64 * MIB;
        assert_eq!(size_for(None, src).unwrap(), src, "no range: the source's size");
        assert_eq!(size_for(Some(&range(0, 0)), src).unwrap(), src);
        assert_eq!(size_for(Some(&range(64 * MIB as i64, 0)), src).unwrap(), src);
        assert_eq!(size_for(Some(&range(100 * MIB as i64 + 1, 0)), src).unwrap(), 101 * MIB, "larger, rounded up");
        assert_eq!(size_for(Some(&range(0, 128 * MIB as i64)), src).unwrap(), src);
        // A source that is not a whole MiB (made by volctl) restores at its size.
        assert_eq!(size_for(None, src + 4096).unwrap(), src + 4096);
        for (req, lim) in [(32 * MIB as i64, 0), (0, 32 * MIB as i64), (1, 0)] {
            let e = size_for(Some(&range(req, lim)), src).unwrap_err();
            assert_eq!(e.code(), tonic::Code::OutOfRange, "{req} {lim}: {e}");
        }
        assert_eq!(size_for(Some(&range(-1, 0)), src).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn progress_text() {
        let v = vd::Volume { restore_bytes_done: 1 << 20, restore_bytes_total: 4 << 20, ..Default::default() };
        assert_eq!(progress(&v), "1048576 of 4194304 bytes copied, 25%");
        assert_eq!(progress(&vd::Volume::default()), "copy starting");
    }
}
