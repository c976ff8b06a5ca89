//! The snapshot half of the Admin API: snapshots, group snapshots, and the
//! content source of `CreateVolume` (restore and clone).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::{Request, Status};
use uuid::Uuid;
use volumed_proto::volumed::v1 as pb;

use super::{list_token, parse_token, AdminService};
use crate::api::status_of_catalog;
use crate::catalog::snapshots::{GroupSnapshotRecord, SnapshotRecord, VolumeSource};
use crate::catalog::state::{CatalogCommand, CatalogState, VolumeRecord};
use crate::cluster::snapshots::{self as ops, SnapError};
use crate::storage::log_store::NodeId;
use crate::volume::command::BLOCK_SIZE;
use crate::volume::replica::{ReplicaReport, ReportedRole};

/// How long a call without a deadline waits for a restore to finish.
const DEFAULT_BUDGET: Duration = Duration::from_secs(600);

/// Time this call may take: its gRPC deadline less a margin to answer in,
/// else [`DEFAULT_BUDGET`].
pub(super) fn call_budget<T>(req: &Request<T>) -> Duration {
    let Some(raw) = req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()) else { return DEFAULT_BUDGET };
    let (digits, unit) = raw.split_at(raw.len().saturating_sub(1));
    let Ok(n) = digits.parse::<u64>() else { return DEFAULT_BUDGET };
    let total = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return DEFAULT_BUDGET,
    };
    total.saturating_sub(Duration::from_secs(2)).max(Duration::from_secs(1))
}

fn status_of(e: SnapError) -> Status {
    match e {
        SnapError::Catalog(c) => status_of_catalog(c),
        SnapError::Unavailable(m) => Status::unavailable(m),
        SnapError::Refused(m) => Status::failed_precondition(m),
        SnapError::Aborted(m) => Status::aborted(m),
        SnapError::Internal(m) => Status::internal(m),
    }
}

fn check_name(what: &str, name: &str) -> Result<String, Status> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Status::invalid_argument(format!("{what} name is required")));
    }
    if name.len() > 253 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(Status::invalid_argument(format!(
            "{what} name {name:?} must be at most 253 characters without '/' or control characters"
        )));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(Status::invalid_argument(format!("{what} name {name:?} must not look like an id")));
    }
    Ok(name.to_string())
}

fn leader_of(reports: &BTreeMap<NodeId, ReplicaReport>) -> Option<&ReplicaReport> {
    reports.values().filter(|r| r.role == Some(ReportedRole::Leader)).max_by_key(|r| r.term)
}

/// Whether `key` names volume `id` (by id, or by its name even if retained).
fn names_volume(state: &CatalogState, key: &str, id: Uuid) -> bool {
    key == id.to_string() || state.volumes.get(&id).is_some_and(|v| v.name == key)
}

pub fn snapshot_to_proto(
    s: &SnapshotRecord,
    state: &CatalogState,
    reports: &BTreeMap<NodeId, ReplicaReport>,
) -> pb::Snapshot {
    let exclusive = leader_of(reports)
        .and_then(|l| l.snapshots.iter().find(|x| x.id == s.id))
        .map(|x| x.exclusive_blocks * BLOCK_SIZE)
        .unwrap_or(0);
    pb::Snapshot {
        id: s.id.to_string(),
        name: s.name.clone(),
        source_volume_id: s.source_volume.to_string(),
        source_volume_name: state
            .volumes
            .get(&s.source_volume)
            .filter(|v| !v.retained)
            .map(|v| v.name.clone())
            .unwrap_or_default(),
        created_at_unix_ms: s.created_at_ms,
        ready_to_use: s.ready,
        restore_size_bytes: s.size_bytes,
        total_bytes: s.used_bytes,
        exclusive_bytes: exclusive,
        log_index: s.index,
        group_snapshot_id: s.group.map(|g| g.to_string()).unwrap_or_default(),
        restoring_volumes: state.hydrating_from(s.id).iter().map(Uuid::to_string).collect(),
    }
}

impl AdminService {
    fn snapshot_proto(&self, s: &SnapshotRecord) -> pb::Snapshot {
        let state = self.node.catalog.read(|st| st.clone());
        snapshot_to_proto(s, &state, &self.node.catalog.volume_reports(s.source_volume))
    }

    fn group_proto(&self, g: &GroupSnapshotRecord) -> pb::GroupSnapshot {
        let state = self.node.catalog.read(|st| st.clone());
        let snapshots = g
            .members
            .iter()
            .filter_map(|m| state.snapshots.get(m))
            .map(|s| snapshot_to_proto(s, &state, &self.node.catalog.volume_reports(s.source_volume)))
            .collect();
        pb::GroupSnapshot {
            id: g.id.to_string(),
            name: g.name.clone(),
            snapshots,
            created_at_unix_ms: g.created_at_ms,
            ready_to_use: g.ready,
        }
    }

    pub(super) async fn create_snapshot_here(&self, req: pb::CreateSnapshotRequest) -> Result<pb::Snapshot, Status> {
        let name = check_name("snapshot", &req.name)?;
        let key = req.source_volume.trim();
        if key.is_empty() {
            return Err(Status::invalid_argument("source_volume (id or name) is required"));
        }
        let state = self.node.catalog.read(|s| s.clone());
        // A retry after the source was deleted still gets its snapshot.
        if let Some(existing) = state.snapshot_names.get(&name).and_then(|id| state.snapshots.get(id)) {
            if existing.ready && names_volume(&state, key, existing.source_volume) {
                return Ok(self.snapshot_proto(existing));
            }
        }
        let volume =
            state.volume_by_id_or_name(key).ok_or_else(|| Status::not_found(format!("volume {key} not found")))?;
        let span = tracing::info_span!("create_snapshot", volume = %volume.id, name = %name);
        let rec = tracing::Instrument::instrument(ops::create(&self.node, &name, volume.id, None), span)
            .await
            .map_err(status_of)?;
        Ok(self.snapshot_proto(&rec))
    }

    pub(super) fn get_snapshot_here(&self, key: &str) -> Result<pb::Snapshot, Status> {
        let key = key.trim();
        if key.is_empty() {
            return Err(Status::invalid_argument("snapshot id or name is required"));
        }
        let s = self
            .node
            .catalog
            .read(|st| st.snapshot_by_id_or_name(key).cloned())
            .ok_or_else(|| Status::not_found(format!("snapshot {key} not found")))?;
        Ok(self.snapshot_proto(&s))
    }

    pub(super) fn list_snapshots_here(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, Status> {
        let after = if req.starting_token.is_empty() {
            None
        } else {
            Some(parse_token(&req.starting_token).ok_or_else(|| {
                Status::aborted(format!("starting_token {:?} was not issued by this API", req.starting_token))
            })?)
        };
        let state = self.node.catalog.read(|s| s.clone());
        let only = req.snapshot_id.trim();
        let source = req.source_volume.trim();
        let source_id: Option<Option<Uuid>> = if source.is_empty() {
            None
        } else {
            let by_id = Uuid::parse_str(source).ok().filter(|id| state.volumes.contains_key(id));
            Some(by_id.or_else(|| state.volume_by_id_or_name(source).map(|v| v.id)))
        };
        let mut all: Vec<&SnapshotRecord> = state
            .snapshots
            .values()
            .filter(|s| !s.deleting && s.for_clone.is_none())
            .filter(|s| only.is_empty() || s.id.to_string() == only || s.name == only)
            .filter(|s| match source_id {
                None => true,
                Some(id) => Some(s.source_volume) == id,
            })
            .collect();
        all.sort_by_key(|s| s.id.to_string());
        let start = match &after {
            Some(id) => all.partition_point(|s| s.id.to_string() <= *id),
            None => 0,
        };
        let max = if req.max_entries == 0 { usize::MAX } else { req.max_entries as usize };
        let page: Vec<&SnapshotRecord> = all[start..].iter().take(max).copied().collect();
        let next_token = if start + page.len() < all.len() {
            page.last().map(|s| list_token(&s.id.to_string())).unwrap_or_default()
        } else {
            String::new()
        };
        let snapshots = page
            .iter()
            .map(|s| snapshot_to_proto(s, &state, &self.node.catalog.volume_reports(s.source_volume)))
            .collect();
        Ok(pb::ListSnapshotsResponse { snapshots, next_token })
    }

    pub(super) async fn delete_snapshot_here(&self, key: &str) -> Result<pb::DeleteSnapshotResponse, Status> {
        let key = key.trim();
        if key.is_empty() {
            return Err(Status::invalid_argument("snapshot id or name is required"));
        }
        let Some(s) = self.node.catalog.read(|st| st.snapshot_by_id_or_name(key).cloned()) else {
            return Ok(pb::DeleteSnapshotResponse { existed: false });
        };
        let existed = ops::delete(&self.node, s.id).await.map_err(status_of)?;
        Ok(pb::DeleteSnapshotResponse { existed })
    }

    pub(super) async fn create_group_snapshot_here(
        &self,
        req: pb::CreateGroupSnapshotRequest,
    ) -> Result<pb::GroupSnapshot, Status> {
        let name = check_name("group snapshot", &req.name)?;
        if req.source_volumes.is_empty() {
            return Err(Status::invalid_argument("a group snapshot needs at least one source volume"));
        }
        let state = self.node.catalog.read(|s| s.clone());
        if let Some(existing) = state.group_snapshot_names.get(&name).and_then(|id| state.group_snapshots.get(id)) {
            let same = existing.ready
                && existing.volumes.len() == req.source_volumes.len()
                && req
                    .source_volumes
                    .iter()
                    .all(|k| existing.volumes.iter().any(|v| names_volume(&state, k.trim(), *v)));
            if same {
                return Ok(self.group_proto(existing));
            }
        }
        let mut volumes: Vec<Uuid> = Vec::new();
        for key in &req.source_volumes {
            let key = key.trim();
            let v =
                state.volume_by_id_or_name(key).ok_or_else(|| Status::not_found(format!("volume {key} not found")))?;
            if volumes.contains(&v.id) {
                return Err(Status::invalid_argument(format!("volume {key} is named twice")));
            }
            volumes.push(v.id);
        }
        let g = ops::create_group(&self.node, &name, volumes).await.map_err(status_of)?;
        Ok(self.group_proto(&g))
    }

    pub(super) fn get_group_snapshot_here(&self, key: &str) -> Result<pb::GroupSnapshot, Status> {
        let key = key.trim();
        if key.is_empty() {
            return Err(Status::invalid_argument("group snapshot id or name is required"));
        }
        let g = self
            .node
            .catalog
            .read(|s| s.group_snapshot_by_id_or_name(key).cloned())
            .ok_or_else(|| Status::not_found(format!("group snapshot {key} not found")))?;
        Ok(self.group_proto(&g))
    }

    pub(super) async fn delete_group_snapshot_here(
        &self,
        key: &str,
    ) -> Result<pb::DeleteGroupSnapshotResponse, Status> {
        let key = key.trim();
        if key.is_empty() {
            return Err(Status::invalid_argument("group snapshot id or name is required"));
        }
        let Some(g) = self.node.catalog.read(|s| s.group_snapshot_by_id_or_name(key).cloned()) else {
            return Ok(pb::DeleteGroupSnapshotResponse { existed: false });
        };
        let existed = ops::delete_group(&self.node, g.id).await.map_err(status_of)?;
        Ok(pb::DeleteGroupSnapshotResponse { existed })
    }

    /// The content source of a new volume `name` (to get id `new_id`), and
    /// the id the volume gets: a clone retried after its implicit snapshot
    /// was taken reuses the id that snapshot was taken for.
    pub(super) async fn volume_source(
        &self,
        req: &pb::CreateVolumeRequest,
        name: &str,
        new_id: Uuid,
    ) -> Result<Option<(VolumeSource, Uuid)>, Status> {
        let (snap_key, vol_key) = (req.source_snapshot.trim(), req.source_volume.trim());
        if !snap_key.is_empty() && !vol_key.is_empty() {
            return Err(Status::invalid_argument("give source_snapshot or source_volume, not both"));
        }
        if snap_key.is_empty() && vol_key.is_empty() {
            return Ok(None);
        }
        let state = self.node.catalog.read(|s| s.clone());
        if let Some(existing) = state.names.get(name).and_then(|id| state.volumes.get(id)) {
            return same_source(&state, existing, snap_key, vol_key).map(|s| Some((s, existing.id)));
        }
        if !snap_key.is_empty() {
            let s = state
                .snapshot_by_id_or_name(snap_key)
                .ok_or_else(|| Status::not_found(format!("snapshot {snap_key} not found")))?;
            if !s.ready {
                return Err(Status::unavailable(format!("snapshot {} is not cut yet; retry", s.name)));
            }
            let src = VolumeSource {
                snapshot: s.id,
                volume: s.source_volume,
                index: s.index,
                size_bytes: s.size_bytes,
                used_bytes: s.used_bytes,
                implicit: false,
            };
            return Ok(Some((src, new_id)));
        }
        let v = state
            .volume_by_id_or_name(vol_key)
            .ok_or_else(|| Status::not_found(format!("volume {vol_key} (the clone's source) not found")))?;
        if req.size_bytes != 0 && req.size_bytes.div_ceil(BLOCK_SIZE) * BLOCK_SIZE < v.size_bytes {
            return Err(Status::out_of_range(format!(
                "a clone of {} needs at least {} bytes; {} were asked for",
                v.name, v.size_bytes, req.size_bytes
            )));
        }
        // The implicit snapshot is named after the clone, so a retry finds it.
        let implicit_name = format!("clone/{name}");
        let mut id = new_id;
        if let Some(prior) = state.snapshot_names.get(&implicit_name).and_then(|i| state.snapshots.get(i)) {
            match prior.for_clone {
                Some(for_id) if prior.source_volume == v.id => id = for_id,
                _ => {
                    ops::delete(&self.node, prior.id).await.map_err(status_of)?;
                }
            }
        }
        let s = ops::create(&self.node, &implicit_name, v.id, Some(id)).await.map_err(status_of)?;
        let src = VolumeSource {
            snapshot: s.id,
            volume: v.id,
            index: s.index,
            size_bytes: s.size_bytes,
            used_bytes: s.used_bytes,
            implicit: true,
        };
        Ok(Some((src, id)))
    }

    /// Waits until the copy into `rec` finished (recording it in the
    /// catalog as soon as its leader reports it), or `budget` ran out.
    pub(super) async fn wait_hydrated(&self, rec: &VolumeRecord, budget: Duration) -> Result<(), Status> {
        let deadline = Instant::now() + budget;
        loop {
            let Some(hydrated) = self.node.catalog.read(|s| s.volumes.get(&rec.id).map(|v| v.hydrated)) else {
                return Err(Status::aborted(format!("volume {} was deleted while it was being restored", rec.name)));
            };
            if hydrated {
                return Ok(());
            }
            let reports = self.node.catalog.volume_reports(rec.id);
            let progress = leader_of(&reports).and_then(|l| l.hydration.clone());
            if progress.as_ref().is_some_and(|h| h.finished) {
                self.node
                    .catalog
                    .write(CatalogCommand::FinishHydration { id: rec.id })
                    .await
                    .map_err(status_of_catalog)?;
                continue;
            }
            if Instant::now() >= deadline {
                let (done, total) = progress.map(|h| (h.copied_blocks, h.total_blocks)).unwrap_or((0, 0));
                return Err(Status::unavailable(format!(
                    "volume {} is still being restored ({} of {} bytes copied); the copy goes on, retry the same request",
                    rec.name,
                    done * BLOCK_SIZE,
                    total * BLOCK_SIZE
                )));
            }
            self.node.report_now.notify_one();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A volume named like the request exists: it is the answer if it came
/// from the same source.
fn same_source(
    state: &CatalogState,
    existing: &VolumeRecord,
    snap_key: &str,
    vol_key: &str,
) -> Result<VolumeSource, Status> {
    let conflict =
        || Status::already_exists(format!("volume {} already exists with another content source", existing.name));
    let src = existing.source.clone().ok_or_else(conflict)?;
    let same = if !snap_key.is_empty() {
        !src.implicit
            && (snap_key == src.snapshot.to_string()
                || state.snapshots.get(&src.snapshot).is_some_and(|s| s.name == snap_key))
    } else {
        src.implicit && names_volume(state, vol_key, src.volume)
    };
    if same {
        Ok(src)
    } else {
        Err(conflict())
    }
}
