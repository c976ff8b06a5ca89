//! openraft log storage over the shared RocksDB, for any group type.
//!
//! Appends are written to RocksDB inline (readable at once, durable against
//! a process crash) and their completion is reported through the node's
//! [`Syncer`](super::Store::after_sync): an entry that must survive power
//! loss (see [`GroupTypeConfig::entry_needs_sync`]) completes only after a
//! WAL fsync. Because openraft treats a completed append as "everything up
//! to here is durable", completions of one group are never allowed to
//! overtake a pending fsync: once a group has a sync queued, its later
//! completions queue behind it.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, BasicNode, Entry, LogId, LogState, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote,
};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::keys::{self, GroupId, RaftStateTag, CF_RAFT_LOG, CF_RAFT_STATE};
use super::{decode, encode, Store};

/// What every Raft group type of volumed has in common.
pub trait GroupTypeConfig: RaftTypeConfig<NodeId = u64, Node = BasicNode, Entry = Entry<Self>, D: Clone> {
    /// Whether appending this entry must fsync before it counts as stored.
    fn entry_needs_sync(entry: &Entry<Self>) -> bool;
}

pub type NodeId = u64;

pub(crate) fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Log storage of one group. Cheap to clone: clones share the database,
/// the group's pending-sync counter and its entry cache.
pub struct LogStore<C: GroupTypeConfig> {
    store: Arc<Store>,
    group: GroupId,
    /// Completions queued behind the syncer and not yet run.
    queued: Arc<AtomicU64>,
    cache: Option<EntryCache<C>>,
}

impl<C: GroupTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            store: self.store.clone(),
            group: self.group,
            queued: self.queued.clone(),
            cache: self.cache.clone(),
        }
    }
}

/// Entries appended and not yet applied, kept as appended. openraft reads
/// every entry back from the log storage twice right after appending it —
/// to apply it, and on a leader to send it to each follower — and reading a
/// 1 MiB entry back from RocksDB and decoding it copies it twice more on
/// Raft's own task. A clone here shares the entry's data (`Bytes`).
///
/// The cache holds one contiguous run of indexes; the state machine drops
/// what it applied ([`EntryCache::release_through`]), so an idle group
/// holds nothing. A read it cannot serve whole goes to RocksDB.
pub struct EntryCache<C: GroupTypeConfig> {
    inner: Arc<Mutex<CachedRun<C>>>,
    max_bytes: usize,
}

impl<C: GroupTypeConfig> Clone for EntryCache<C> {
    fn clone(&self) -> Self {
        EntryCache { inner: self.inner.clone(), max_bytes: self.max_bytes }
    }
}

struct CachedRun<C: GroupTypeConfig> {
    /// Index of `entries[0]`.
    first: u64,
    entries: VecDeque<(C::Entry, usize)>,
    bytes: usize,
}

impl<C: GroupTypeConfig> EntryCache<C> {
    /// A cache that holds at most `max_bytes` of encoded entries (the oldest
    /// go first: a state machine that far behind reads from RocksDB).
    pub fn new(max_bytes: usize) -> Self {
        EntryCache {
            inner: Arc::new(Mutex::new(CachedRun { first: 0, entries: VecDeque::new(), bytes: 0 })),
            max_bytes,
        }
    }

    fn run(&self) -> std::sync::MutexGuard<'_, CachedRun<C>> {
        // Every update leaves the run consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn push(&self, index: u64, entry: C::Entry, weight: usize) {
        self.extend([(index, entry, weight)]);
    }

    /// Adds appended entries `(index, entry, encoded size)`, in order, under
    /// one lock.
    fn extend(&self, appended: impl IntoIterator<Item = (u64, C::Entry, usize)>) {
        let mut run = self.run();
        for (index, entry, weight) in appended {
            let next = run.first + run.entries.len() as u64;
            if run.entries.is_empty() || index > next {
                run.entries.clear();
                run.bytes = 0;
                run.first = index;
            } else if index < next {
                // Re-appended after a conflict: what follows is stale.
                run.cut_from(index);
            }
            run.entries.push_back((entry, weight));
            run.bytes += weight;
            while run.bytes > self.max_bytes {
                run.pop_front();
            }
        }
    }

    /// Drops the entries at or below `index` (applied or purged).
    pub fn release_through(&self, index: u64) {
        let mut run = self.run();
        while !run.entries.is_empty() && run.first <= index {
            run.pop_front();
        }
    }

    fn truncate_from(&self, index: u64) {
        self.run().cut_from(index);
    }

    /// Entries `start..end`, if all are cached.
    fn get(&self, start: u64, end: u64) -> Option<Vec<C::Entry>> {
        let run = self.run();
        let last = run.first + run.entries.len() as u64;
        if start >= end || start < run.first || end > last {
            return None;
        }
        let from = (start - run.first) as usize;
        Some(run.entries.range(from..from + (end - start) as usize).map(|(e, _)| e.clone()).collect())
    }

    #[cfg(test)]
    fn cached(&self) -> (u64, usize) {
        let run = self.run();
        (run.first, run.entries.len())
    }
}

impl<C: GroupTypeConfig> CachedRun<C> {
    fn pop_front(&mut self) {
        if let Some((_, w)) = self.entries.pop_front() {
            self.bytes -= w;
            self.first += 1;
        }
    }

    fn cut_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first) as usize;
        while self.entries.len() > keep {
            if let Some((_, w)) = self.entries.pop_back() {
                self.bytes -= w;
            }
        }
    }
}

impl<C: GroupTypeConfig> LogStore<C> {
    pub fn new(store: Arc<Store>, group: GroupId) -> Self {
        LogStore { store, group, queued: Arc::new(AtomicU64::new(0)), cache: None }
    }

    /// A log store that keeps appended entries in `cache` until applied.
    pub fn with_cache(store: Arc<Store>, group: GroupId, cache: EntryCache<C>) -> Self {
        LogStore { cache: Some(cache), ..Self::new(store, group) }
    }

    #[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        tag: RaftStateTag,
    ) -> Result<Option<T>, StorageIOError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_STATE).map_err(|e| StorageIOError::read(io_err(e)))?;
        let raw = self
            .store
            .db()
            .get_cf(&cf, keys::raft_state_key(self.group, tag))
            .map_err(|e| StorageIOError::read(io_err(e)))?;
        match raw {
            None => Ok(None),
            Some(b) => decode(&format!("{} raft state {tag:?}", self.group), &b)
                .map(Some)
                .map_err(|e| StorageIOError::read(io_err(e))),
        }
    }

    #[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
    fn last_entry_log_id(&self) -> Result<Option<LogId<NodeId>>, StorageIOError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
        let upper = keys::log_key(self.group, u64::MAX);
        let mut it = self.store.db().iterator_cf(&cf, IteratorMode::From(&upper, Direction::Reverse));
        match it.next() {
            None => Ok(None),
            Some(Err(e)) => Err(StorageIOError::read_logs(io_err(e))),
            Some(Ok((k, v))) => {
                if keys::log_index(self.group, &k).is_none() {
                    return Ok(None);
                }
                let entry: Entry<C> = decode("log entry", &v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

impl<C: GroupTypeConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let (Some(cache), Some(end)) = (&self.cache, end) {
            if let Some(entries) = cache.get(start, end) {
                return Ok(entries);
            }
        }
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
        let from = keys::log_key(self.group, start);
        let it = self.store.db().iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            let Some(index) = keys::log_index(self.group, &k) else { break };
            if end.is_some_and(|end| index >= end) {
                break;
            }
            let entry: Entry<C> = decode("log entry", &v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl<C: GroupTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_state(RaftStateTag::Purged)?;
        let last = self.last_entry_log_id()?;
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_STATE).map_err(|e| StorageIOError::write_vote(io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            &cf,
            keys::raft_state_key(self.group, RaftStateTag::Vote),
            encode(vote).map_err(|e| StorageIOError::write_vote(io_err(e)))?,
        );
        // A vote must never be forgotten: granting two votes in one term
        // after a power loss would allow two leaders.
        self.store.write_sync(batch).map_err(|e| StorageIOError::write_vote(io_err(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_state(RaftStateTag::Vote)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_STATE).map_err(|e| StorageIOError::write(io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            &cf,
            keys::raft_state_key(self.group, RaftStateTag::Committed),
            encode(&committed).map_err(|e| StorageIOError::write(io_err(e)))?,
        );
        self.store.write(batch).map_err(|e| StorageIOError::write(io_err(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_state::<Option<LogId<NodeId>>>(RaftStateTag::Committed)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + Send,
        I::IntoIter: Send,
    {
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let mut batch = WriteBatch::default();
        let mut needs_sync = false;
        let mut appended = Vec::new();
        for entry in entries {
            needs_sync |= C::entry_needs_sync(&entry);
            let bytes = encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, io_err(e)))?;
            batch.put_cf(&cf, keys::log_key(self.group, entry.log_id.index), &bytes);
            if self.cache.is_some() {
                appended.push((entry.log_id.index, entry, bytes.len()));
            }
        }
        self.store.write(batch).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        if let Some(cache) = &self.cache {
            // Readable as soon as written, like the database itself.
            cache.extend(appended);
        }

        if !needs_sync && self.queued.load(Ordering::Acquire) == 0 {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let queued = self.queued.clone();
        self.store.after_sync(
            needs_sync,
            Box::new(move |result| {
                callback.log_io_completed(result);
                queued.fetch_sub(1, Ordering::AcqRel);
            }),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&cf, keys::log_key(self.group, log_id.index), keys::log_key(self.group, u64::MAX));
        // u64::MAX itself is never a real index, but delete it for completeness.
        batch.delete_cf(&cf, keys::log_key(self.group, u64::MAX));
        self.store.write_sync(batch).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        if let Some(cache) = &self.cache {
            cache.truncate_from(log_id.index);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let log_cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let state_cf = self.store.cf(CF_RAFT_STATE).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            &state_cf,
            keys::raft_state_key(self.group, RaftStateTag::Purged),
            encode(&log_id).map_err(|e| StorageIOError::write_logs(io_err(e)))?,
        );
        batch.delete_range_cf(&log_cf, keys::log_key(self.group, 0), keys::log_key(self.group, log_id.index + 1));
        // State machines write without the WAL, so the entries they may
        // still need to replay can go only with their effects made durable.
        // The purge is written without the WAL too, then one atomic flush
        // makes the state machines and the purge durable together: a crash
        // before it loses both (the WAL still replays the entries), and the
        // flush drops the purged entries still in the memtable instead of
        // writing them to an SST file for compaction to delete later.
        self.store.write_unlogged(batch).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        self.store.flush_memtables().map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        if let Some(cache) = &self.cache {
            cache.release_through(log_id.index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::command::{VolumeCommand, VolumeTc};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64, term: u64) -> Entry<VolumeTc> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(VolumeCommand::Flush),
        }
    }

    fn terms(entries: Option<Vec<Entry<VolumeTc>>>) -> Option<Vec<(u64, u64)>> {
        entries.map(|v| v.iter().map(|e| (e.log_id.index, e.log_id.leader_id.term)).collect())
    }

    #[test]
    fn cache_serves_whole_runs_only_and_follows_truncate_and_release() {
        let cache = EntryCache::<VolumeTc>::new(100);
        for i in 5..10 {
            cache.push(i, entry(i, 1), 10);
        }
        assert_eq!(terms(cache.get(6, 9)), Some(vec![(6, 1), (7, 1), (8, 1)]));
        assert_eq!(cache.get(4, 6).map(|v| v.len()), None, "index 4 was never cached");
        assert_eq!(cache.get(8, 11).map(|v| v.len()), None, "index 10 does not exist");
        // A new leader overwrites 7..: the old 7, 8, 9 must never be served.
        cache.truncate_from(7);
        cache.push(7, entry(7, 2), 10);
        assert_eq!(terms(cache.get(5, 8)), Some(vec![(5, 1), (6, 1), (7, 2)]));
        assert_eq!(cache.get(8, 9).map(|v| v.len()), None);
        // Re-appending an index without a truncate first also drops the rest.
        cache.push(6, entry(6, 3), 10);
        assert_eq!(terms(cache.get(5, 7)), Some(vec![(5, 1), (6, 3)]));
        assert_eq!(cache.cached(), (5, 2));
        cache.release_through(5);
        assert_eq!(cache.cached(), (6, 1));
        // A gap restarts the run.
        cache.push(20, entry(20, 3), 10);
        assert_eq!(cache.cached(), (20, 1));
        cache.release_through(30);
        assert_eq!(cache.cached().1, 0);
    }

    #[test]
    fn cache_drops_oldest_over_its_budget() {
        let cache = EntryCache::<VolumeTc>::new(25);
        for i in 1..=4 {
            cache.push(i, entry(i, 1), 10);
        }
        assert_eq!(cache.cached(), (3, 2));
        assert_eq!(cache.get(2, 4).map(|v| v.len()), None);
        assert_eq!(cache.get(3, 5).map(|v| v.len()), Some(2));
    }
}
