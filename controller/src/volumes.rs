//! CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ListVolumes,
//! ControllerGetVolume and GetCapacity.

use std::collections::HashMap;
use std::time::Duration;

use volumed_csi::access::{self, AccessSpec};
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::params::{QosSpec, VolumeKind, VolumeSpec};
use volumed_csi::proto::{self as csi};
use volumed_csi::{capacity, pagination, topology};
use volumed_proto::volumed::v1 as vd;

use crate::restore::{self, ContentSource};
use crate::service::{condition, csi_volume, publications, published_node_ids, stored_spec, ControllerService};

/// Longest name accepted (the spec's limit for strings).
const MAX_NAME_BYTES: usize = 128;

/// How long CreateVolume waits for the replicas to form before answering.
const CREATE_WAIT: Duration = Duration::from_secs(30);

pub(crate) fn validate_name(name: &str) -> Result<(), CsiError> {
    if name.is_empty() {
        return Err(CsiError::Missing("name"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(CsiError::InvalidArgument(format!("name is {} bytes, longer than {MAX_NAME_BYTES}", name.len())));
    }
    let banned = |c: char| {
        let u = c as u32;
        u <= 0x08 || u == 0x0b || u == 0x0c || (0x0e..=0x1f).contains(&u) || (0x7f..=0x9f).contains(&u)
    };
    if name.chars().any(banned) {
        return Err(CsiError::InvalidArgument(format!("name {name:?} contains control characters")));
    }
    Ok(())
}

/// Checks every capability against the volume kind and fsType.
fn check_capabilities(specs: &[AccessSpec], spec: &VolumeSpec) -> Result<(), String> {
    for (i, c) in specs.iter().enumerate() {
        access::check_supported(c, spec.kind).map_err(|e| format!("volume_capabilities[{i}]: {e}"))?;
        if !c.is_block() {
            access::effective_fs_type(c, spec.fs_type).map_err(|e| format!("volume_capabilities[{i}]: {e}"))?;
        }
    }
    Ok(())
}

fn to_vd_topology(t: &[csi::Topology]) -> Vec<vd::Topology> {
    t.iter().map(|t| vd::Topology { segments: t.segments.clone() }).collect()
}

/// The largest volume size that fits on `r` distinct nodes, and the total
/// size of such volumes that fits, for nodes with `free` bytes each.
pub fn provisionable(free: &[u64], r: usize) -> (u64, u64) {
    if r == 0 || free.len() < r {
        return (0, 0);
    }
    let mut sorted = free.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let max_volume = capacity::round_down(sorted[r - 1]);
    // The largest total T with sum(min(free_i, T)) >= r*T: a node can hold
    // at most one replica of each volume, so no more than T of its space
    // counts. The predicate holds on [0, T], so bisect.
    let sum: u128 = free.iter().map(|&f| f as u128).sum();
    let (mut lo, mut hi) = (0u128, sum / r as u128);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let usable: u128 = free.iter().map(|&f| (f as u128).min(mid)).sum();
        if usable >= mid * r as u128 {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let total = u64::try_from(lo).unwrap_or(u64::MAX);
    (capacity::round_down(total), max_volume)
}

impl ControllerService {
    /// `budget`: how long a restore or clone may be waited for (see
    /// [`crate::restore`]).
    pub(crate) async fn create(
        &self,
        req: csi::CreateVolumeRequest,
        budget: Duration,
    ) -> Result<csi::CreateVolumeResponse, CsiError> {
        validate_name(&req.name)?;
        let name = req.name.as_str();
        let caps = access::parse_capabilities(&req.volume_capabilities)?;
        let mut spec = VolumeSpec::from_parameters(&req.parameters)?;
        if !req.mutable_parameters.is_empty() {
            QosSpec::from_mutable(&req.mutable_parameters)
                .map_err(|e| CsiError::InvalidArgument(format!("mutable_parameters: {e}")))?
                .apply(&mut spec.qos);
        }
        check_capabilities(&caps, &spec).map_err(CsiError::InvalidArgument)?;
        let source = ContentSource::parse(req.volume_content_source.as_ref())?;
        if source.is_some() && spec.kind != VolumeKind::Block {
            return Err(CsiError::InvalidArgument(
                "volume_content_source: only block volumes are restored from snapshots or cloned".into(),
            ));
        }
        let size = capacity::resolve(req.capacity_range.as_ref(), capacity::DEFAULT_SIZE)?;
        let ctx = format!("volume named \"{name}\"");

        // Idempotency: the same name must give the same volume.
        if let Some(existing) = self.volume_by_name(name).await? {
            return self.existing_for_create(existing, &req, &spec, source.as_ref(), budget).await;
        }

        let (requisite, preferred) = req
            .accessibility_requirements
            .as_ref()
            .map(|t| (to_vd_topology(&t.requisite), to_vd_topology(&t.preferred)))
            .unwrap_or_default();
        let size = match &source {
            Some(src) => restore::size_for(req.capacity_range.as_ref(), self.source_size(src).await?)?,
            None => size,
        };
        let vreq = vd::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            replica_count: spec.replicas,
            kind: match spec.kind {
                VolumeKind::Block => vd::VolumeKind::Block as i32,
                VolumeKind::File => vd::VolumeKind::File as i32,
            },
            parameters: spec.to_parameters(),
            requisite,
            preferred,
            spread_zones: spec.zone_spread,
            ..ContentSource::request_fields(source.as_ref())
        };
        let created = self
            .volumed
            .call("CreateVolume", |mut c| {
                let r = vreq.clone();
                async move { c.create_volume(r).await }
            })
            .await;
        let volume = match created {
            Ok(v) => v,
            // A concurrent call created it first.
            Err(s) if s.code() == tonic::Code::AlreadyExists => match self.volume_by_name(name).await? {
                Some(existing) => {
                    return self.existing_for_create(existing, &req, &spec, source.as_ref(), budget).await
                }
                None => return Err(from_volumed(s, ctx)),
            },
            Err(s) => return Err(from_volumed(s, ctx)),
        };
        let volume = match &source {
            Some(_) => self.wait_restored(volume, budget).await?,
            None => self.wait_formed(volume).await?,
        };
        let nodes = self.nodes().await?;
        tracing::info!(volume_id = %volume.id, size, replicas = spec.replicas, "volume created");
        let mut out = csi_volume(&volume, &nodes);
        out.content_source = source.map(|s| s.to_csi());
        Ok(csi::CreateVolumeResponse { volume: Some(out) })
    }

    /// Answers a CreateVolume whose name is taken: the same volume when
    /// compatible, ALREADY_EXISTS naming the difference otherwise.
    async fn existing_for_create(
        &self,
        existing: vd::Volume,
        req: &csi::CreateVolumeRequest,
        wanted: &VolumeSpec,
        source: Option<&ContentSource>,
        budget: Duration,
    ) -> Result<csi::CreateVolumeResponse, CsiError> {
        let name = &req.name;
        if vd::VolumeState::try_from(existing.state) == Ok(vd::VolumeState::Deleting) {
            return Err(CsiError::Aborted(format!(
                "volume named \"{name}\" ({}) is being deleted; retry",
                existing.id
            )));
        }
        if !capacity::satisfies(existing.size_bytes, req.capacity_range.as_ref()) {
            return Err(CsiError::AlreadyExists(format!(
                "volume named \"{name}\" ({}) exists with {} bytes, outside the requested capacity range",
                existing.id, existing.size_bytes
            )));
        }
        if let Some(diff) = stored_spec(&existing).conflict_with(wanted) {
            return Err(CsiError::AlreadyExists(format!(
                "volume named \"{name}\" ({}) exists with different parameters: {diff}",
                existing.id
            )));
        }
        let existing = match source {
            Some(src) => {
                let confirmed = self.confirm_source(&existing, src).await?;
                self.wait_restored(confirmed, budget).await?
            }
            None if !existing.source_snapshot_id.is_empty() => {
                return Err(CsiError::AlreadyExists(format!(
                    "volume named \"{name}\" ({}) exists with data from a snapshot or volume; this request has \
                     no volume_content_source",
                    existing.id
                )))
            }
            None => self.wait_formed(existing).await?,
        };
        let nodes = self.nodes().await?;
        let mut out = csi_volume(&existing, &nodes);
        out.content_source = source.map(ContentSource::to_csi);
        Ok(csi::CreateVolumeResponse { volume: Some(out) })
    }

    /// Waits (bounded) while the replicas form, so the placement - and the
    /// accessible topology derived from it - is known.
    async fn wait_formed(&self, mut v: vd::Volume) -> Result<vd::Volume, CsiError> {
        let deadline = tokio::time::Instant::now() + CREATE_WAIT;
        while vd::VolumeState::try_from(v.state) == Ok(vd::VolumeState::Creating)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match self.volume_by_id(&v.id).await? {
                Some(now) => v = now,
                None => {
                    return Err(CsiError::Aborted(format!("volume {} disappeared while being created; retry", v.id)))
                }
            }
        }
        Ok(v)
    }

    pub(crate) async fn delete(&self, req: csi::DeleteVolumeRequest) -> Result<csi::DeleteVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let id = req.volume_id.as_str();
        // Unknown or malformed ids are already deleted, as the spec wants.
        let Some(v) = self.volume_by_id(id).await? else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        if publications(&v).next().is_some() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is still published to node(s) {}; unpublish it first",
                published_node_ids(&v).join(", ")
            )));
        }
        let res = self
            .volumed
            .call("DeleteVolume", |mut c| {
                let r = vd::DeleteVolumeRequest { id_or_name: id.to_string() };
                async move { c.delete_volume(r).await }
            })
            .await;
        match res {
            Ok(_) => Ok(csi::DeleteVolumeResponse {}),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(csi::DeleteVolumeResponse {}),
            Err(s) => Err(from_volumed(s, format!("volume {id}"))),
        }
    }

    pub(crate) async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let caps = access::parse_capabilities(&req.volume_capabilities)?;
        let wanted = if req.parameters.is_empty() { None } else { Some(VolumeSpec::from_parameters(&req.parameters)?) };
        if !req.mutable_parameters.is_empty() {
            QosSpec::from_mutable(&req.mutable_parameters)
                .map_err(|e| CsiError::InvalidArgument(format!("mutable_parameters: {e}")))?;
        }
        let v = self.existing_volume(&req.volume_id).await?;
        let spec = stored_spec(&v);
        let not_confirmed = |message: String| csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message };
        if let Some(diff) = wanted.as_ref().and_then(|w| spec.conflict_with(w)) {
            return Ok(not_confirmed(format!("parameters do not match volume {}: {diff}", v.id)));
        }
        if let Err(e) = check_capabilities(&caps, &spec) {
            return Ok(not_confirmed(format!("volume {}: {e}", v.id)));
        }
        let ours = volumed_csi::params::NodeContext::to_context(&spec, &v.name);
        for (k, val) in &req.volume_context {
            if let Some(mine) = ours.get(k) {
                if mine != val {
                    return Ok(not_confirmed(format!(
                        "volume_context {k}={val} does not match volume {} ({k}={mine})",
                        v.id
                    )));
                }
            }
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    pub(crate) async fn list(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse, CsiError> {
        // Check the request before asking volumed anything.
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument(format!("max_entries is negative ({})", req.max_entries)));
        }
        if !req.starting_token.is_empty() {
            pagination::decode(&req.starting_token)?;
        }
        let volumes = self.all_volumes().await?;
        let nodes = self.nodes().await?;
        let (page, next_token) =
            pagination::paginate(volumes, |v| v.id.as_str(), req.max_entries, &req.starting_token)?;
        let entries = page
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(csi_volume(v, &nodes)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: published_node_ids(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(csi::ListVolumesResponse { entries, next_token })
    }

    pub(crate) async fn get(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let v = self.existing_volume(&req.volume_id).await?;
        let nodes = self.nodes().await?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, &nodes)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_node_ids(&v),
                volume_condition: Some(condition(&v)),
            }),
        })
    }

    pub(crate) async fn capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse, CsiError> {
        let spec = VolumeSpec::from_parameters(&req.parameters)?;
        // Optional here, unlike in CreateVolume.
        let caps: Vec<AccessSpec> = if req.volume_capabilities.is_empty() {
            Vec::new()
        } else {
            access::parse_capabilities(&req.volume_capabilities)?
        };
        let unit = Some(capacity::to_i64(capacity::ALLOCATION_UNIT));
        if check_capabilities(&caps, &spec).is_err() {
            // Nothing can be provisioned with these capabilities.
            return Ok(csi::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: unit,
            });
        }
        let segments: HashMap<String, String> = req.accessible_topology.map(|t| t.segments).unwrap_or_default();
        let nodes = self.nodes().await?;
        let eligible: Vec<&vd::Node> = nodes
            .iter()
            .filter(|n| vd::NodeState::try_from(n.state) == Ok(vd::NodeState::Up))
            .filter(|n| topology::matches(&n.labels, &segments))
            .collect();
        let free: Vec<u64> = if spec.zone_spread {
            // One replica per zone: a zone offers the space of its roomiest node.
            let mut per_zone: HashMap<&str, u64> = HashMap::new();
            for n in &eligible {
                if let Some(z) = n.labels.get(topology::ZONE_KEY) {
                    let e = per_zone.entry(z.as_str()).or_default();
                    *e = (*e).max(n.free_bytes);
                }
            }
            per_zone.into_values().collect()
        } else {
            eligible.iter().map(|n| n.free_bytes).collect()
        };
        let (available, max_volume) = provisionable(&free, spec.replicas as usize);
        let max_volume = max_volume.min(capacity::MAX_SIZE);
        Ok(csi::GetCapacityResponse {
            available_capacity: capacity::to_i64(available),
            maximum_volume_size: Some(capacity::to_i64(max_volume)),
            minimum_volume_size: unit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn names() {
        assert!(validate_name("pvc-1234").is_ok());
        assert!(validate_name("with space and ünïcode").is_ok());
        assert_eq!(validate_name("").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(validate_name(&"n".repeat(129)).is_err());
        assert!(validate_name("bad\u{7}bell").is_err());
        assert!(validate_name("tab\tok").is_ok());
    }

    #[test]
    fn capacity_math() {
        // Three equal nodes, three replicas: each volume takes one replica per node.
        assert_eq!(provisionable(&[10 * GIB, 10 * GIB, 10 * GIB], 3), (10 * GIB, 10 * GIB));
        // One huge node cannot hold two replicas of a volume.
        assert_eq!(provisionable(&[100 * GIB, 10 * GIB, 10 * GIB], 3), (10 * GIB, 10 * GIB));
        // Four nodes, three replicas: 4*9/3 = 12 GiB total, 9 GiB at most each.
        let (total, max) = provisionable(&[9 * GIB, 9 * GIB, 9 * GIB, 9 * GIB], 3);
        assert_eq!(max, 9 * GIB);
        assert_eq!(total, 12 * GIB);
        // Too few nodes.
        assert_eq!(provisionable(&[GIB, GIB], 3), (0, 0));
        assert_eq!(provisionable(&[GIB], 1), (GIB, GIB));
        // Rounded down to the allocation unit.
        let (t, m) = provisionable(&[GIB + 5, GIB + 5], 2);
        assert_eq!((t, m), (GIB, GIB));
    }
}
