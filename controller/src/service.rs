//! The CSI Controller service. Stateless: every answer comes from volumed.
//!
//! The RPC bodies live in [`crate::volumes`] (create/delete/validate/list/
//! get/capacity), [`crate::restore`] (content sources of CreateVolume),
//! [`crate::attach`] (publish/unpublish), [`crate::resize`] (expand/modify)
//! and [`crate::snapshots`]; this module holds the shared lookups and
//! conversions and dispatches the trait methods. The GroupController
//! service is in [`crate::groups`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::logging::observe;
use volumed_csi::params::{FsType, NodeContext, VolumeKind, VolumeSpec, FS_TYPE};
use volumed_csi::proto::controller_server::Controller;
use volumed_csi::proto::{self as csi};
use volumed_csi::{capacity, topology};
use volumed_proto::volumed::v1 as vd;

use crate::volumed::Volumed;

pub struct ControllerService {
    pub(crate) volumed: Arc<Volumed>,
}

impl ControllerService {
    pub fn new(volumed: Arc<Volumed>) -> ControllerService {
        ControllerService { volumed }
    }

    /// The volume with this id, `None` when volumed does not know it. Names
    /// are never looked up here: a CSI volume id is volumed's uuid, and a
    /// malformed id must not match a volume that happens to be named so.
    pub(crate) async fn volume_by_id(&self, id: &str) -> Result<Option<vd::Volume>, CsiError> {
        if !is_volume_id(id) {
            return Ok(None);
        }
        let res = self
            .volumed
            .call("GetVolume", |mut c| {
                let req = vd::GetVolumeRequest { id_or_name: id.to_string() };
                async move { c.get_volume(req).await }
            })
            .await;
        match res {
            Ok(v) if v.id == id => Ok(Some(v)),
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(from_volumed(s, format!("volume {id}"))),
        }
    }

    pub(crate) async fn volume_by_name(&self, name: &str) -> Result<Option<vd::Volume>, CsiError> {
        let res = self
            .volumed
            .call("GetVolume", |mut c| {
                let req = vd::GetVolumeRequest { id_or_name: name.to_string() };
                async move { c.get_volume(req).await }
            })
            .await;
        match res {
            Ok(v) if v.name == name => Ok(Some(v)),
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(from_volumed(s, format!("volume named \"{name}\""))),
        }
    }

    /// A volume the request names; NOT_FOUND when there is none.
    pub(crate) async fn existing_volume(&self, id: &str) -> Result<vd::Volume, CsiError> {
        self.volume_by_id(id).await?.ok_or_else(|| CsiError::NotFound(format!("volume {id} does not exist")))
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<vd::Node>, CsiError> {
        self.volumed
            .call("ListNodes", |mut c| async move { c.list_nodes(vd::ListNodesRequest {}).await })
            .await
            .map(|r| r.nodes)
            .map_err(|s| from_volumed(s, "listing volumed nodes"))
    }

    pub(crate) async fn all_volumes(&self) -> Result<Vec<vd::Volume>, CsiError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .volumed
                .call("ListVolumes", |mut c| {
                    let req =
                        vd::ListVolumesRequest { max_entries: 0, starting_token: token.clone(), ..Default::default() };
                    async move { c.list_volumes(req).await }
                })
                .await
                .map_err(|s| from_volumed(s, "listing volumed volumes"))?;
            out.extend(page.volumes);
            if page.next_token.is_empty() || page.next_token == token {
                return Ok(out);
            }
            token = page.next_token;
        }
    }
}

/// volumed volume ids are uuids (8-4-4-4-12 hex digits).
pub fn is_volume_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// CSI node ids are volumed node ids in decimal.
pub fn parse_node_id(s: &str) -> Option<u64> {
    s.parse::<u64>().ok().filter(|n| *n != 0)
}

pub(crate) fn volume_kind(v: &vd::Volume) -> VolumeKind {
    match vd::VolumeKind::try_from(v.kind) {
        Ok(vd::VolumeKind::File) => VolumeKind::File,
        _ => VolumeKind::Block,
    }
}

/// The spec a volume was created with. Volumes made outside the CSI path
/// (volctl) may carry other parameters; their kind, replica count and
/// fsType still come through.
pub(crate) fn stored_spec(v: &vd::Volume) -> VolumeSpec {
    let mut spec = VolumeSpec::from_parameters(&v.parameters).unwrap_or_else(|_| VolumeSpec {
        fs_type: v.parameters.get(FS_TYPE).and_then(|f| FsType::parse(f)),
        ..VolumeSpec::default()
    });
    spec.kind = volume_kind(v);
    if v.replica_count != 0 {
        spec.replicas = v.replica_count;
    }
    spec
}

pub(crate) fn csi_volume(v: &vd::Volume, nodes: &[vd::Node]) -> csi::Volume {
    let spec = stored_spec(v);
    csi::Volume {
        capacity_bytes: capacity::to_i64(v.size_bytes),
        volume_id: v.id.clone(),
        volume_context: NodeContext::to_context(&spec, &v.name),
        content_source: None,
        accessible_topology: topology::accessible_topology(v, nodes),
    }
}

/// The catalog's attachments of a volume. volumed's answer also lists
/// devices a node still reports without a catalog attachment (a detach that
/// the node's next heartbeat has not reported yet, or a fenced leftover);
/// those carry no access mode, cannot write (fencing), and are not
/// publications in the CSI sense.
pub(crate) fn publications(v: &vd::Volume) -> impl Iterator<Item = &vd::Attachment> {
    v.attachments.iter().filter(|a| a.mode != vd::AccessMode::Unspecified as i32)
}

pub(crate) fn published_node_ids(v: &vd::Volume) -> Vec<String> {
    let mut ids: Vec<String> = publications(v).map(|a| a.node_id.to_string()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The controller's view of a volume's health, from its replica states.
pub(crate) fn condition(v: &vd::Volume) -> csi::VolumeCondition {
    let healthy =
        v.replicas.iter().filter(|r| vd::ReplicaState::try_from(r.state) == Ok(vd::ReplicaState::Healthy)).count();
    let wanted = v.replica_count.max(v.replicas.len() as u32);
    let unhealthy: Vec<String> = v
        .replicas
        .iter()
        .filter(|r| vd::ReplicaState::try_from(r.state) != Ok(vd::ReplicaState::Healthy))
        .map(|r| {
            let state = vd::ReplicaState::try_from(r.state)
                .map(|s| s.as_str_name().trim_start_matches("REPLICA_STATE_").to_lowercase())
                .unwrap_or_else(|_| "unknown".into());
            match r.rebuild_bytes_done.saturating_mul(100).checked_div(r.rebuild_bytes_total) {
                Some(pct) => format!("node {} {state} {pct}%", r.node_id),
                None => format!("node {} {state}", r.node_id),
            }
        })
        .collect();
    let detail = if unhealthy.is_empty() { String::new() } else { format!(" ({})", unhealthy.join(", ")) };
    let state = vd::VolumeState::try_from(v.state).unwrap_or(vd::VolumeState::Unspecified);
    let (abnormal, what) = match state {
        vd::VolumeState::Healthy => (false, "healthy"),
        vd::VolumeState::Creating => (false, "creating"),
        vd::VolumeState::Degraded => (true, "degraded"),
        vd::VolumeState::Rebuilding => (true, "rebuilding"),
        vd::VolumeState::Unavailable => (true, "unavailable: no quorum of replicas"),
        vd::VolumeState::Deleting => (true, "being deleted"),
        vd::VolumeState::Unspecified => (false, "state unknown"),
    };
    csi::VolumeCondition { abnormal, message: format!("{what}: {healthy} of {wanted} replicas healthy{detail}") }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let budget = crate::restore::wait_budget(request.metadata());
        let req = request.into_inner();
        let name = req.name.clone();
        observe("CreateVolume", &name, self.create(req, budget)).await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("DeleteVolume", &id, self.delete(req)).await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerPublishVolume", &id, self.publish(req)).await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerUnpublishVolume", &id, self.unpublish(req)).await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ValidateVolumeCapabilities", &id, self.validate(req)).await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        observe("ListVolumes", "", self.list(request.into_inner())).await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        observe("GetCapacity", "", self.capacity(request.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        observe("ControllerGetCapabilities", "", async {
            Ok(csi::ControllerGetCapabilitiesResponse { capabilities: volumed_csi::caps::controller_capabilities() })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.source_volume_id.clone();
        observe("CreateSnapshot", &id, self.create_snapshot(req)).await
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        observe("DeleteSnapshot", "", self.delete_snapshot(request.into_inner())).await
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let id = req.source_volume_id.clone();
        observe("ListSnapshots", &id, self.list_snapshots(req)).await
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        observe("GetSnapshot", "", self.get_snapshot(request.into_inner())).await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerExpandVolume", &id, self.expand(req)).await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerGetVolume", &id, self.get(req)).await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerModifyVolume", &id, self.modify(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        assert!(is_volume_id("0b7f6c1e-3f2a-4c1d-9e8f-0123456789ab"));
        for bad in ["", "abc", "0b7f6c1e-3f2a-4c1d-9e8f-0123456789aZ", "0b7f6c1e3f2a4c1d9e8f0123456789ab", "../../etc"]
        {
            assert!(!is_volume_id(bad), "{bad}");
        }
        assert_eq!(parse_node_id("7"), Some(7));
        assert_eq!(parse_node_id("0"), None);
        assert_eq!(parse_node_id("node-a"), None);
    }

    fn replica(node: u64, state: vd::ReplicaState) -> vd::Replica {
        vd::Replica { node_id: node, state: state as i32, ..Default::default() }
    }

    #[test]
    fn conditions_from_states() {
        let mut v = vd::Volume {
            replica_count: 3,
            state: vd::VolumeState::Healthy as i32,
            replicas: vec![
                replica(1, vd::ReplicaState::Healthy),
                replica(2, vd::ReplicaState::Healthy),
                replica(3, vd::ReplicaState::Healthy),
            ],
            ..Default::default()
        };
        let c = condition(&v);
        assert!(!c.abnormal);
        assert_eq!(c.message, "healthy: 3 of 3 replicas healthy");
        v.state = vd::VolumeState::Degraded as i32;
        v.replicas[2] = replica(3, vd::ReplicaState::Unreachable);
        let c = condition(&v);
        assert!(c.abnormal);
        assert!(c.message.contains("2 of 3"), "{}", c.message);
        assert!(c.message.contains("node 3 unreachable"), "{}", c.message);
        v.state = vd::VolumeState::Rebuilding as i32;
        v.replicas[2] =
            vd::Replica { rebuild_bytes_done: 1, rebuild_bytes_total: 4, ..replica(4, vd::ReplicaState::Rebuilding) };
        assert!(condition(&v).message.contains("node 4 rebuilding 25%"));
    }

    #[test]
    fn stored_spec_is_lenient_but_keeps_kind() {
        let v = vd::Volume {
            kind: vd::VolumeKind::File as i32,
            replica_count: 2,
            parameters: [("made-by".to_string(), "volctl".to_string())].into(),
            ..Default::default()
        };
        let s = stored_spec(&v);
        assert_eq!(s.kind, VolumeKind::File);
        assert_eq!(s.replicas, 2);
    }
}
