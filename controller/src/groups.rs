//! The CSI GroupController service: volume group snapshots.
//!
//! volumed takes a group snapshot as one consistent cut: it holds new
//! writes on every member volume's leader, waits for the writes in flight,
//! cuts each volume, and releases; when any cut fails it deletes the ones
//! taken (all or nothing). A group snapshot id is volumed's uuid; its
//! member snapshots carry it as `group_snapshot_id` and can only be
//! deleted with the group. With `freeze` (the default) the filesystems
//! mounted from every member are frozen around the cut.

use std::collections::BTreeSet;

use tonic::{Request, Response, Status};
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::logging::observe;
use volumed_csi::proto::group_controller_server::GroupController;
use volumed_csi::proto::{self as csi};
use volumed_csi::snapshot_params::SnapshotParams;
use volumed_proto::volumed::v1 as vd;

use crate::service::{is_volume_id, ControllerService};
use crate::snapshots::{csi_snapshot, timestamp};
use crate::volumes::validate_name;

fn csi_group(g: &vd::GroupSnapshot) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: g.snapshots.iter().map(csi_snapshot).collect(),
        creation_time: Some(timestamp(g.created_at_unix_ms)),
        ready_to_use: g.ready_to_use && g.snapshots.iter().all(|s| s.ready_to_use),
    }
}

/// The source volume ids, checked: none empty, none twice.
fn source_ids(ids: &[String]) -> Result<Vec<String>, CsiError> {
    if ids.is_empty() {
        return Err(CsiError::Missing("source_volume_ids"));
    }
    let mut seen = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        if id.is_empty() {
            return Err(CsiError::InvalidArgument(format!("source_volume_ids[{i}] is empty")));
        }
        if !seen.insert(id.as_str()) {
            return Err(CsiError::InvalidArgument(format!("source_volume_ids[{i}]: volume {id} is named twice")));
        }
    }
    Ok(ids.to_vec())
}

/// INVALID_ARGUMENT unless `given` names exactly the group's snapshots.
fn check_members(g: &vd::GroupSnapshot, given: &[String]) -> Result<(), CsiError> {
    if given.is_empty() {
        return Err(CsiError::Missing("snapshot_ids"));
    }
    let theirs: BTreeSet<&str> = g.snapshots.iter().map(|s| s.id.as_str()).collect();
    let asked: BTreeSet<&str> = given.iter().map(String::as_str).collect();
    if theirs != asked || asked.len() != given.len() {
        return Err(CsiError::InvalidArgument(format!(
            "snapshot_ids do not match group snapshot {}: it holds {}",
            g.id,
            theirs.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

impl ControllerService {
    /// The group snapshot with this id, `None` when volumed does not know it.
    async fn group_by_id(&self, id: &str) -> Result<Option<vd::GroupSnapshot>, CsiError> {
        if !is_volume_id(id) {
            return Ok(None);
        }
        let res = self
            .volumed
            .call("GetGroupSnapshot", |mut c| {
                let r = vd::GetGroupSnapshotRequest { id_or_name: id.to_string() };
                async move { c.get_group_snapshot(r).await }
            })
            .await;
        match res {
            Ok(g) if g.id == id => Ok(Some(g)),
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(from_volumed(s, format!("group snapshot {id}"))),
        }
    }

    /// The group snapshot named `name`, `None` when there is none.
    async fn group_by_name(&self, name: &str) -> Result<Option<vd::GroupSnapshot>, CsiError> {
        let res = self
            .volumed
            .call("GetGroupSnapshot", |mut c| {
                let r = vd::GetGroupSnapshotRequest { id_or_name: name.to_string() };
                async move { c.get_group_snapshot(r).await }
            })
            .await;
        match res {
            Ok(g) if g.name == name => Ok(Some(g)),
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound || s.code() == tonic::Code::InvalidArgument => Ok(None),
            Err(s) => Err(from_volumed(s, format!("group snapshot named \"{name}\""))),
        }
    }

    async fn create_group(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse, CsiError> {
        validate_name(&req.name)?;
        let ids = source_ids(&req.source_volume_ids)?;
        let params = SnapshotParams::from_parameters(&req.parameters)?;
        if let Some(bad) = ids.iter().find(|id| !is_volume_id(id)) {
            return Err(CsiError::NotFound(format!("source volume {bad} does not exist")));
        }
        let name = req.name.as_str();
        let want: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let members = |g: &vd::GroupSnapshot| -> BTreeSet<String> {
            g.snapshots.iter().map(|s| s.source_volume_id.clone()).collect()
        };
        // A retry of a group already cut needs no freeze.
        if let Some(g) = self.group_by_name(name).await? {
            if g.ready_to_use && members(&g).iter().map(String::as_str).collect::<BTreeSet<_>>() == want {
                return Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(csi_group(&g)) });
            }
        }
        let frozen = if params.freeze {
            let all: Vec<&str> = ids.iter().map(String::as_str).collect();
            self.freeze(&all).await?
        } else {
            Vec::new()
        };
        let vreq = vd::CreateGroupSnapshotRequest { name: name.to_string(), source_volumes: ids.clone() };
        let res = self
            .volumed
            .call("CreateGroupSnapshot", |mut c| {
                let r = vreq.clone();
                async move { c.create_group_snapshot(r).await }
            })
            .await;
        self.thaw(frozen).await;
        let g = res.map_err(|s| from_volumed(s, format!("group snapshot named \"{name}\"")))?;
        let got: BTreeSet<&str> = g.snapshots.iter().map(|s| s.source_volume_id.as_str()).collect();
        if got != want {
            return Err(CsiError::AlreadyExists(format!(
                "group snapshot named \"{name}\" ({}) exists for other volumes: {}",
                g.id,
                got.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        if !g.ready_to_use {
            return Err(CsiError::Aborted(format!(
                "group snapshot named \"{name}\" ({}) is being cut by another call; retry",
                g.id
            )));
        }
        tracing::info!(group_snapshot_id = %g.id, volumes = ids.len(), "group snapshot cut");
        Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(csi_group(&g)) })
    }

    async fn delete_group(
        &self,
        req: csi::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<csi::DeleteVolumeGroupSnapshotResponse, CsiError> {
        if req.group_snapshot_id.is_empty() {
            return Err(CsiError::Missing("group_snapshot_id"));
        }
        let id = req.group_snapshot_id.as_str();
        // Unknown or malformed ids are already deleted, as the spec wants.
        let Some(g) = self.group_by_id(id).await? else {
            return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
        };
        check_members(&g, &req.snapshot_ids)?;
        let res = self
            .volumed
            .call("DeleteGroupSnapshot", |mut c| {
                let r = vd::DeleteGroupSnapshotRequest { id_or_name: id.to_string() };
                async move { c.delete_group_snapshot(r).await }
            })
            .await;
        match res {
            Ok(_) => Ok(csi::DeleteVolumeGroupSnapshotResponse {}),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(csi::DeleteVolumeGroupSnapshotResponse {}),
            Err(s) => Err(from_volumed(s, format!("group snapshot {id}"))),
        }
    }

    async fn get_group(
        &self,
        req: csi::GetVolumeGroupSnapshotRequest,
    ) -> Result<csi::GetVolumeGroupSnapshotResponse, CsiError> {
        if req.group_snapshot_id.is_empty() {
            return Err(CsiError::Missing("group_snapshot_id"));
        }
        let id = req.group_snapshot_id.as_str();
        let g = self
            .group_by_id(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("group snapshot {id} does not exist")))?;
        check_members(&g, &req.snapshot_ids)?;
        Ok(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(csi_group(&g)) })
    }
}

#[tonic::async_trait]
impl GroupController for ControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        observe("GroupControllerGetCapabilities", "", async {
            Ok(csi::GroupControllerGetCapabilitiesResponse {
                capabilities: volumed_csi::caps::group_controller_capabilities(),
            })
        })
        .await
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let ids = req.source_volume_ids.join(",");
        observe("CreateVolumeGroupSnapshot", &ids, self.create_group(req)).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        observe("DeleteVolumeGroupSnapshot", "", self.delete_group(request.into_inner())).await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        observe("GetVolumeGroupSnapshot", "", self.get_group(request.into_inner())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> vd::GroupSnapshot {
        let snap = |id: &str, vol: &str| vd::Snapshot {
            id: id.into(),
            source_volume_id: vol.into(),
            ready_to_use: true,
            group_snapshot_id: "g1".into(),
            ..Default::default()
        };
        vd::GroupSnapshot {
            id: "g1".into(),
            name: "gs".into(),
            snapshots: vec![snap("s1", "v1"), snap("s2", "v2")],
            created_at_unix_ms: 5_000,
            ready_to_use: true,
        }
    }

    #[test]
    fn source_ids_are_checked() {
        assert_eq!(source_ids(&[]).unwrap_err(), CsiError::Missing("source_volume_ids"));
        let e = source_ids(&["a".into(), String::new()]).unwrap_err();
        assert!(e.to_string().contains("source_volume_ids[1]"), "{e}");
        let e = source_ids(&["a".into(), "b".into(), "a".into()]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("named twice"), "{e}");
        assert_eq!(source_ids(&["a".into(), "b".into()]).unwrap().len(), 2);
    }

    #[test]
    fn member_lists_must_match() {
        let g = group();
        assert!(check_members(&g, &["s2".into(), "s1".into()]).is_ok(), "order does not matter");
        assert_eq!(check_members(&g, &[]).unwrap_err(), CsiError::Missing("snapshot_ids"));
        for bad in [vec!["s1".to_string()], vec!["s1".into(), "s2".into(), "s3".into()], vec!["s1".into(), "s1".into()]]
        {
            let e = check_members(&g, &bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn group_view_is_ready_only_when_every_member_is() {
        let mut g = group();
        let c = csi_group(&g);
        assert_eq!(c.group_snapshot_id, "g1");
        assert_eq!(c.snapshots.len(), 2);
        assert!(c.snapshots.iter().all(|s| s.group_snapshot_id == "g1"));
        assert!(c.ready_to_use);
        g.snapshots[1].ready_to_use = false;
        assert!(!csi_group(&g).ready_to_use);
    }
}
