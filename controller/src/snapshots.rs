//! CreateSnapshot, DeleteSnapshot, ListSnapshots and GetSnapshot.
//!
//! A CSI snapshot id is volumed's snapshot uuid, as a volume id is the
//! volume's uuid; ids of any other shape name nothing (names are never
//! looked up, so a malformed id cannot match a snapshot named like it).
//! volumed cuts a snapshot as one command in the volume's Raft log, so
//! CreateSnapshot returns once the cut is applied and the snapshot is
//! ready to restore from. With `freeze` (the default) the filesystems
//! mounted from the volume are frozen around the cut (see
//! [`crate::freeze`]).

use prost_types::Timestamp;
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::proto::{self as csi};
use volumed_csi::snapshot_params::SnapshotParams;
use volumed_csi::{capacity, pagination};
use volumed_proto::volumed::v1 as vd;

use crate::service::{is_volume_id, ControllerService};
use crate::volumes::validate_name;

/// `created_at_unix_ms` as a protobuf timestamp.
pub(crate) fn timestamp(unix_ms: i64) -> Timestamp {
    Timestamp { seconds: unix_ms.div_euclid(1000), nanos: (unix_ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// volumed's snapshot as CSI reports it. `size_bytes` is the restore size
/// (the source volume's size at the cut): the spec defines it as the
/// space a volume made from the snapshot needs.
pub(crate) fn csi_snapshot(s: &vd::Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: capacity::to_i64(s.restore_size_bytes),
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(timestamp(s.created_at_unix_ms)),
        ready_to_use: s.ready_to_use,
        group_snapshot_id: s.group_snapshot_id.clone(),
    }
}

impl ControllerService {
    /// The snapshot with this id, `None` when volumed does not know it.
    pub(crate) async fn snapshot_by_id(&self, id: &str) -> Result<Option<vd::Snapshot>, CsiError> {
        if !is_volume_id(id) {
            return Ok(None);
        }
        let res = self
            .volumed
            .call("GetSnapshot", |mut c| {
                let req = vd::GetSnapshotRequest { id_or_name: id.to_string() };
                async move { c.get_snapshot(req).await }
            })
            .await;
        match res {
            Ok(s) if s.id == id => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(from_volumed(s, format!("snapshot {id}"))),
        }
    }

    /// The snapshot named `name`, `None` when there is none.
    async fn snapshot_by_name(&self, name: &str) -> Result<Option<vd::Snapshot>, CsiError> {
        let res = self
            .volumed
            .call("GetSnapshot", |mut c| {
                let req = vd::GetSnapshotRequest { id_or_name: name.to_string() };
                async move { c.get_snapshot(req).await }
            })
            .await;
        match res {
            Ok(s) if s.name == name => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound || s.code() == tonic::Code::InvalidArgument => Ok(None),
            Err(s) => Err(from_volumed(s, format!("snapshot named \"{name}\""))),
        }
    }

    /// Every snapshot volumed lists (of `source_volume` when not empty).
    async fn all_snapshots(&self, source_volume: &str) -> Result<Vec<vd::Snapshot>, CsiError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .volumed
                .call("ListSnapshots", |mut c| {
                    let req = vd::ListSnapshotsRequest {
                        source_volume: source_volume.to_string(),
                        starting_token: token.clone(),
                        ..Default::default()
                    };
                    async move { c.list_snapshots(req).await }
                })
                .await
                .map_err(|s| from_volumed(s, "listing volumed snapshots"))?;
            out.extend(page.snapshots);
            // A server repeating its token would loop forever.
            if page.next_token.is_empty() || page.next_token == token {
                return Ok(out);
            }
            token = page.next_token;
        }
    }

    pub(crate) async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse, CsiError> {
        if req.source_volume_id.is_empty() {
            return Err(CsiError::Missing("source_volume_id"));
        }
        validate_name(&req.name)?;
        let params = SnapshotParams::from_parameters(&req.parameters)?;
        let (name, volume) = (req.name.as_str(), req.source_volume_id.as_str());
        if !is_volume_id(volume) {
            return Err(CsiError::NotFound(format!("source volume {volume} does not exist")));
        }
        // A retry of a snapshot already cut needs no freeze.
        if let Some(s) = self.snapshot_by_name(name).await? {
            if s.ready_to_use && s.source_volume_id == volume {
                return Ok(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&s)) });
            }
        }
        let frozen = if params.freeze { self.freeze(&[volume]).await? } else { Vec::new() };
        let vreq = vd::CreateSnapshotRequest { name: name.to_string(), source_volume: volume.to_string() };
        let res = self
            .volumed
            .call("CreateSnapshot", |mut c| {
                let r = vreq.clone();
                async move { c.create_snapshot(r).await }
            })
            .await;
        self.thaw(frozen).await;
        let s = res.map_err(|s| from_volumed(s, format!("snapshot named \"{name}\" of volume {volume}")))?;
        if s.source_volume_id != volume {
            return Err(CsiError::AlreadyExists(format!(
                "snapshot named \"{name}\" ({}) exists for volume {}, not {volume}",
                s.id, s.source_volume_id
            )));
        }
        if !s.ready_to_use {
            // volumed answers once the cut is applied; a snapshot that is
            // still not cut is another call's work in progress.
            return Err(CsiError::Aborted(format!(
                "snapshot named \"{name}\" ({}) of volume {volume} is being cut by another call; retry",
                s.id
            )));
        }
        tracing::info!(snapshot_id = %s.id, log_index = s.log_index, "snapshot cut");
        Ok(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&s)) })
    }

    pub(crate) async fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse, CsiError> {
        if req.snapshot_id.is_empty() {
            return Err(CsiError::Missing("snapshot_id"));
        }
        let id = req.snapshot_id.as_str();
        // Unknown or malformed ids are already deleted, as the spec wants.
        let Some(s) = self.snapshot_by_id(id).await? else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        if !s.group_snapshot_id.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "snapshot {id} is part of group snapshot {} and cannot be deleted alone; delete the group \
                 snapshot (DeleteVolumeGroupSnapshot)",
                s.group_snapshot_id
            )));
        }
        let res = self
            .volumed
            .call("DeleteSnapshot", |mut c| {
                let r = vd::DeleteSnapshotRequest { id_or_name: id.to_string() };
                async move { c.delete_snapshot(r).await }
            })
            .await;
        match res {
            Ok(_) => Ok(csi::DeleteSnapshotResponse {}),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(csi::DeleteSnapshotResponse {}),
            Err(s) => Err(from_volumed(s, format!("snapshot {id}"))),
        }
    }

    pub(crate) async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, CsiError> {
        // Check the request before asking volumed anything.
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument(format!("max_entries is negative ({})", req.max_entries)));
        }
        if !req.starting_token.is_empty() {
            pagination::decode(&req.starting_token)?;
        }
        let (only, source) = (req.snapshot_id.as_str(), req.source_volume_id.as_str());
        // An id that names nothing lists nothing (not an error, per spec).
        let found: Vec<vd::Snapshot> = if !only.is_empty() {
            self.snapshot_by_id(only).await?.into_iter().collect()
        } else if !source.is_empty() && !is_volume_id(source) {
            Vec::new()
        } else {
            self.all_snapshots(source).await?
        };
        // Snapshots not cut yet are not listed (spec).
        let snapshots: Vec<vd::Snapshot> = found
            .into_iter()
            .filter(|s| s.ready_to_use)
            .filter(|s| source.is_empty() || s.source_volume_id == source)
            .collect();
        let (page, next_token) =
            pagination::paginate(snapshots, |s| s.id.as_str(), req.max_entries, &req.starting_token)?;
        Ok(csi::ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(csi_snapshot(s)) })
                .collect(),
            next_token,
        })
    }

    pub(crate) async fn get_snapshot(
        &self,
        req: csi::GetSnapshotRequest,
    ) -> Result<csi::GetSnapshotResponse, CsiError> {
        if req.snapshot_id.is_empty() {
            return Err(CsiError::Missing("snapshot_id"));
        }
        let s = self
            .snapshot_by_id(&req.snapshot_id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("snapshot {} does not exist", req.snapshot_id)))?;
        Ok(csi::GetSnapshotResponse { snapshot: Some(csi_snapshot(&s)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_milliseconds() {
        assert_eq!(timestamp(1_700_000_123_456), Timestamp { seconds: 1_700_000_123, nanos: 456_000_000 });
        assert_eq!(timestamp(0), Timestamp { seconds: 0, nanos: 0 });
        // Before the epoch the nanos stay positive, as protobuf requires.
        assert_eq!(timestamp(-1), Timestamp { seconds: -1, nanos: 999_000_000 });
    }

    #[test]
    fn csi_view_reports_the_restore_size() {
        let s = vd::Snapshot {
            id: "0b7f6c1e-3f2a-4c1d-9e8f-0123456789ab".into(),
            source_volume_id: "1b7f6c1e-3f2a-4c1d-9e8f-0123456789ab".into(),
            created_at_unix_ms: 2_000,
            ready_to_use: true,
            restore_size_bytes: 64 << 20,
            total_bytes: 4096,
            exclusive_bytes: 0,
            group_snapshot_id: "g".into(),
            ..Default::default()
        };
        let c = csi_snapshot(&s);
        assert_eq!(c.size_bytes, 64 << 20);
        assert_eq!(c.snapshot_id, s.id);
        assert_eq!(c.source_volume_id, s.source_volume_id);
        assert_eq!(c.creation_time, Some(Timestamp { seconds: 2, nanos: 0 }));
        assert!(c.ready_to_use);
        assert_eq!(c.group_snapshot_id, "g");
    }
}
