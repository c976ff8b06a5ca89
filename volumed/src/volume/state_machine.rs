//! The openraft state machine of a volume replica.
//!
//! State is persistent: each log entry's block writes and the new applied
//! index go to RocksDB in one `WriteBatch`, so a replica restarts exactly
//! where it stopped with nothing to replay. A Raft snapshot is the pin of
//! an applied index (see [`super::blocks`]): building one copies no data;
//! sending one streams the block versions visible at that index.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use tokio::sync::Notify;
use uuid::Uuid;

use super::blocks::{all_zero, ApplyError, BlockStore, EntryWriter, Pins, Stored, BS};
use super::command::{Hydration, IoKind, OpResult, UserSnapshot, VolumeCommand, VolumeResponse, VolumeTc, BLOCK_SIZE};
use super::snapshot::{self, StreamPin, VolumeSnapshotData};
use super::space::LocalSpace;
use crate::storage::keys::{self, GroupId, SmTag, CF_SM};
use crate::storage::log_store::{io_err, EntryCache, NodeId};
use crate::storage::{decode, encode, Store, StoreError};

/// Replicated metadata of a volume (part of every snapshot).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMeta {
    pub size_bytes: u64,
    pub fence_floor: u64,
    pub exclusive: bool,
    /// Blocks whose current content is not zero.
    pub live_blocks: u64,
    /// Indexes pinned by user snapshots (those of `snapshots`).
    pub snapshot_pins: BTreeSet<u64>,
    /// User snapshots by id. Part of the Raft snapshot header, so a
    /// rebuilt replica carries them.
    pub snapshots: BTreeMap<Uuid, UserSnapshot>,
    /// Set while (and after) this volume is restored from a snapshot.
    pub hydration: Option<Hydration>,
}

impl VolumeMeta {
    /// Whether a restore into this volume is still copying.
    pub fn hydrating(&self) -> bool {
        self.hydration.as_ref().is_some_and(|h| !h.finished)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedRecord {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    meta: VolumeMeta,
    /// Replica-local space accounting (see `space`).
    space: LocalSpace,
}

/// The current Raft snapshot of this replica: an index and the metadata as
/// of that index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaftSnapshotRecord {
    pub meta: SnapshotMeta<NodeId, BasicNode>,
    pub volume: VolumeMeta,
}

impl RaftSnapshotRecord {
    pub fn index(&self) -> u64 {
        self.meta.last_log_id.map(|l| l.index).unwrap_or(0)
    }
}

/// Written before a received snapshot replaces the replica's data, removed
/// in the same batch that completes it; found at startup, it means the
/// install must be redone from `path`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstallMarker {
    path: PathBuf,
    record: RaftSnapshotRecord,
}

/// State shared between the state machine, its snapshot builder, the read
/// path and snapshot senders.
#[derive(Debug, Default)]
pub struct SmShared {
    pub meta: VolumeMeta,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub raft_snapshot: Option<RaftSnapshotRecord>,
    /// Indexes pinned while a snapshot at that index is being streamed.
    pub stream_pins: BTreeMap<u64, usize>,
    pub space: LocalSpace,
    /// Wakes the sweeper when a sweep starts.
    pub sweep_wake: Arc<Notify>,
    /// Set when the replica shuts down: background work must not write
    /// (the group's keys may be deleted next).
    pub stopped: bool,
}

/// A state machine as opened: itself, the state it shares with the replica
/// runtime, and the volume size it publishes.
pub type OpenedStateMachine = (VolumeStateMachine, Arc<Mutex<SmShared>>, Arc<AtomicU64>);

impl SmShared {
    pub fn pins(&self) -> Pins {
        // The Raft snapshot record does not pin: a snapshot pins its index
        // only while openraft holds or streams it (see get_current_snapshot),
        // so volumes without user snapshots keep no old block versions.
        let mut p = self.meta.snapshot_pins.clone();
        p.extend(self.stream_pins.keys().copied());
        p
    }

    pub fn members(&self) -> Vec<NodeId> {
        self.membership.membership().nodes().map(|(id, _)| *id).collect()
    }
}

/// Fetches a verified copy of one block version from another replica.
pub trait BlockFetcher: Send + Sync + 'static {
    fn fetch(&self, block: u64, version: u64) -> BoxFuture<'static, Result<Stored, String>>;
}

/// Counters of one replica.
#[derive(Debug, Default)]
pub struct ReplicaCounters {
    pub crc_repairs: AtomicU64,
    pub crc_unrepairable: AtomicU64,
}

pub struct VolumeStateMachine {
    blocks: BlockStore,
    shared: Arc<Mutex<SmShared>>,
    size: Arc<AtomicU64>,
    fetcher: Arc<dyn BlockFetcher>,
    counters: Arc<ReplicaCounters>,
    snap_dir: PathBuf,
    /// The log's cache of entries not yet applied (see `EntryCache`).
    log_cache: EntryCache<VolumeTc>,
}

pub(crate) fn lock(shared: &Mutex<SmShared>) -> MutexGuard<'_, SmShared> {
    // A panic while holding the lock leaves consistent data behind (every
    // update is a plain assignment after the disk write), so keep going.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(io_err(e)).into()
}

impl VolumeStateMachine {
    /// Opens (or creates) the state machine of `group`, finishing an
    /// interrupted snapshot install first.
    pub fn open(
        store: Arc<Store>,
        group: GroupId,
        snap_dir: PathBuf,
        fetcher: Arc<dyn BlockFetcher>,
        counters: Arc<ReplicaCounters>,
        log_cache: EntryCache<VolumeTc>,
    ) -> Result<OpenedStateMachine, StoreError> {
        let blocks = BlockStore::new(store.clone(), group);
        let cf = store.cf(CF_SM)?;
        if let Some(raw) = store.db().get_cf(&cf, keys::sm_key(group, SmTag::InstallMarker))? {
            let marker: InstallMarker = decode("install marker", &raw)?;
            warn!(volume = %group, path = %marker.path.display(), "finishing an interrupted snapshot install");
            finish_install(&blocks, &marker)?;
        }
        if !blocks.heads_built()? {
            // A replica from before the heads index (a new one finds
            // nothing to index and just sets the mark).
            let heads = blocks.rebuild_heads()?;
            if heads > 0 {
                info!(volume = %group, blocks = heads, "built the heads index");
            }
        }
        let applied: AppliedRecord = match store.db().get_cf(&cf, keys::sm_key(group, SmTag::Applied))? {
            Some(raw) => decode("applied state", &raw)?,
            None => AppliedRecord::default(),
        };
        let raft_snapshot: Option<RaftSnapshotRecord> =
            match store.db().get_cf(&cf, keys::sm_key(group, SmTag::RaftSnapshot))? {
                Some(raw) => Some(decode("raft snapshot record", &raw)?),
                None => None,
            };
        let size = Arc::new(AtomicU64::new(applied.meta.size_bytes));
        let shared = Arc::new(Mutex::new(SmShared {
            meta: applied.meta,
            last_applied: applied.last_applied,
            membership: applied.membership,
            raft_snapshot,
            stream_pins: BTreeMap::new(),
            space: applied.space,
            sweep_wake: Arc::new(Notify::new()),
            stopped: false,
        }));
        let sm = VolumeStateMachine {
            blocks,
            shared: shared.clone(),
            size: size.clone(),
            fetcher,
            counters,
            snap_dir,
            log_cache,
        };
        Ok((sm, shared, size))
    }

    /// Applies one entry atomically. Returns the response, or the block that
    /// must be repaired before the entry can be applied.
    fn apply_entry(&self, entry: &Entry<VolumeTc>) -> Result<VolumeResponse, ApplyError> {
        let mut shared = lock(&self.shared);
        let pins = shared.pins();
        let user_pins = shared.meta.snapshot_pins.clone();
        let version = entry.log_id.index;
        let new_writer = || {
            let w = EntryWriter::with_accounting(&self.blocks, version, &pins, &user_pins, shared.space.count_below());
            // Every chain is a single version unless a pin, a sweep or a
            // held version says otherwise (see EntryWriter::newest_only).
            if pins.is_empty() && shared.space.sweep.is_none() && shared.space.counters.held == 0 {
                w.newest_only()
            } else {
                w
            }
        };
        let mut writer = new_writer();
        let mut meta = shared.meta.clone();
        let mut space = shared.space.clone();
        let mut sweep_started = false;
        let mut membership = None;
        let mut resp = VolumeResponse::default();
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => membership = Some(StoredMembership::new(Some(entry.log_id), m.clone())),
            EntryPayload::Normal(cmd) => match cmd {
                VolumeCommand::Io(ops) => {
                    for op in ops {
                        let fenced = match op.generation {
                            Some(g) => g < meta.fence_floor,
                            None => meta.exclusive,
                        };
                        let (offset, len) = match &op.kind {
                            IoKind::Write { offset, data } => (*offset, data.len() as u64),
                            IoKind::Zero { offset, len } => (*offset, *len),
                        };
                        let result = if fenced {
                            OpResult::Fenced
                        } else if offset.checked_add(len).is_none_or(|end| end > meta.size_bytes) {
                            OpResult::OutOfRange
                        } else {
                            match &op.kind {
                                IoKind::Write { offset, data } => writer.write(*offset, data)?,
                                IoKind::Zero { offset, len } => writer.zero(*offset, *len)?,
                            }
                            OpResult::Ok
                        };
                        resp.results.push(result);
                    }
                }
                VolumeCommand::Flush => {}
                VolumeCommand::Resize { size_bytes } => meta.size_bytes = meta.size_bytes.max(*size_bytes),
                VolumeCommand::SetFence { floor, exclusive } => {
                    meta.fence_floor = meta.fence_floor.max(*floor);
                    meta.exclusive = *exclusive;
                }
                VolumeCommand::CreateSnapshot { id, created_at_ms } => {
                    if let Some(existing) = meta.snapshots.get(id) {
                        resp.snapshot = Some(existing.clone());
                    } else if meta.hydrating() {
                        resp.refused = Some("the volume is still being restored from a snapshot".into());
                    } else {
                        let rec = UserSnapshot {
                            id: *id,
                            index: version,
                            created_at_ms: *created_at_ms,
                            size_bytes: meta.size_bytes,
                            live_blocks: meta.live_blocks,
                        };
                        meta.snapshot_pins.insert(version);
                        meta.snapshots.insert(*id, rec.clone());
                        resp.snapshot = Some(rec);
                    }
                }
                VolumeCommand::DeleteSnapshot { id } => {
                    if let Some(rec) = meta.snapshots.remove(id) {
                        meta.snapshot_pins.remove(&rec.index);
                        resp.existed = true;
                        space.start_sweep();
                        sweep_started = true;
                    }
                }
                VolumeCommand::StartHydration(h) => {
                    if meta.hydration.is_none() && meta.live_blocks == 0 {
                        meta.hydration =
                            Some(Hydration { next_block: 0, copied_blocks: 0, finished: false, ..h.clone() });
                    } else if meta.hydration.as_ref().map(|x| (x.source_snapshot, x.source_index))
                        != Some((h.source_snapshot, h.source_index))
                    {
                        resp.refused = Some("the volume already holds data or another restore".into());
                    }
                }
                VolumeCommand::File(ops) => {
                    resp.file = crate::file::apply::apply(&mut writer, &self.blocks, meta.size_bytes, version, ops)?
                }
                VolumeCommand::Hydrate { from_block, next_block, blocks } => match &mut meta.hydration {
                    Some(h) if !h.finished && h.next_block == *from_block => {
                        // A block volume's copy ends at its size; a file
                        // volume's covers its reserved ranges, whose
                        // records are shorter than a block.
                        let in_size = |b: u64| {
                            b.checked_add(1)
                                .and_then(|e| e.checked_mul(BLOCK_SIZE))
                                .is_some_and(|e| e <= meta.size_bytes)
                        };
                        let file_copy = h.end_block == super::hydrate::file_copy_end();
                        for (block, data) in blocks {
                            let fits = *block >= *from_block
                                && *block < *next_block
                                && *block < h.end_block
                                && (file_copy || in_size(*block));
                            let sized = if file_copy { !data.is_empty() && data.len() <= BS } else { data.len() == BS };
                            if !fits || !sized {
                                resp.refused = Some(format!("block {block} of the copy is out of range"));
                                break;
                            }
                            let content = if data.len() == BS && all_zero(data) {
                                Stored::Zero
                            } else {
                                Stored::Data(data.to_vec())
                            };
                            writer.put_block(*block, content)?;
                        }
                        if resp.refused.is_none() {
                            h.next_block = (*next_block).min(h.end_block);
                            h.copied_blocks += blocks.len() as u64;
                            h.finished = h.next_block >= h.end_block;
                        }
                    }
                    _ => resp.refused = Some(format!("copy chunk from block {from_block} is out of order")),
                },
            },
        }
        if resp.refused.is_some() && matches!(&entry.payload, EntryPayload::Normal(VolumeCommand::Hydrate { .. })) {
            // Nothing of a refused chunk may stay staged.
            writer = new_writer();
        }
        meta.live_blocks = meta.live_blocks.saturating_add_signed(writer.live_delta);
        space.apply(&writer.space);
        let mut batch: WriteBatch = writer.into_batch();
        let membership = membership.unwrap_or_else(|| shared.membership.clone());
        let record = AppliedRecord { last_applied: Some(entry.log_id), membership, meta, space };
        let cf = self.blocks.store().cf(CF_SM)?;
        batch.put_cf(&cf, keys::sm_key(self.blocks.group(), SmTag::Applied), encode(&record)?);
        // No WAL: this entry is in the Raft log, which replays it after a
        // crash (see Store::write_unlogged).
        self.blocks.store().write_unlogged(batch)?;
        // Only now, with the data written, does the new state become visible.
        shared.meta = record.meta;
        shared.last_applied = record.last_applied;
        shared.membership = record.membership;
        shared.space = record.space;
        self.size.store(shared.meta.size_bytes, Ordering::Release);
        if sweep_started {
            shared.sweep_wake.notify_one();
        }
        Ok(resp)
    }

    async fn repair_block(&self, block: u64, version: u64) -> bool {
        match self.fetcher.fetch(block, version).await {
            Ok(content) => match self.blocks.repair(block, version, &content) {
                Ok(()) => {
                    self.counters.crc_repairs.fetch_add(1, Ordering::Relaxed);
                    info!(volume = %self.blocks.group(), block, version, "repaired block from a peer replica");
                    true
                }
                Err(e) => {
                    warn!(volume = %self.blocks.group(), block, version, error = %e, "could not store repaired block");
                    false
                }
            },
            Err(e) => {
                warn!(volume = %self.blocks.group(), block, version, error = %e, "no healthy copy of block");
                false
            }
        }
    }
}

/// Space state of a replica whose data was just replaced: unknown until a
/// sweep has counted every block.
fn recount() -> LocalSpace {
    let mut s = LocalSpace::default();
    s.start_sweep();
    s
}

fn finish_install(blocks: &BlockStore, marker: &InstallMarker) -> Result<(), StoreError> {
    let group = blocks.group();
    let store = blocks.store();
    let (start, end) = keys::group_range(group);
    let blocks_cf = store.cf(keys::CF_BLOCKS)?;
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(&blocks_cf, &start, &end);
    store.write(batch)?;
    snapshot::load_file_into(blocks, &marker.path)?;
    blocks.rebuild_heads()?;
    let sm_cf = store.cf(CF_SM)?;
    let mut batch = WriteBatch::default();
    let applied = AppliedRecord {
        last_applied: marker.record.meta.last_log_id,
        membership: marker.record.meta.last_membership.clone(),
        meta: marker.record.volume.clone(),
        space: recount(),
    };
    batch.put_cf(&sm_cf, keys::sm_key(group, SmTag::Applied), encode(&applied)?);
    batch.put_cf(&sm_cf, keys::sm_key(group, SmTag::RaftSnapshot), encode(&marker.record)?);
    batch.delete_cf(&sm_cf, keys::sm_key(group, SmTag::InstallMarker));
    store.write_sync(batch)?;
    if let Err(e) = std::fs::remove_file(&marker.path) {
        warn!(volume = %group, path = %marker.path.display(), error = %e, "could not remove installed snapshot file");
    }
    Ok(())
}

pub struct VolumeSnapshotBuilder {
    store: Arc<Store>,
    group: GroupId,
    shared: Arc<Mutex<SmShared>>,
}

impl RaftSnapshotBuilder<VolumeTc> for VolumeSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<VolumeTc>, StorageError<NodeId>> {
        // Under the lock apply also holds while it collects garbage, so no
        // version visible at the pinned index can be dropped in between.
        let mut shared = lock(&self.shared);
        let last = shared.last_applied;
        let index = last.map(|l| l.index).unwrap_or(0);
        let record = RaftSnapshotRecord {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership: shared.membership.clone(),
                snapshot_id: format!("{}-{}", self.group, index),
            },
            volume: shared.meta.clone(),
        };
        let cf = self.store.cf(CF_SM).map_err(sm_err)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(&cf, keys::sm_key(self.group, SmTag::RaftSnapshot), encode(&record).map_err(sm_err)?);
        self.store.write(batch).map_err(sm_err)?;
        let meta = record.meta.clone();
        let volume = record.volume.clone();
        shared.raft_snapshot = Some(record);
        let pin = Arc::new(StreamPin::new(&mut shared, self.shared.clone(), index));
        Ok(Snapshot { meta, snapshot: Box::new(VolumeSnapshotData::Local { index, volume, pin }) })
    }
}

impl RaftStateMachine<VolumeTc> for VolumeStateMachine {
    type SnapshotBuilder = VolumeSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let s = lock(&self.shared);
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<VolumeResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<VolumeTc>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            let mut repairs = 0;
            let resp = loop {
                match self.apply_entry(&entry) {
                    Ok(r) => break r,
                    Err(ApplyError::Store(e)) => return Err(StorageIOError::apply(entry.log_id, io_err(e)).into()),
                    Err(ApplyError::NeedsRepair(r)) => {
                        repairs += 1;
                        if self.repair_block(r.block, r.version).await {
                            continue;
                        }
                        if repairs >= 20 {
                            // No peer has a good copy: this replica cannot
                            // follow the log without writing garbage. Failing
                            // stops its Raft; the replica manager then wipes
                            // it and it is rebuilt from the leader.
                            self.counters.crc_unrepairable.fetch_add(1, Ordering::Relaxed);
                            return Err(StorageIOError::apply(
                                entry.log_id,
                                io_err(format!(
                                    "block {} version {} is corrupt and no replica has a good copy",
                                    r.block, r.version
                                )),
                            )
                            .into());
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            };
            self.log_cache.release_through(entry.log_id.index);
            out.push(resp);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        VolumeSnapshotBuilder {
            store: self.blocks.store().clone(),
            group: self.blocks.group(),
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<VolumeSnapshotData>, StorageError<NodeId>> {
        // Snapshots arrive through the transport's streaming endpoint and
        // `Raft::install_full_snapshot`, never through chunked transfer.
        Err(StorageIOError::write_snapshot(None, io_err("chunked snapshot transfer is not supported")).into())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<VolumeSnapshotData>,
    ) -> Result<(), StorageError<NodeId>> {
        let VolumeSnapshotData::Received { path, volume } = *snapshot else {
            return Err(
                StorageIOError::write_snapshot(Some(meta.signature()), io_err("not a received snapshot")).into()
            );
        };
        let group = self.blocks.group();
        info!(volume = %group, snapshot = %meta.snapshot_id, "installing snapshot");
        let record = RaftSnapshotRecord { meta: meta.clone(), volume: volume.clone() };
        let marker = InstallMarker { path, record: record.clone() };
        let err = |e: StoreError| -> StorageError<NodeId> {
            StorageIOError::write_snapshot(Some(meta.signature()), io_err(e)).into()
        };
        let mut shared = lock(&self.shared);
        let cf = self.blocks.store().cf(CF_SM).map_err(err)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(&cf, keys::sm_key(group, SmTag::InstallMarker), encode(&marker).map_err(err)?);
        self.blocks.store().write_sync(batch).map_err(err)?;
        finish_install(&self.blocks, &marker).map_err(err)?;
        shared.meta = volume;
        shared.space = recount();
        shared.sweep_wake.notify_one();
        shared.last_applied = meta.last_log_id;
        shared.membership = meta.last_membership.clone();
        shared.raft_snapshot = Some(record);
        self.size.store(shared.meta.size_bytes, Ordering::Release);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<VolumeTc>>, StorageError<NodeId>> {
        // Snapshots are taken fresh when asked for: the current applied state,
        // pinned for as long as openraft holds (and streams) it. Only once
        // openraft built one (it then purges logs behind it) is there any.
        let mut s = lock(&self.shared);
        let Some(built) = s.raft_snapshot.as_ref() else { return Ok(None) };
        let last = s.last_applied.or(built.meta.last_log_id);
        let index = last.map(|l| l.index).unwrap_or(0);
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: s.membership.clone(),
            snapshot_id: format!("{}-{}", self.blocks.group(), index),
        };
        let volume = s.meta.clone();
        let pin = Arc::new(StreamPin::new(&mut s, self.shared.clone(), index));
        Ok(Some(Snapshot { meta, snapshot: Box::new(VolumeSnapshotData::Local { index, volume, pin }) }))
    }
}

impl VolumeStateMachine {
    pub fn snap_dir(&self) -> &PathBuf {
        &self.snap_dir
    }
}

/// One step of a sweep (see `space`): visits about `max_keys` stored
/// versions from the sweep's cursor, drops what no pin needs, counts what
/// stays, and persists the cursor with the result — all under the lock
/// applies take, so pins and chains cannot change in between, and a
/// restart resumes at the cursor. Returns whether more remains.
pub fn sweep_step(blocks: &BlockStore, shared: &Mutex<SmShared>, max_keys: usize) -> Result<bool, StoreError> {
    let mut s = lock(shared);
    if s.stopped {
        return Ok(false);
    }
    let Some(mut sweep) = s.space.sweep.clone() else { return Ok(false) };
    let pins = s.pins();
    let chunk = blocks.sweep_chunk(sweep.cursor, max_keys, &pins, &s.meta.snapshot_pins)?;
    sweep.counted.apply(&chunk.counted);
    sweep.freed += chunk.freed;
    let mut space = s.space.clone();
    let more = match chunk.next {
        Some(next) => {
            sweep.cursor = next;
            space.sweep = Some(sweep);
            true
        }
        None => {
            space.sweep = Some(sweep);
            space.finish_sweep();
            false
        }
    };
    let record = AppliedRecord {
        last_applied: s.last_applied,
        membership: s.membership.clone(),
        meta: s.meta.clone(),
        space: space.clone(),
    };
    let mut batch = chunk.batch;
    let cf = blocks.store().cf(CF_SM)?;
    batch.put_cf(&cf, keys::sm_key(blocks.group(), SmTag::Applied), encode(&record)?);
    // Unlogged like apply: a logged record claiming `last_applied` must never
    // survive a crash that loses the unlogged block writes it covers.
    blocks.store().write_unlogged(batch)?;
    if !more {
        info!(volume = %blocks.group(), freed_blocks = space.last_sweep_freed, "sweep finished");
    }
    s.space = space;
    Ok(more)
}
