//! One volume replica hosted on this node: its Raft instance and the I/O
//! paths the NBD server calls when this replica leads.
//!
//! Writes are batched: concurrent requests queue in a proposer that packs
//! them into one log entry (up to 1 MiB), with a few entries in flight at
//! once, so a queue depth of 32 costs a handful of Raft round trips rather
//! than 32. Reads are served from the leader's state machine under a leader
//! lease (see `raft::VOLUME_READ_LEASE`), falling back to a Raft read-index
//! round when the lease cannot be confirmed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedRwLockWriteGuard, RwLock, Semaphore};
use tracing::{debug, info, warn, Instrument};
use volumed_nbd::BlockError;
use volumed_proto::volumed::v1::FetchBlockRequest;

use super::blocks::{decode_value, encode_value, BlockReadError, BlockStore, Stored, BS};
use super::command::{
    Hydration, IoKind, IoOp, OpResult, UserSnapshot, VolumeCommand, VolumeResponse, VolumeTc, BLOCK_SIZE,
    MAX_ENTRY_BYTES,
};
use super::qos::{Direction, Qos};
use super::snapshot::{TransferProgress, VolumeSnapshotSource};
use super::state_machine::{lock, BlockFetcher, ReplicaCounters, SmShared, VolumeMeta, VolumeStateMachine};
use crate::raft::network::{GroupNetworkFactory, LeaderAcks, PeerPool};
use crate::raft::{role_of, volume_config, Role, VOLUME_READ_LEASE};
use crate::storage::keys::GroupId;
use crate::storage::log_store::{EntryCache, LogStore, NodeId};
use crate::storage::Store;

/// Largest NBD request we accept (the NBD server enforces the same).
pub const MAX_IO: u32 = 32 << 20;

/// Proposals in flight per replica. More lets the proposer keep the Raft
/// pipeline full; fewer makes each entry carry more requests.
const MAX_PROPOSALS_IN_FLIGHT: usize = 2;
const MAX_OPS_PER_ENTRY: usize = 256;
/// Appended-but-unapplied entries a replica keeps decoded in memory (see
/// `EntryCache`): a few entries in flight is the usual lag; more than this
/// means the state machine is stuck and RocksDB serves the reads.
const LOG_CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("volume {volume}: storage: {detail}")]
    Storage { volume: GroupId, detail: String },
    #[error("volume {volume}: raft: {detail}")]
    Raft { volume: GroupId, detail: String },
}

/// Everything a replica needs from its node.
#[derive(Clone)]
pub struct ReplicaContext {
    pub node_id: NodeId,
    pub store: Arc<Store>,
    pub pool: Arc<PeerPool>,
    pub snap_dir: PathBuf,
    /// Bytes per second per snapshot sent to a peer; 0 = unlimited.
    pub rebuild_bandwidth: u64,
}

/// A status line of this replica, sent with heartbeats to the catalog
/// leader (which answers `GetVolume` from it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplicaReport {
    pub volume: uuid::Uuid,
    pub role: Option<ReportedRole>,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub size_bytes: u64,
    pub fence_floor: u64,
    pub exclusive: bool,
    pub live_blocks: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Leader only: matched log index per member.
    pub matched: BTreeMap<NodeId, u64>,
    /// Leader only: snapshot transfers in progress (node, bytes done, total).
    pub transfers: Vec<(NodeId, u64, u64)>,
    pub crc_repairs: u64,
    pub crc_unrepairable: u64,
    /// Set when the replica's Raft stopped on an error.
    pub fatal: Option<String>,
    /// User snapshots of the volume, with their space.
    pub snapshots: Vec<SnapshotReport>,
    /// Stored data blocks that are not current content (held by snapshots).
    pub held_blocks: u64,
    /// Next block of a running sweep (space numbers are as of its start).
    pub sweep_cursor: Option<u64>,
    /// Data blocks dropped by sweeps on this replica, ever / the last one.
    pub reclaimed_blocks: u64,
    pub last_sweep_freed_blocks: u64,
    /// A restore into this volume, with its progress.
    pub hydration: Option<Hydration>,
}

/// One user snapshot in a replica report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    pub id: uuid::Uuid,
    pub index: u64,
    pub created_at_ms: i64,
    pub size_bytes: u64,
    pub live_blocks: u64,
    /// Data blocks only this snapshot reads (freed by deleting it).
    pub exclusive_blocks: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ReportedRole {
    Leader,
    Follower,
    Learner,
    Candidate,
    Shutdown,
}

impl From<Role> for ReportedRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Leader => ReportedRole::Leader,
            Role::Follower => ReportedRole::Follower,
            Role::Learner => ReportedRole::Learner,
            Role::Candidate => ReportedRole::Candidate,
            Role::Shutdown => ReportedRole::Shutdown,
        }
    }
}

struct Proposal {
    op: IoOp,
    done: oneshot::Sender<Result<OpResult, BlockError>>,
}

pub struct VolumeReplica {
    pub id: GroupId,
    pub node_id: NodeId,
    pub raft: Raft<VolumeTc>,
    shared: Arc<Mutex<SmShared>>,
    size: Arc<AtomicU64>,
    blocks: BlockStore,
    pub counters: Arc<ReplicaCounters>,
    pub progress: Arc<TransferProgress>,
    proposals: mpsc::Sender<Proposal>,
    pool: Arc<PeerPool>,
    pub snap_dir: PathBuf,
    /// I/O limits from the volume's `qos.*` parameters (set by the replica
    /// manager while this replica leads).
    pub qos: Qos,
    /// Rounds spent compacting the log before adding a new member (see
    /// `log_compacted_for_new_member`).
    compaction_rounds: AtomicU32,
    /// Followers' acknowledgements of this node's leadership (read lease).
    acks: Arc<LeaderAcks>,
    /// Writes hold it shared from admission to completion; a write barrier
    /// (group snapshots) holds it exclusively.
    gate: Arc<RwLock<()>>,
    barriers: Mutex<HashMap<u64, Barrier>>,
    /// The copy task while this volume is restored from a snapshot.
    hydrator: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A write barrier held on the leader (see [`VolumeReplica::barrier`]).
struct Barrier {
    term: u64,
    _guard: OwnedRwLockWriteGuard<()>,
    expiry: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("node {node} does not lead volume {volume}")]
    NotLeader { node: NodeId, volume: GroupId },
    #[error("volume {volume}: {detail}")]
    Refused { volume: GroupId, detail: String },
    #[error("volume {volume}: in-flight writes did not finish within {waited:?}")]
    BarrierTimeout { volume: GroupId, waited: Duration },
    #[error("volume {volume}: the write barrier {token} is gone (expired or leadership changed)")]
    BarrierLost { volume: GroupId, token: u64 },
    #[error("volume {volume}: {detail}")]
    Raft { volume: GroupId, detail: String },
}
/// Fetches block copies from the other members of the group.
struct PeerFetcher {
    group: GroupId,
    node_id: NodeId,
    pool: Arc<PeerPool>,
    shared: Arc<Mutex<Option<Arc<Mutex<SmShared>>>>>,
}

impl BlockFetcher for PeerFetcher {
    fn fetch(&self, block: u64, version: u64) -> BoxFuture<'static, Result<Stored, String>> {
        let members: Vec<NodeId> = match self.shared.lock().ok().and_then(|g| g.clone()) {
            Some(s) => lock(&s).members(),
            None => Vec::new(),
        };
        let group = self.group;
        let me = self.node_id;
        let pool = self.pool.clone();
        Box::pin(async move { fetch_from_peers(&pool, group, me, &members, block, version).await })
    }
}

pub async fn fetch_from_peers(
    pool: &PeerPool,
    group: GroupId,
    me: NodeId,
    members: &[NodeId],
    block: u64,
    version: u64,
) -> Result<Stored, String> {
    let mut errors = Vec::new();
    for &peer in members.iter().filter(|n| **n != me) {
        let mut client = match pool.client(peer, None) {
            Ok(c) => c,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        let mut req = tonic::Request::new(FetchBlockRequest {
            group_id: Bytes::copy_from_slice(group.as_bytes()),
            block,
            version,
        });
        req.set_timeout(Duration::from_secs(5));
        match client.fetch_block(req).await {
            Ok(r) => {
                let r = r.into_inner();
                if !r.found {
                    errors.push(format!("node {peer}: no good copy"));
                    continue;
                }
                match decode_value(&r.data) {
                    Some(s) => return Ok(s),
                    None => errors.push(format!("node {peer}: copy failed its checksum in transit")),
                }
            }
            Err(e) => errors.push(format!("node {peer}: {e}")),
        }
    }
    Err(if errors.is_empty() { "no other replica".to_string() } else { errors.join("; ") })
}

fn unavailable(e: impl std::fmt::Display) -> BlockError {
    BlockError::Unavailable(e.to_string())
}

impl VolumeReplica {
    /// Opens the replica's storage and starts its Raft instance. A fresh
    /// replica starts empty and waits to be initialised or to receive a
    /// snapshot from the group's leader.
    pub async fn start(ctx: &ReplicaContext, id: GroupId) -> Result<Arc<VolumeReplica>, ReplicaError> {
        let counters = Arc::new(ReplicaCounters::default());
        let shared_slot: Arc<Mutex<Option<Arc<Mutex<SmShared>>>>> = Arc::new(Mutex::new(None));
        let fetcher = Arc::new(PeerFetcher {
            group: id,
            node_id: ctx.node_id,
            pool: ctx.pool.clone(),
            shared: shared_slot.clone(),
        });
        let log_cache = EntryCache::new(LOG_CACHE_BYTES);
        let (sm, shared, size) = VolumeStateMachine::open(
            ctx.store.clone(),
            id,
            ctx.snap_dir.clone(),
            fetcher,
            counters.clone(),
            log_cache.clone(),
        )
        .map_err(|e| ReplicaError::Storage { volume: id, detail: e.to_string() })?;
        if let Ok(mut slot) = shared_slot.lock() {
            *slot = Some(shared.clone());
        }
        let blocks = BlockStore::new(ctx.store.clone(), id);
        let progress = Arc::new(TransferProgress::default());
        let source = Arc::new(VolumeSnapshotSource {
            blocks: blocks.clone(),
            shared: shared.clone(),
            progress: progress.clone(),
            bandwidth: ctx.rebuild_bandwidth,
        });
        let network = GroupNetworkFactory::<VolumeTc>::new(id, ctx.pool.clone(), source);
        let acks = network.acks();
        let config =
            volume_config(&id.to_string()).map_err(|e| ReplicaError::Raft { volume: id, detail: e.to_string() })?;
        let log = LogStore::<VolumeTc>::with_cache(ctx.store.clone(), id, log_cache);
        let raft = Raft::new(ctx.node_id, config, network, log, sm)
            .await
            .map_err(|e| ReplicaError::Raft { volume: id, detail: e.to_string() })?;
        let (tx, rx) = mpsc::channel(4096);
        let replica = Arc::new(VolumeReplica {
            id,
            node_id: ctx.node_id,
            raft: raft.clone(),
            shared,
            size,
            blocks,
            counters,
            progress,
            proposals: tx,
            pool: ctx.pool.clone(),
            snap_dir: ctx.snap_dir.clone(),
            qos: Qos::default(),
            compaction_rounds: AtomicU32::new(0),
            acks,
            gate: Arc::new(RwLock::new(())),
            barriers: Mutex::new(HashMap::new()),
            hydrator: Mutex::new(None),
        });
        tokio::spawn(run_proposer(raft, rx).instrument(tracing::info_span!("proposer", volume = %id)));
        tokio::spawn(
            super::sweep::run(replica.blocks.clone(), replica.shared.clone())
                .instrument(tracing::info_span!("sweeper", volume = %id)),
        );
        Ok(replica)
    }

    /// Forms a new group with `members` as voters (called on one node only).
    pub async fn initialize(&self, members: BTreeMap<NodeId, BasicNode>) -> Result<(), ReplicaError> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ReplicaError::Raft { volume: self.id, detail: e.to_string() }),
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn members(&self) -> Vec<NodeId> {
        lock(&self.shared).members()
    }

    /// Whether the state machine already holds the volume's initial state.
    pub fn applied_index(&self) -> u64 {
        lock(&self.shared).last_applied.map(|l| l.index).unwrap_or(0)
    }

    pub fn fence(&self) -> (u64, bool) {
        let s = lock(&self.shared);
        (s.meta.fence_floor, s.meta.exclusive)
    }

    /// Whether the leader may answer a read from its own state machine.
    fn lease_valid(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return false;
        }
        // Everything committed by earlier leaders is applied once an entry
        // of our own term is (the blank entry a new leader commits first).
        if m.last_applied.map(|l| l.leader_id.term) != Some(m.current_term) {
            return false;
        }
        // The lease counts from acknowledgements timed here, not from the
        // metrics' `millis_since_quorum_ack` (see `LeaderAcks`).
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        voters.len() <= 1 || self.acks.quorum_within(self.node_id, &m.vote, &voters, VOLUME_READ_LEASE)
    }

    pub(crate) async fn ensure_readable(&self) -> Result<(), BlockError> {
        if self.lease_valid() {
            return Ok(());
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(e) => Err(unavailable(format!("volume {}: {e}", self.id))),
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        if len == 0 || len > MAX_IO {
            return Err(BlockError::Invalid(format!("read length {len}")));
        }
        self.ensure_readable().await?;
        self.refuse_while_hydrating()?;
        self.qos.acquire(Direction::Read, len as u64).await;
        let end = offset.checked_add(len as u64).ok_or(BlockError::OutOfRange)?;
        if end > self.size() {
            return Err(BlockError::OutOfRange);
        }
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let buf = self.read_blocks(first, last - first + 1).await?;
        let start = (offset - first * BLOCK_SIZE) as usize;
        Ok(buf.freeze().slice(start..start + len as usize))
    }

    /// The current content of blocks `first..first+count` (of a block
    /// volume, or a file volume's data blocks), verified: a block whose
    /// checksum fails is repaired from a peer before it is returned.
    pub(crate) async fn read_blocks(&self, first: u64, count: u64) -> Result<BytesMut, BlockError> {
        let mut buf = BytesMut::zeroed((count as usize) * BS);
        let corrupt = self.blocks.read_range_into(first, count, &mut buf).map_err(|e| BlockError::Io(e.to_string()))?;
        for (block, version) in corrupt {
            if let Stored::Data(d) = self.repair_for_read(block, version).await? {
                let slot = (block - first) as usize * BS;
                let n = d.len().min(BS);
                buf[slot..slot + n].copy_from_slice(&d[..n]);
            }
        }
        Ok(buf)
    }

    pub(crate) async fn repair_for_read(&self, block: u64, version: u64) -> Result<Stored, BlockError> {
        let members = self.members();
        match fetch_from_peers(&self.pool, self.id, self.node_id, &members, block, version).await {
            Ok(content) => {
                self.blocks.repair(block, version, &content).map_err(|e| BlockError::Io(e.to_string()))?;
                self.counters.crc_repairs.fetch_add(1, Ordering::Relaxed);
                info!(volume = %self.id, block, version, "checksum mismatch repaired from a peer");
                Ok(content)
            }
            Err(e) => {
                self.counters.crc_unrepairable.fetch_add(1, Ordering::Relaxed);
                warn!(volume = %self.id, block, version, error = %e, "checksum mismatch and no good copy");
                Err(BlockError::Io(format!("block {block} is corrupt on every reachable replica")))
            }
        }
    }

    /// Submits one write/zero op; large writes are split across entries.
    pub async fn submit(&self, generation: Option<u64>, fua: bool, kind: IoKind) -> Result<(), BlockError> {
        if !self.is_leader() {
            return Err(unavailable(format!("node {} does not lead volume {}", self.node_id, self.id)));
        }
        let bytes = match &kind {
            IoKind::Write { data, .. } => data.len() as u64,
            // Zeroing stores nothing: it counts as one operation.
            IoKind::Zero { .. } => 0,
        };
        self.refuse_while_hydrating()?;
        self.qos.acquire(Direction::Write, bytes).await;
        // Held until the write completes: a barrier waits for it, and
        // writes arriving after a barrier wait for its release.
        let _admitted = self.gate.clone().read_owned().await;
        let ops: Vec<IoOp> = match kind {
            IoKind::Write { offset, data } if data.len() > MAX_ENTRY_BYTES => {
                let mut ops = Vec::new();
                let mut pos = 0;
                while pos < data.len() {
                    let n = MAX_ENTRY_BYTES.min(data.len() - pos);
                    ops.push(IoOp {
                        generation,
                        fua,
                        kind: IoKind::Write { offset: offset + pos as u64, data: data.slice(pos..pos + n) },
                    });
                    pos += n;
                }
                ops
            }
            kind => vec![IoOp { generation, fua, kind }],
        };
        let mut waits = Vec::with_capacity(ops.len());
        for op in ops {
            let (done, rx) = oneshot::channel();
            self.proposals.send(Proposal { op, done }).await.map_err(|_| unavailable("replica stopping"))?;
            waits.push(rx);
        }
        for rx in waits {
            match rx.await.map_err(|_| unavailable("replica stopping"))?? {
                OpResult::Ok => {}
                OpResult::Fenced => {
                    return Err(BlockError::Fenced(format!(
                        "volume {} is attached elsewhere with a newer generation (this writer: {:?})",
                        self.id, generation
                    )))
                }
                OpResult::OutOfRange => return Err(BlockError::OutOfRange),
                OpResult::Corrupt => return Err(BlockError::Io("a block of the write is corrupt".into())),
            }
        }
        Ok(())
    }

    /// Returns once every write acknowledged before it is durable on a
    /// majority (the Flush entry is fsynced wherever it is stored).
    pub async fn flush(&self) -> Result<(), BlockError> {
        self.write_command(VolumeCommand::Flush).await.map(|_| ())
    }

    pub async fn write_command(&self, cmd: VolumeCommand) -> Result<(), BlockError> {
        self.propose(cmd).await.map(|_| ())
    }

    /// Proposes a command and returns the state machine's answer.
    pub async fn propose(&self, cmd: VolumeCommand) -> Result<VolumeResponse, BlockError> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(e) => Err(unavailable(format!("volume {}: {e}", self.id))),
        }
    }

    pub(crate) fn refuse_while_hydrating(&self) -> Result<(), BlockError> {
        let s = lock(&self.shared);
        match &s.meta.hydration {
            Some(h) if !h.finished => Err(unavailable(format!(
                "volume {} is being restored from snapshot {}: {} of {} blocks copied",
                self.id, h.source_snapshot, h.copied_blocks, h.total_blocks
            ))),
            _ => Ok(()),
        }
    }

    /// The replicated metadata as applied here.
    pub fn meta(&self) -> VolumeMeta {
        lock(&self.shared).meta.clone()
    }

    pub fn blocks(&self) -> &BlockStore {
        &self.blocks
    }

    /// Leader only: takes a user snapshot at the next log index. With
    /// `barrier`, the snapshot must be cut under that write barrier, in
    /// the term it was raised in (a leader change in between could have
    /// admitted writes the barrier was meant to hold back).
    pub async fn create_snapshot(
        &self,
        id: uuid::Uuid,
        created_at_ms: i64,
        barrier: Option<u64>,
    ) -> Result<UserSnapshot, SnapshotError> {
        if !self.is_leader() {
            return Err(SnapshotError::NotLeader { node: self.node_id, volume: self.id });
        }
        let term = match barrier {
            Some(token) => Some(self.barrier_term(token).ok_or(SnapshotError::BarrierLost { volume: self.id, token })?),
            None => None,
        };
        let r = match self.raft.client_write(VolumeCommand::CreateSnapshot { id, created_at_ms }).await {
            Ok(r) => r,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                return Err(SnapshotError::NotLeader { node: self.node_id, volume: self.id })
            }
            Err(e) => return Err(SnapshotError::Raft { volume: self.id, detail: e.to_string() }),
        };
        if let (Some(term), Some(token)) = (term, barrier) {
            if r.log_id.leader_id.term != term || self.barrier_term(token) != Some(term) {
                return Err(SnapshotError::BarrierLost { volume: self.id, token });
            }
        }
        if let Some(why) = r.data.refused {
            return Err(SnapshotError::Refused { volume: self.id, detail: why });
        }
        r.data
            .snapshot
            .ok_or_else(|| SnapshotError::Raft { volume: self.id, detail: "no snapshot in the answer".into() })
    }

    /// Leader only: deletes a user snapshot (idempotent). Returns whether
    /// it existed.
    pub async fn delete_snapshot(&self, id: uuid::Uuid) -> Result<bool, SnapshotError> {
        if !self.is_leader() {
            return Err(SnapshotError::NotLeader { node: self.node_id, volume: self.id });
        }
        if !lock(&self.shared).meta.snapshots.contains_key(&id) {
            // Applied here means committed: nothing to do.
            return Ok(false);
        }
        match self.raft.client_write(VolumeCommand::DeleteSnapshot { id }).await {
            Ok(r) => Ok(r.data.existed),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(SnapshotError::NotLeader { node: self.node_id, volume: self.id })
            }
            Err(e) => Err(SnapshotError::Raft { volume: self.id, detail: e.to_string() }),
        }
    }

    /// Leader only: a write barrier for a consistent cut across volumes.
    /// New writes wait from now on; returns once every write admitted
    /// before has completed (or fails after `wait`). The barrier is
    /// released by [`release`](Self::release), or by itself after `hold`,
    /// so a coordinator that died cannot stall the volume. Returns the term.
    pub async fn barrier(self: &Arc<Self>, token: u64, wait: Duration, hold: Duration) -> Result<u64, SnapshotError> {
        if let Some(term) = self.barrier_term(token) {
            return Ok(term);
        }
        if !self.is_leader() {
            return Err(SnapshotError::NotLeader { node: self.node_id, volume: self.id });
        }
        let term = self.raft.metrics().borrow().current_term;
        let guard = tokio::time::timeout(wait, self.gate.clone().write_owned())
            .await
            .map_err(|_| SnapshotError::BarrierTimeout { volume: self.id, waited: wait })?;
        if !self.is_leader() || self.raft.metrics().borrow().current_term != term {
            return Err(SnapshotError::NotLeader { node: self.node_id, volume: self.id });
        }
        let me = Arc::downgrade(self);
        let expiry = tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            if let Some(r) = me.upgrade() {
                if r.release(token) {
                    warn!(volume = %r.id, token, "write barrier expired before it was released");
                }
            }
        });
        if let Ok(mut b) = self.barriers.lock() {
            b.insert(token, Barrier { term, _guard: guard, expiry });
        }
        Ok(term)
    }

    fn barrier_term(&self, token: u64) -> Option<u64> {
        self.barriers.lock().ok().and_then(|b| b.get(&token).map(|b| b.term))
    }

    /// Releases a write barrier; returns whether it was held.
    pub fn release(&self, token: u64) -> bool {
        let b = self.barriers.lock().ok().and_then(|mut b| b.remove(&token));
        match b {
            Some(b) => {
                b.expiry.abort();
                true
            }
            None => false,
        }
    }

    /// Leader only: makes sure the copy from the source snapshot runs
    /// while this volume is being restored. `sources` are nodes holding
    /// the source volume.
    pub fn ensure_hydrating(self: &Arc<Self>, sources: Vec<NodeId>) {
        if !lock(&self.shared).meta.hydrating() || !self.is_leader() {
            return;
        }
        let Ok(mut slot) = self.hydrator.lock() else { return };
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let me = self.clone();
        let pool = self.pool.clone();
        *slot = Some(tokio::spawn(
            super::hydrate::run(me, pool, sources).instrument(tracing::info_span!("hydrate", volume = %self.id)),
        ));
    }

    /// Serves a peer's repair request: our verified copy of one version.
    pub async fn fetch_local(&self, block: u64, version: u64) -> (bool, Vec<u8>, u64) {
        // A lagging replica may not have applied the version yet; give it
        // a moment before answering "not found".
        for _ in 0..40 {
            if self.applied_index() >= version {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let applied = self.applied_index();
        match self.blocks.read_exact(block, version) {
            Ok(Some(Stored::Data(d))) => (true, encode_value(&d), applied),
            Ok(Some(Stored::Zero)) => (true, Vec::new(), applied),
            Ok(None) => (false, Vec::new(), applied),
            Err(BlockReadError::Checksum { .. }) | Err(BlockReadError::Store(_)) => (false, Vec::new(), applied),
        }
    }

    /// Verifies every stored block version; repairs failures from peers.
    pub async fn scrub(&self) -> (u64, u64, u64) {
        let (checked, bad) = match self.blocks.scan_checksums() {
            Ok(r) => r,
            Err(e) => {
                warn!(volume = %self.id, error = %e, "scrub failed");
                return (0, 0, 0);
            }
        };
        let members = self.members();
        let (mut repaired, mut failed) = (0, 0);
        for (block, version) in bad {
            match fetch_from_peers(&self.pool, self.id, self.node_id, &members, block, version).await {
                Ok(content) if self.blocks.repair(block, version, &content).is_ok() => {
                    repaired += 1;
                    self.counters.crc_repairs.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    failed += 1;
                    self.counters.crc_unrepairable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        info!(volume = %self.id, checked, repaired, failed, "scrub finished");
        (checked, repaired, failed)
    }

    pub fn report(&self) -> ReplicaReport {
        let m = self.raft.metrics().borrow().clone();
        let s = lock(&self.shared);
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let matched = m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(n, l)| (*n, l.map(|l| l.index).unwrap_or(0))).collect())
            .unwrap_or_default();
        let transfers = if m.state == ServerState::Leader {
            voters
                .iter()
                .chain(learners.iter())
                .filter_map(|n| self.progress.get(*n).map(|(d, t)| (*n, d, t)))
                .collect()
        } else {
            Vec::new()
        };
        let space = s.space.current();
        let snapshots = s
            .meta
            .snapshots
            .values()
            .map(|u| SnapshotReport {
                id: u.id,
                index: u.index,
                created_at_ms: u.created_at_ms,
                size_bytes: u.size_bytes,
                live_blocks: u.live_blocks,
                exclusive_blocks: space.exclusive.get(&u.index).copied().unwrap_or(0),
            })
            .collect();
        ReplicaReport {
            snapshots,
            held_blocks: space.held,
            sweep_cursor: s.space.sweep.as_ref().map(|w| w.cursor),
            reclaimed_blocks: s.space.reclaimed,
            last_sweep_freed_blocks: s.space.last_sweep_freed,
            hydration: s.meta.hydration.clone(),
            volume: self.id.0,
            role: Some(role_of(&m).into()),
            term: m.current_term,
            leader: m.current_leader,
            applied_index: s.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            size_bytes: s.meta.size_bytes,
            fence_floor: s.meta.fence_floor,
            exclusive: s.meta.exclusive,
            live_blocks: s.meta.live_blocks,
            voters,
            learners,
            matched,
            transfers,
            crc_repairs: self.counters.crc_repairs.load(Ordering::Relaxed),
            crc_unrepairable: self.counters.crc_unrepairable.load(Ordering::Relaxed),
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
        }
    }

    /// Leader only: moves the group's membership toward `desired` (from the
    /// catalog). New nodes join as learners first and become voters once
    /// caught up, so the group never waits on an empty replica for quorum.
    pub async fn converge_membership(&self, desired: &BTreeMap<NodeId, BasicNode>) {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || desired.is_empty() {
            return;
        }
        let membership = m.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return; // a change is in progress
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let want: BTreeSet<NodeId> = desired.keys().copied().collect();
        for (id, node) in desired {
            if !nodes.contains(id) {
                if !self.log_compacted_for_new_member(&m).await {
                    return;
                }
                info!(volume = %self.id, node = id, "adding replica as learner");
                if let Err(e) = self.raft.add_learner(*id, node.clone(), false).await {
                    debug!(volume = %self.id, node = id, error = %e, "add learner");
                }
                return;
            }
        }
        if voters != want {
            let last = m.last_log_index.unwrap_or(0);
            let replication = m.replication.clone().unwrap_or_default();
            let caught_up = want
                .iter()
                .filter(|n| !voters.contains(n))
                .all(|n| replication.get(n).and_then(|l| l.map(|l| l.index)).is_some_and(|i| i + 64 >= last));
            if !caught_up {
                return;
            }
            info!(volume = %self.id, ?voters, ?want, "changing voters");
            match self.raft.change_membership(ChangeMembers::ReplaceAllVoters(want.clone()), false).await {
                Ok(_) => {}
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    debug!(volume = %self.id, error = %e, "membership change not possible yet")
                }
                Err(e) => warn!(volume = %self.id, error = %e, "membership change failed"),
            }
            return;
        }
        let stray: BTreeSet<NodeId> = nodes.difference(&want).copied().collect();
        if !stray.is_empty() {
            info!(volume = %self.id, ?stray, "removing learners no longer placed here");
            if let Err(e) = self.raft.change_membership(ChangeMembers::RemoveNodes(stray), false).await {
                debug!(volume = %self.id, error = %e, "remove learners");
            }
        }
    }

    /// Whether a new member joining now is filled from a snapshot: the
    /// block versions of one recent index, streamed with progress reported
    /// (see `snapshot`). Otherwise openraft would replay the log to it from
    /// the first entry still stored — every overwritten version since the
    /// volume was created, with no progress to show. Until then this builds
    /// a snapshot (cheap: it pins an index) and purges the log up to it;
    /// the caller asks again on its next round. Under a write rate that
    /// outruns this, it gives up after a few seconds: replaying the log is
    /// slower, but correct.
    async fn log_compacted_for_new_member(&self, m: &openraft::RaftMetrics<NodeId, BasicNode>) -> bool {
        /// Entries (up to 1 MiB each) a new member may replay after the snapshot.
        const REPLAY_SLACK: u64 = 16;
        const MAX_ROUNDS: u32 = 20;
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let snapshot = m.snapshot.map(|l| l.index).unwrap_or(0);
        let purged = m.purged.map(|l| l.index).unwrap_or(0);
        let rounds = self.compaction_rounds.fetch_add(1, Ordering::Relaxed);
        if purged + REPLAY_SLACK >= applied || rounds >= MAX_ROUNDS {
            self.compaction_rounds.store(0, Ordering::Relaxed);
            return true;
        }
        if snapshot + REPLAY_SLACK < applied {
            info!(volume = %self.id, applied, snapshot, "taking a snapshot for a new replica");
            if let Err(e) = self.raft.trigger().snapshot().await {
                warn!(volume = %self.id, error = %e, "trigger snapshot");
            }
            return false;
        }
        info!(volume = %self.id, purged, snapshot, "purging the log up to the snapshot for a new replica");
        if let Err(e) = self.raft.trigger().purge_log(snapshot).await {
            warn!(volume = %self.id, error = %e, "trigger log purge");
        }
        false
    }

    pub fn shared(&self) -> &Arc<Mutex<SmShared>> {
        &self.shared
    }

    pub async fn shutdown(&self) {
        lock(&self.shared).stopped = true;
        if let Some(h) = self.hydrator.lock().ok().and_then(|mut h| h.take()) {
            h.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            warn!(volume = %self.id, error = %e, "raft shutdown");
        }
    }
}

/// Packs queued ops into log entries and hands results back.
async fn run_proposer(raft: Raft<VolumeTc>, mut rx: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(MAX_PROPOSALS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        // While we waited for a slot more requests queued: take them too.
        let mut batch = vec![first];
        let mut bytes = batch[0].op.data_len();
        while batch.len() < MAX_OPS_PER_ENTRY && bytes < MAX_ENTRY_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.op.data_len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (ops, dones): (Vec<IoOp>, Vec<_>) = batch.into_iter().map(|p| (p.op, p.done)).unzip();
            match raft.client_write(VolumeCommand::Io(ops)).await {
                Ok(resp) => {
                    let results = resp.data.results;
                    for (i, done) in dones.into_iter().enumerate() {
                        let r = results.get(i).copied().unwrap_or(OpResult::Corrupt);
                        let _ = done.send(Ok(r));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for done in dones {
                        let _ = done.send(Err(unavailable(&msg)));
                    }
                }
            }
        });
    }
}
