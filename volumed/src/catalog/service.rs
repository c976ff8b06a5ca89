//! The catalog as it runs on a node: its Raft instance, writes that find
//! the leader wherever it is, node liveness from heartbeats, and the
//! reconciler that keeps every volume at its replica count.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;
use volumed_proto::volumed::v1::RaftMessage;

use super::placement::{self, PlacementRequest};
use super::state::{CatalogCommand, CatalogError, CatalogResponse, CatalogState, NodeRecord};
use super::store::{CatalogSnapshotSource, CatalogStateMachine, CatalogTc, PersistedCatalog};
use crate::raft::network::{GroupNetworkFactory, LeaderAcks, PeerPool};
use crate::raft::{catalog_config, CATALOG_READ_LEASE};
use crate::storage::keys::GroupId;
use crate::storage::log_store::{LogStore, NodeId};
use crate::storage::{decode, encode, Store};
use crate::volume::replica::{ReplicaReport, ReportedRole};

#[derive(Debug, thiserror::Error)]
pub enum CatalogWriteError {
    /// The command was applied and refused (business rule).
    #[error(transparent)]
    Rejected(#[from] CatalogError),
    /// No leader could be reached in time.
    #[error("the catalog has no reachable leader ({0}); is a majority of catalog voters up?")]
    NoLeader(String),
    #[error("catalog: {0}")]
    Internal(String),
}

/// Timing of liveness decisions.
#[derive(Debug, Clone, Copy)]
pub struct LivenessConfig {
    /// Heartbeat period of every node.
    pub heartbeat: Duration,
    /// A node silent this long is "suspect": no new replicas go there.
    pub suspect_after: Duration,
    /// A node silent this long is "down": its replicas are re-created
    /// elsewhere.
    pub down_after: Duration,
    /// Voters wanted in the catalog group (3 or 5).
    pub catalog_voters: usize,
}

/// What a node last told the catalog leader.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub at: Instant,
    pub capacity_bytes: u64,
    pub disk_free_bytes: u64,
    pub crc_repairs: u64,
    pub replicas: Vec<ReplicaReport>,
    /// Volumes attached on the node and their device state.
    pub attachments: Vec<crate::attach::AttachmentReport>,
}

pub struct Catalog {
    pub raft: Raft<CatalogTc>,
    pub node_id: NodeId,
    shared: Arc<RwLock<PersistedCatalog>>,
    applied: watch::Receiver<u64>,
    pool: Arc<PeerPool>,
    liveness: LivenessConfig,
    reports: Mutex<HashMap<NodeId, NodeReport>>,
    /// When this node last became catalog leader: liveness counts from
    /// here for nodes it has not heard from yet.
    leader_since: Mutex<Option<Instant>>,
    /// Followers' acknowledgements of this node's leadership (read lease).
    acks: Arc<LeaderAcks>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Catalog {
    pub async fn start(
        store: Arc<Store>,
        pool: Arc<PeerPool>,
        node_id: NodeId,
        liveness: LivenessConfig,
    ) -> Result<Arc<Catalog>, CatalogWriteError> {
        let (sm, shared, applied) =
            CatalogStateMachine::open(store.clone()).map_err(|e| CatalogWriteError::Internal(e.to_string()))?;
        let config = catalog_config("volumed").map_err(|e| CatalogWriteError::Internal(e.to_string()))?;
        let network =
            GroupNetworkFactory::<CatalogTc>::new(GroupId::CATALOG, pool.clone(), Arc::new(CatalogSnapshotSource));
        let acks = network.acks();
        let log = LogStore::<CatalogTc>::new(store, GroupId::CATALOG);
        let raft = Raft::new(node_id, config, network, log, sm)
            .await
            .map_err(|e| CatalogWriteError::Internal(e.to_string()))?;
        let catalog = Arc::new(Catalog {
            raft,
            node_id,
            shared,
            applied,
            pool,
            liveness,
            reports: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            acks,
        });
        catalog.refresh_peer_addrs();
        Ok(catalog)
    }

    /// Reads the local copy of the catalog.
    pub fn read<T>(&self, f: impl FnOnce(&CatalogState) -> T) -> T {
        match self.shared.read() {
            Ok(g) => f(&g.state),
            Err(p) => f(&p.into_inner().state),
        }
    }

    pub fn cluster_id(&self) -> Option<Uuid> {
        self.read(|s| s.cluster_id)
    }

    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The catalog leader as this node knows it; `None` while there is none
    /// or while the known one is no longer a voter (a leader the operator
    /// removed keeps heartbeating until it steps down, but it can never
    /// confirm a quorum again, so asking it would only time out).
    pub fn leader(&self) -> Option<NodeId> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.current_leader.filter(|l| m.membership_config.membership().voter_ids().any(|v| v == *l))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Whether this node still leads the catalog, so that it may answer
    /// reads from its own state and reports. A leader that was cut off or
    /// frozen still believes it leads until it hears of the next term, and
    /// would meanwhile answer with a stale view (a volume leader that is
    /// long gone, say). So: a quorum acknowledged it within the read lease,
    /// or it gets one now.
    pub async fn confirm_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return false;
        }
        // Acknowledgements timed here, not the metrics' (see `LeaderAcks`):
        // those are as old as the last report, which a frozen node missed.
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        if voters.len() <= 1 || self.acks.quorum_within(self.node_id, &m.vote, &voters, CATALOG_READ_LEASE) {
            return true;
        }
        matches!(tokio::time::timeout(Duration::from_secs(2), self.raft.ensure_linearizable()).await, Ok(Ok(_)))
    }

    /// Teaches the peer pool every node's current address.
    pub fn refresh_peer_addrs(&self) {
        let nodes: Vec<(NodeId, String)> =
            self.read(|s| s.nodes.values().map(|n| (n.id, n.api_addr.clone())).collect());
        for (id, addr) in nodes {
            self.pool.set_addr(id, &addr);
        }
    }

    /// Proposes a command through whichever node leads, retrying while an
    /// election is under way.
    pub async fn write(&self, cmd: CatalogCommand) -> Result<CatalogResponse, CatalogWriteError> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last_err = String::from("no leader elected yet");
        loop {
            let leader = self.leader();
            let attempt = match leader {
                Some(l) if l == self.node_id => self.write_local(cmd.clone()).await,
                Some(l) => self.forward(l, &cmd).await,
                None => Err(last_err.clone()),
            };
            match attempt {
                Ok(CatalogResponse::Error(e)) => return Err(CatalogWriteError::Rejected(e)),
                Ok(resp) => return Ok(resp),
                Err(e) => last_err = e,
            }
            if Instant::now() >= deadline {
                return Err(CatalogWriteError::NoLeader(last_err));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Applies a command on this node if it leads; the error string says
    /// why not (the caller retries or forwards).
    pub async fn write_local(&self, cmd: CatalogCommand) -> Result<CatalogResponse, String> {
        match self.raft.client_write(cmd).await {
            Ok(r) => {
                self.refresh_peer_addrs();
                Ok(r.data)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(format!("node {} is not the catalog leader (leader: {:?})", self.node_id, f.leader_id))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn forward(&self, leader: NodeId, cmd: &CatalogCommand) -> Result<CatalogResponse, String> {
        let mut client = self.pool.client(leader, None).map_err(|e| e.to_string())?;
        let payload = encode(cmd).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(RaftMessage {
            group_id: Bytes::copy_from_slice(GroupId::CATALOG.as_bytes()),
            payload: Bytes::from(payload),
        });
        req.set_timeout(Duration::from_secs(10));
        let reply =
            client.catalog_write(req).await.map_err(|s| format!("forward to node {leader}: {}", s.message()))?;
        let result: Result<CatalogResponse, String> =
            decode("catalog write reply", &reply.into_inner().payload).map_err(|e| e.to_string())?;
        if result.is_ok() {
            // Wait until our own copy has the change, so a read that follows
            // on this node sees it.
            let target = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            let _ = self.wait_applied(target, Duration::from_secs(2)).await;
        }
        result
    }

    /// Waits until the local state machine applied `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.clone();
        tokio::time::timeout(timeout, async {
            loop {
                if *rx.borrow_and_update() >= index {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Records a node's heartbeat (catalog leader only).
    pub fn record_heartbeat(&self, node: NodeId, report: NodeReport) {
        if let Ok(mut m) = self.reports.lock() {
            m.insert(node, report);
        }
    }

    pub fn report_of(&self, node: NodeId) -> Option<NodeReport> {
        self.reports.lock().ok().and_then(|m| m.get(&node).cloned())
    }

    /// Latest reports of one volume's replicas, by node.
    pub fn volume_reports(&self, volume: Uuid) -> BTreeMap<NodeId, ReplicaReport> {
        let Ok(m) = self.reports.lock() else { return BTreeMap::new() };
        let fresh = self.liveness.suspect_after;
        m.iter()
            .filter(|(_, r)| r.at.elapsed() < fresh)
            .filter_map(|(n, r)| r.replicas.iter().find(|x| x.volume == volume).map(|x| (*n, x.clone())))
            .collect()
    }

    /// Fresh reports of nodes that have `volume` attached, by node.
    pub fn attachment_reports(&self, volume: Uuid) -> BTreeMap<NodeId, crate::attach::AttachmentReport> {
        let Ok(m) = self.reports.lock() else { return BTreeMap::new() };
        let fresh = self.liveness.suspect_after;
        m.iter()
            .filter(|(_, r)| r.at.elapsed() < fresh)
            .filter_map(|(n, r)| r.attachments.iter().find(|a| a.volume == volume).map(|a| (*n, a.clone())))
            .collect()
    }

    /// How long since `node` was last heard from (leader's view).
    pub fn silence(&self, node: NodeId) -> Duration {
        if node == self.node_id {
            return Duration::ZERO;
        }
        let since = self.leader_since.lock().ok().and_then(|g| *g);
        let last = self.reports.lock().ok().and_then(|m| m.get(&node).map(|r| r.at));
        match (last, since) {
            (Some(l), Some(s)) => l.max(s).elapsed(),
            (Some(l), None) => l.elapsed(),
            (None, Some(s)) => s.elapsed(),
            (None, None) => Duration::MAX,
        }
    }

    pub fn live_nodes(&self) -> BTreeSet<NodeId> {
        let ids: Vec<NodeId> = self.read(|s| s.nodes.keys().copied().collect());
        ids.into_iter().filter(|n| self.silence(*n) < self.liveness.suspect_after).collect()
    }

    pub fn liveness(&self) -> LivenessConfig {
        self.liveness
    }

    /// The leader's reconcile loop; runs on every node, acts only while this
    /// node leads the catalog.
    pub async fn run_reconciler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if !self.is_leader() {
                if let Ok(mut g) = self.leader_since.lock() {
                    *g = None;
                }
                continue;
            }
            if let Ok(mut g) = self.leader_since.lock() {
                g.get_or_insert_with(Instant::now);
            }
            if let Err(e) = self.reconcile_once().await {
                debug!(error = %e, "catalog reconcile");
            }
        }
    }

    async fn reconcile_once(&self) -> Result<(), CatalogWriteError> {
        let state = self.read(|s| s.clone());
        // 1. Liveness: mark nodes down after the grace period, up again when
        // they come back.
        for n in state.nodes.values().filter(|n| !n.removed) {
            let silent = self.silence(n.id);
            if !n.down && silent >= self.liveness.down_after {
                warn!(node = n.id, name = %n.name, silent_s = silent.as_secs(), "node down: re-creating its replicas elsewhere");
                self.write(CatalogCommand::SetNodeDown { node: n.id, down: true }).await?;
            } else if n.down && silent < self.liveness.suspect_after {
                info!(node = n.id, name = %n.name, "node is back");
                self.write(CatalogCommand::SetNodeDown { node: n.id, down: false }).await?;
            }
        }
        let state = self.read(|s| s.clone());
        let live = self.live_nodes();
        // 2. Volumes: replace replicas on down or removed nodes; close
        // finished rebuilds.
        for v in state.volumes.values() {
            for &n in &v.placement {
                let gone = state.nodes.get(&n).is_none_or(|r| r.down || r.removed);
                if !gone {
                    continue;
                }
                let exclude: BTreeSet<NodeId> = v.placement.iter().copied().collect();
                let used_zones = v
                    .placement
                    .iter()
                    .filter(|p| **p != n)
                    .filter_map(|p| state.nodes.get(p).and_then(|r| placement::zone_of(&r.labels).map(str::to_string)))
                    .collect();
                let req = PlacementRequest {
                    size_bytes: v.size_bytes,
                    count: 1,
                    constraints: &v.constraints,
                    exclude: &exclude,
                    used_zones,
                };
                match placement::place(&state, &live, &req) {
                    Ok(new) => {
                        let Some(&new) = new.first() else { continue };
                        info!(volume = %v.id, name = %v.name, old = n, new, "replacing replica");
                        self.write(CatalogCommand::ReplaceReplica { id: v.id, old: n, new, now_ms: now_ms() }).await?;
                    }
                    Err(e) => warn!(volume = %v.id, name = %v.name, node = n, error = %e, "cannot replace replica"),
                }
                break; // one replacement per volume per round
            }
            for r in &v.rebuilds {
                let reports = self.volume_reports(v.id);
                let done = reports.values().any(|rep| {
                    rep.role == Some(ReportedRole::Leader)
                        && rep.voters.contains(&r.by)
                        && !rep.voters.contains(&r.replaced)
                        && !rep.transfers.iter().any(|(n, _, _)| *n == r.by)
                });
                if done {
                    info!(volume = %v.id, node = r.by, "rebuild complete");
                    self.write(CatalogCommand::FinishRebuild { id: v.id, node: r.by }).await?;
                }
            }
        }
        // 3. The catalog group's own membership.
        self.reconcile_catalog_membership(&state, &live).await;
        Ok(())
    }

    async fn reconcile_catalog_membership(&self, state: &CatalogState, live: &BTreeSet<NodeId>) {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return;
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        // New nodes follow the catalog as learners.
        if let Some(n) = state.nodes.values().find(|n| !n.removed && !members.contains(&n.id)) {
            info!(node = n.id, "adding node to the catalog group as learner");
            if let Err(e) = self.raft.add_learner(n.id, BasicNode::new(&n.api_addr), false).await {
                debug!(node = n.id, error = %e, "add catalog learner");
            }
            return;
        }
        let replication = m.replication.clone().unwrap_or_default();
        let last = m.last_log_index.unwrap_or(0);
        let caught_up =
            |n: &NodeId| replication.get(n).and_then(|l| l.map(|l| l.index)).is_some_and(|i| i + 16 >= last);
        let healthy = |n: &NodeId| {
            state.nodes.get(n).is_some_and(|r| !r.removed && !r.down) && (live.contains(n) || *n == self.node_id)
        };
        let mut spares: Vec<NodeId> =
            state.nodes.values().map(|n| n.id).filter(|n| !voters.contains(n) && healthy(n) && caught_up(n)).collect();
        let mut want = voters.clone();
        // A dead voter is swapped for a live, caught-up spare; without a
        // spare it stays (dropping it would not make the group any more
        // available). A voter the operator removed leaves regardless.
        for v in &voters {
            if healthy(v) {
                continue;
            }
            let removed = state.nodes.get(v).is_none_or(|r| r.removed);
            if let Some(s) = spares.pop() {
                want.remove(v);
                want.insert(s);
            } else if removed && want.len() > 1 {
                want.remove(v);
            }
        }
        while want.len() < self.liveness.catalog_voters {
            let Some(s) = spares.pop() else { break };
            want.insert(s);
        }
        // An even voter count tolerates no more failures than one less.
        if want.len().is_multiple_of(2) && want.len() > voters.len() {
            if let Some(&extra) = want.iter().rev().find(|n| !voters.contains(n)) {
                want.remove(&extra);
            }
        }
        if want != voters && !want.is_empty() {
            info!(?voters, ?want, "changing catalog voters");
            if let Err(e) = self.raft.change_membership(ChangeMembers::ReplaceAllVoters(want), true).await {
                debug!(error = %e, "catalog voter change");
            }
            return;
        }
        let removed: BTreeSet<NodeId> = members
            .iter()
            .copied()
            .filter(|n| !voters.contains(n) && state.nodes.get(n).is_none_or(|r| r.removed))
            .collect();
        if !removed.is_empty() {
            info!(?removed, "removing nodes from the catalog group");
            if let Err(e) = self.raft.change_membership(ChangeMembers::RemoveNodes(removed), false).await {
                debug!(error = %e, "catalog remove nodes");
            }
        }
    }

    /// Nodes known to the catalog.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.read(|s| s.nodes.values().cloned().collect())
    }
}
