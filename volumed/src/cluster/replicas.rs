//! Keeps the replicas hosted here in line with the catalog.
//!
//! - A volume placed on this node gets a running replica. The first node of
//!   a new volume's placement forms its group.
//! - Where this node leads a volume group, it moves the group toward the
//!   catalog: size (resize), fencing generation, membership (rebuilds).
//! - A replica of a deleted volume is stopped and its data dropped. A
//!   replica this node no longer holds in the catalog is dropped once the
//!   group has committed a membership without it — before that it may still
//!   count toward the group's quorum. A stale copy can never serve: it is
//!   not a member, so it cannot lead.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tracing::{error, info, warn, Instrument};

use super::node::NodeRuntime;
use crate::catalog::state::{VolumeKind, VolumeRecord};
use crate::storage::keys::GroupId;
use crate::volume::command::{Hydration, VolumeCommand, BLOCK_SIZE};
use crate::volume::qos::QosLimits;
use crate::volume::replica::VolumeReplica;

pub async fn run(node: Arc<NodeRuntime>) {
    let mut applied = node.catalog.applied_watch();
    let mut shutdown = node.shutdown.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Replicas found on disk at startup. Those no longer placed here are
    // started anyway, so the checks below drop them the safe way; without
    // this a copy left behind while the node was down (its replica moved
    // elsewhere meanwhile) would never be started, and never deleted.
    let mut leftovers = match node.store.stored_groups() {
        Ok(g) => g,
        Err(e) => {
            error!(error = %e, "cannot list the replicas stored on this node");
            Vec::new()
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = applied.changed() => {}
            _ = shutdown.changed() => return,
        }
        reconcile(&node).await;
        if !leftovers.is_empty() {
            adopt_leftovers(&node, &mut leftovers).await;
        }
    }
}

/// Starts stored replicas that are not placed here (the removal checks in
/// `reconcile` then drop them once the group no longer counts this node),
/// and deletes those of volumes the catalog no longer has. The local
/// catalog only moves forward, and a replica gets data only after it showed
/// the placement here: a volume absent from it was deleted.
async fn adopt_leftovers(node: &Arc<NodeRuntime>, leftovers: &mut Vec<GroupId>) {
    for group in std::mem::take(leftovers) {
        if node.replica(group).is_some() {
            continue;
        }
        if node.catalog.read(|s| s.volumes.contains_key(&group.0)) {
            info!(volume = %group, "starting a replica found on disk that is no longer placed here");
            if start_replica(node, group).await.is_none() {
                leftovers.push(group);
            }
        } else {
            drop_replica(node, group, "volume deleted while this node was away").await;
        }
    }
}

async fn reconcile(node: &Arc<NodeRuntime>) {
    let me = node.node_id();
    let volumes: Vec<VolumeRecord> = node.catalog.read(|s| s.volumes.values().cloned().collect());
    let known: HashSet<GroupId> = volumes.iter().map(|v| GroupId(v.id)).collect();
    let addr_of = |id| node.catalog.read(|s| s.nodes.get(&id).map(|n| n.api_addr.clone()));

    for v in volumes.iter().filter(|v| v.placement.contains(&me)) {
        let group = GroupId(v.id);
        let replica = match node.replica(group) {
            Some(r) => r,
            None => match start_replica(node, group).await {
                Some(r) => {
                    let fresh = r.applied_index() == 0 && r.members().is_empty();
                    // Only a brand-new volume's group is formed here; a fresh replica
                    // of an existing volume waits for its leader instead.
                    let young = crate::catalog::service::now_ms() - v.created_at_ms < 120_000;
                    if fresh && young && v.placement.first() == Some(&me) && v.rebuilds.is_empty() {
                        let members: BTreeMap<_, _> =
                            v.placement.iter().map(|n| (*n, BasicNode::new(addr_of(*n).unwrap_or_default()))).collect();
                        info!(volume = %group, ?members, "forming volume group");
                        if let Err(e) = r.initialize(members).await {
                            warn!(volume = %group, error = %e, "cannot form volume group yet");
                        }
                    }
                    r
                }
                None => continue,
            },
        };
        if replica.is_leader() {
            lead(node, &replica, v).await;
        }
    }

    // Replicas that should not be here any more.
    for replica in node.local_replicas() {
        let group = replica.id;
        let placed_here = volumes.iter().any(|v| v.id == group.0 && v.placement.contains(&me));
        if placed_here {
            continue;
        }
        // A leader that is being replaced (its node was removed or its
        // replica moved) must itself drive the group to the new placement:
        // only the leader can change membership, and it stays leader until
        // the change removes it.
        if replica.is_leader() {
            if let Some(v) = volumes.iter().find(|v| v.id == group.0) {
                lead(node, &replica, v).await;
                continue;
            }
        }
        let deleted = !known.contains(&group);
        let removed_from_group = !replica.members().contains(&me) && replica.applied_index() > 0;
        if deleted || removed_from_group || group_dropped_us(node, &replica).await {
            drop_replica(node, group, if deleted { "volume deleted" } else { "replica moved to another node" }).await;
        }
    }
}

async fn start_replica(node: &Arc<NodeRuntime>, group: GroupId) -> Option<Arc<VolumeReplica>> {
    let span = tracing::info_span!("replica", volume = %group);
    match VolumeReplica::start(&node.replica_ctx, group).instrument(span).await {
        Ok(r) => {
            if let Ok(mut m) = node.replicas.write() {
                m.insert(group, r.clone());
            }
            info!(volume = %group, "replica started");
            node.report_now.notify_one();
            Some(r)
        }
        Err(e) => {
            error!(volume = %group, error = %e, "cannot start replica");
            None
        }
    }
}

/// Leader duties: bring the group in line with the catalog record.
async fn lead(node: &Arc<NodeRuntime>, replica: &Arc<VolumeReplica>, v: &VolumeRecord) {
    replica.qos.set(QosLimits::from_parameters(&v.parameters));
    // A restored volume records its source before it gets a size: until
    // then every write is out of range, so none can precede the copy.
    if let Some(src) = v.source.as_ref().filter(|_| !v.hydrated) {
        if replica.meta().hydration.is_none() {
            let h = Hydration {
                source_volume: src.volume,
                source_snapshot: src.snapshot,
                source_index: src.index,
                end_block: match v.kind {
                    VolumeKind::File => crate::volume::hydrate::file_copy_end(),
                    VolumeKind::Block => src.size_bytes / BLOCK_SIZE,
                },
                total_blocks: src.used_bytes / BLOCK_SIZE,
                ..Default::default()
            };
            info!(volume = %replica.id, source = %src.volume, snapshot = %src.snapshot, "starting restore from snapshot");
            node.report_now.notify_one();
            match replica.propose(VolumeCommand::StartHydration(h)).await {
                Ok(r) if r.refused.is_some() => {
                    error!(volume = %replica.id, reason = ?r.refused, "cannot restore into this volume");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(volume = %replica.id, error = %e, "start restore");
                    return;
                }
            }
        }
    }
    if replica.size() < v.size_bytes {
        info!(volume = %replica.id, from = replica.size(), to = v.size_bytes, "resizing");
        if let Err(e) = replica.write_command(VolumeCommand::Resize { size_bytes: v.size_bytes }).await {
            warn!(volume = %replica.id, error = %e, "resize");
        }
        node.report_now.notify_one();
    }
    let want_fence = (v.fence_floor, v.exclusive());
    if replica.fence() != want_fence {
        info!(volume = %replica.id, floor = want_fence.0, exclusive = want_fence.1, "updating fence");
        if let Err(e) =
            replica.write_command(VolumeCommand::SetFence { floor: want_fence.0, exclusive: want_fence.1 }).await
        {
            warn!(volume = %replica.id, error = %e, "fence");
        }
        node.report_now.notify_one();
    }
    if let Some(src) = &v.source {
        if replica.meta().hydrating() && replica.size() >= v.size_bytes {
            let me = node.node_id();
            let mut sources: Vec<_> =
                node.catalog.read(|s| s.volumes.get(&src.volume).map(|sv| sv.placement.clone()).unwrap_or_default());
            // A local replica of the source first: no network on the way.
            sources.sort_by_key(|n| *n != me);
            replica.ensure_hydrating(sources);
        }
    }
    let desired: BTreeMap<_, _> = v
        .placement
        .iter()
        .filter_map(|n| node.catalog.read(|s| s.nodes.get(n).map(|r| (*n, BasicNode::new(&r.api_addr)))))
        .collect();
    replica.converge_membership(&desired).await;
}

/// Asks the other members whether the group still counts this node.
async fn group_dropped_us(node: &Arc<NodeRuntime>, replica: &Arc<VolumeReplica>) -> bool {
    let me = node.node_id();
    let placement: Vec<_> =
        node.catalog.read(|s| s.volumes.get(&replica.id.0).map(|v| v.placement.clone()).unwrap_or_default());
    for peer in placement.into_iter().filter(|p| *p != me) {
        if let Some(report) = super::control::remote_status(node, peer, replica.id).await {
            if report.role == Some(crate::volume::replica::ReportedRole::Leader) {
                return !report.voters.contains(&me) && !report.learners.contains(&me);
            }
        }
    }
    false
}

async fn drop_replica(node: &Arc<NodeRuntime>, group: GroupId, why: &str) {
    let replica = node.replicas.write().ok().and_then(|mut m| m.remove(&group));
    if let Some(r) = replica {
        r.shutdown().await;
    }
    match node.store.delete_group(group) {
        Ok(()) => info!(volume = %group, reason = why, "replica dropped and its data deleted"),
        Err(e) => error!(volume = %group, error = %e, "could not delete replica data"),
    }
    node.report_now.notify_one();
}

/// Wipes a replica whose Raft stopped on an unrecoverable error so it is
/// rebuilt from the leader (called by the heartbeat loop when it sees one).
pub async fn rebuild_failed(node: &Arc<NodeRuntime>, group: GroupId, why: &str) {
    warn!(volume = %group, reason = why, "replica failed; wiping it to rebuild from the leader");
    drop_replica(node, group, why).await;
}
