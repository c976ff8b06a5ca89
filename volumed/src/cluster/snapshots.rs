//! Snapshot operations as the catalog leader runs them: the catalog record
//! first (it takes the name), then the cut in the volume group through its
//! leader, then the catalog learns the cut. Group snapshots hold writes on
//! every volume's leader while they cut. A housekeeping loop finishes what
//! may be left half-done: deferred deletions, restores that completed,
//! cuts whose answer was lost, pins the catalog does not know.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};
use uuid::Uuid;

use super::control::{self, ControlReply, ControlRequest};
use super::node::NodeRuntime;
use crate::catalog::service::{now_ms, CatalogWriteError};
use crate::catalog::snapshots::{GroupSnapshotRecord, SnapshotCommand, SnapshotRecord};
use crate::catalog::state::{CatalogCommand, CatalogResponse};
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::volume::command::{UserSnapshot, BLOCK_SIZE};
use crate::volume::replica::ReportedRole;

/// How long one operation keeps looking for a volume's leader.
const LEADER_SEARCH: Duration = Duration::from_secs(15);
/// Group snapshots: how long in-flight writes may take to drain, and how
/// long a barrier holds at most (it releases itself after that).
const BARRIER_WAIT: Duration = Duration::from_secs(5);
const BARRIER_HOLD: Duration = Duration::from_secs(20);
/// A pin the catalog does not know is dropped only once it is this old
/// (a catalog leader that just took over may not have applied the record).
const ORPHAN_AGE_MS: i64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error(transparent)]
    Catalog(#[from] CatalogWriteError),
    /// Retry later (no leader, node down).
    #[error("{0}")]
    Unavailable(String),
    /// The volume refused (e.g. still being restored).
    #[error("{0}")]
    Refused(String),
    /// A group snapshot failed and was rolled back.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
}

/// Sends `req` to the leader of `volume`'s group, looking for it among the
/// reported leader and the placement, through elections.
pub async fn call_leader(
    node: &NodeRuntime,
    volume: Uuid,
    req: &ControlRequest,
    within: Duration,
) -> Result<(NodeId, ControlReply), SnapError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::from("no replica answered");
    loop {
        let mut candidates: Vec<NodeId> = node
            .catalog
            .volume_reports(volume)
            .into_iter()
            .filter(|(_, r)| r.role == Some(ReportedRole::Leader))
            .map(|(n, _)| n)
            .collect();
        let placement = node.catalog.read(|s| s.volumes.get(&volume).map(|v| v.placement.clone()).unwrap_or_default());
        if placement.is_empty() {
            return Err(SnapError::Unavailable(format!("volume {volume} has no replicas")));
        }
        candidates.extend(placement);
        candidates.dedup();
        for n in candidates {
            match control::call(node, n, GroupId(volume), req, Duration::from_secs(10)).await {
                Ok(ControlReply::NoReplica) => last = format!("node {n} hosts no replica"),
                Ok(ControlReply::Failed { not_leader: true, detail }) => last = detail,
                Ok(reply) => return Ok((n, reply)),
                Err(e) => last = e,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SnapError::Unavailable(format!(
                "no leader of volume {volume} could be reached ({last}); retry"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reply_error(reply: ControlReply) -> SnapError {
    match reply {
        ControlReply::Failed { detail, .. } => SnapError::Refused(detail),
        other => SnapError::Internal(format!("unexpected answer {other:?}")),
    }
}

async fn record_cut(node: &NodeRuntime, id: Uuid, u: &UserSnapshot) -> Result<SnapshotRecord, SnapError> {
    let cmd = SnapshotCommand::Cut {
        id,
        index: u.index,
        size_bytes: u.size_bytes,
        used_bytes: u.live_blocks * BLOCK_SIZE,
        created_at_ms: u.created_at_ms,
    };
    match node.catalog.write(CatalogCommand::Snapshot(cmd)).await? {
        CatalogResponse::Snapshot(s) => Ok(*s),
        other => Err(SnapError::Internal(format!("unexpected catalog answer {other:?}"))),
    }
}

/// Creates snapshot `name` of `source` (idempotent by name) and cuts it.
pub async fn create(
    node: &NodeRuntime,
    name: &str,
    source: Uuid,
    for_clone: Option<Uuid>,
) -> Result<SnapshotRecord, SnapError> {
    let cmd = SnapshotCommand::Create {
        id: Uuid::new_v4(),
        name: name.to_string(),
        source,
        group: None,
        for_clone,
        now_ms: now_ms(),
    };
    let rec = match node.catalog.write(CatalogCommand::Snapshot(cmd)).await? {
        CatalogResponse::Snapshot(s) => *s,
        other => return Err(SnapError::Internal(format!("unexpected catalog answer {other:?}"))),
    };
    if rec.ready {
        return Ok(rec);
    }
    let req = ControlRequest::CreateSnapshot { id: rec.id, created_at_ms: now_ms(), barrier: None };
    match call_leader(node, source, &req, LEADER_SEARCH).await? {
        (_, ControlReply::Snapshot(u)) => {
            let done = record_cut(node, rec.id, &u).await?;
            info!(snapshot = %done.id, name = %done.name, volume = %source, index = done.index, "snapshot cut");
            Ok(done)
        }
        (_, other) => Err(reply_error(other)),
    }
}

/// The user's delete: the name is free at once; the pin goes as soon as no
/// clone copies from the snapshot (now, if possible).
pub async fn delete(node: &NodeRuntime, id: Uuid) -> Result<bool, SnapError> {
    let existed = matches!(
        node.catalog.write(CatalogCommand::Snapshot(SnapshotCommand::Delete { id })).await?,
        CatalogResponse::Existed(true)
    );
    if let Err(e) = release(node, id, Duration::from_secs(5)).await {
        info!(snapshot = %id, error = %e, "snapshot deleted; its space is freed later");
    }
    Ok(existed)
}

/// Releases a deleted snapshot's pin in its volume group and forgets it,
/// unless a clone still copies from it.
async fn release(node: &NodeRuntime, id: Uuid, within: Duration) -> Result<(), SnapError> {
    let (rec, clones, source_exists) = node.catalog.read(|s| {
        (
            s.snapshots.get(&id).cloned(),
            s.hydrating_from(id),
            s.snapshots.get(&id).is_some_and(|r| s.volumes.contains_key(&r.source_volume)),
        )
    });
    let Some(rec) = rec.filter(|r| r.deleting) else { return Ok(()) };
    if !clones.is_empty() {
        return Err(SnapError::Unavailable(format!("{} volume(s) still copy from it", clones.len())));
    }
    if source_exists {
        match call_leader(node, rec.source_volume, &ControlRequest::DeleteSnapshot { id }, within).await? {
            (_, ControlReply::Deleted(_)) => {}
            (_, other) => return Err(reply_error(other)),
        }
    }
    node.catalog.write(CatalogCommand::Snapshot(SnapshotCommand::Forget { id })).await?;
    info!(snapshot = %id, name = %rec.name, volume = %rec.source_volume, "snapshot released");
    Ok(())
}

/// One consistent cut across `volumes`, all or nothing: writes are held on
/// every volume's leader (in-flight ones drain) before any volume is cut,
/// and released after the last cut, so no write that completed before
/// another one started can be missing from a cut that has the later one.
pub async fn create_group(
    node: &NodeRuntime,
    name: &str,
    volumes: Vec<Uuid>,
) -> Result<GroupSnapshotRecord, SnapError> {
    let _one_at_a_time = node.snapshot_ops.lock().await;
    let members: Vec<Uuid> = volumes.iter().map(|_| Uuid::new_v4()).collect();
    let cmd =
        SnapshotCommand::CreateGroup { id: Uuid::new_v4(), name: name.to_string(), volumes, members, now_ms: now_ms() };
    let g = match node.catalog.write(CatalogCommand::Snapshot(cmd)).await? {
        CatalogResponse::GroupSnapshot(g) => *g,
        other => return Err(SnapError::Internal(format!("unexpected catalog answer {other:?}"))),
    };
    if g.ready {
        return Ok(g);
    }
    // An earlier attempt may have cut some members at other points: undo
    // those, the cut must be one.
    for (v, m) in g.volumes.iter().zip(&g.members) {
        if let (_, r @ ControlReply::Failed { .. }) =
            call_leader(node, *v, &ControlRequest::DeleteSnapshot { id: *m }, LEADER_SEARCH).await?
        {
            return Err(reply_error(r));
        }
    }
    let token: u64 = rand::random();
    let hold = ControlRequest::Barrier {
        token,
        wait_ms: BARRIER_WAIT.as_millis() as u64,
        hold_ms: BARRIER_HOLD.as_millis() as u64,
    };
    let barriers = join_all(g.volumes.iter().map(|v| call_leader(node, *v, &hold, BARRIER_WAIT))).await;
    let mut held: Vec<(Uuid, NodeId)> = Vec::new();
    let mut failure = None;
    for (v, r) in g.volumes.iter().zip(barriers) {
        match r {
            Ok((n, ControlReply::BarrierHeld { .. })) => held.push((*v, n)),
            Ok((_, other)) => failure = Some(format!("volume {v}: {}", reply_error(other))),
            Err(e) => failure = Some(format!("volume {v}: {e}")),
        }
    }
    let mut cuts = Vec::new();
    if failure.is_none() {
        let at = now_ms();
        let results = join_all(g.volumes.iter().zip(&g.members).zip(&held).map(|((v, m), (_, n))| async move {
            let req = ControlRequest::CreateSnapshot { id: *m, created_at_ms: at, barrier: Some(token) };
            control::call(node, *n, GroupId(*v), &req, Duration::from_secs(10)).await
        }))
        .await;
        for (v, r) in g.volumes.iter().zip(results) {
            match r {
                Ok(ControlReply::Snapshot(u)) => cuts.push(u),
                Ok(other) => failure = Some(format!("volume {v}: {}", reply_error(other))),
                Err(e) => failure = Some(format!("volume {v}: {e}")),
            }
        }
    }
    let release_req = ControlRequest::Release { token };
    join_all(held.iter().map(|(v, n)| control::call(node, *n, GroupId(*v), &release_req, Duration::from_secs(5))))
        .await;
    if let Some(why) = failure {
        warn!(group = %g.id, name = %g.name, reason = %why, "group snapshot failed; rolling back");
        node.catalog.write(CatalogCommand::Snapshot(SnapshotCommand::DeleteGroup { id: g.id })).await?;
        for m in &g.members {
            let _ = release(node, *m, Duration::from_secs(5)).await;
        }
        return Err(SnapError::Aborted(format!("group snapshot {name} was not taken (nothing kept): {why}")));
    }
    for (m, u) in g.members.iter().zip(&cuts) {
        record_cut(node, *m, u).await?;
    }
    let done = match node.catalog.write(CatalogCommand::Snapshot(SnapshotCommand::GroupCut { id: g.id })).await? {
        CatalogResponse::GroupSnapshot(g) => *g,
        other => return Err(SnapError::Internal(format!("unexpected catalog answer {other:?}"))),
    };
    info!(group = %done.id, name = %done.name, volumes = done.volumes.len(), "group snapshot cut");
    Ok(done)
}

pub async fn delete_group(node: &NodeRuntime, id: Uuid) -> Result<bool, SnapError> {
    let members = node.catalog.read(|s| s.group_snapshots.get(&id).map(|g| g.members.clone()).unwrap_or_default());
    let existed = matches!(
        node.catalog.write(CatalogCommand::Snapshot(SnapshotCommand::DeleteGroup { id })).await?,
        CatalogResponse::Existed(true)
    );
    for m in members {
        if let Err(e) = release(node, m, Duration::from_secs(5)).await {
            info!(snapshot = %m, error = %e, "group member deleted; its space is freed later");
        }
    }
    Ok(existed)
}

/// Housekeeping on the catalog leader.
pub async fn run(node: Arc<NodeRuntime>) {
    let mut shutdown = node.shutdown.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !node.catalog.is_leader() {
            continue;
        }
        housekeeping(&node).await;
    }
}

async fn housekeeping(node: &NodeRuntime) {
    let state = node.catalog.read(|s| s.clone());
    // Restores that finished copying.
    for v in state.volumes.values().filter(|v| !v.hydrated) {
        let done = node
            .catalog
            .volume_reports(v.id)
            .values()
            .any(|r| r.role == Some(ReportedRole::Leader) && r.hydration.as_ref().is_some_and(|h| h.finished));
        if done {
            info!(volume = %v.id, name = %v.name, "restore complete");
            if let Err(e) = node.catalog.write(CatalogCommand::FinishHydration { id: v.id }).await {
                warn!(volume = %v.id, error = %e, "recording a finished restore");
            }
        }
    }
    // Deletions waiting for their volume group (or for clones to finish).
    for s in state.snapshots.values().filter(|s| s.deleting) {
        if let Err(e) = release(node, s.id, Duration::from_secs(3)).await {
            tracing::debug!(snapshot = %s.id, error = %e, "snapshot release deferred");
        }
    }
    // Implicit snapshots whose clone is gone. The snapshot is cut before
    // its clone's volume record is written, so a young one without its
    // volume is a clone still being created, not an abandoned one.
    for s in state.snapshots.values().filter(|s| !s.deleting) {
        if let Some(clone) = s.for_clone {
            if !state.volumes.contains_key(&clone) && now_ms() - s.created_at_ms > ORPHAN_AGE_MS {
                let _ = node.catalog.write(CatalogCommand::Snapshot(SnapshotCommand::Delete { id: s.id })).await;
            }
        }
    }
    // Cuts whose answer was lost; pins the catalog does not know.
    for v in state.volumes.values() {
        let reports = node.catalog.volume_reports(v.id);
        let Some(leader) = reports.values().filter(|r| r.role == Some(ReportedRole::Leader)).max_by_key(|r| r.term)
        else {
            continue;
        };
        for snap in &leader.snapshots {
            match state.snapshots.get(&snap.id) {
                Some(rec) if !rec.ready && !rec.deleting && rec.group.is_none() => {
                    let u = UserSnapshot {
                        id: snap.id,
                        index: snap.index,
                        created_at_ms: snap.created_at_ms,
                        size_bytes: snap.size_bytes,
                        live_blocks: snap.live_blocks,
                    };
                    if let Err(e) = record_cut(node, snap.id, &u).await {
                        warn!(snapshot = %snap.id, error = %e, "recording a cut");
                    }
                }
                Some(_) => {}
                None if now_ms() - snap.created_at_ms > ORPHAN_AGE_MS => {
                    warn!(volume = %v.id, snapshot = %snap.id, "dropping a snapshot pin the catalog does not know");
                    let _ = call_leader(
                        node,
                        v.id,
                        &ControlRequest::DeleteSnapshot { id: snap.id },
                        Duration::from_secs(3),
                    )
                    .await;
                }
                None => {}
            }
        }
    }
}
