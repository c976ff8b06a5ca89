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

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, BasicNode, Entry, LogId, LogState, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote,
};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::keys::{self, GroupId, RaftStateTag, CF_RAFT_LOG, CF_RAFT_STATE};
use super::{decode, encode, Store};

/// What every Raft group type of volumed has in common.
pub trait GroupTypeConfig: RaftTypeConfig<NodeId = u64, Node = BasicNode, Entry = Entry<Self>> {
    /// Whether appending this entry must fsync before it counts as stored.
    fn entry_needs_sync(entry: &Entry<Self>) -> bool;
}

pub type NodeId = u64;

pub(crate) fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Log storage of one group. Cheap to clone: clones share the database and
/// the group's pending-sync counter.
pub struct LogStore<C: GroupTypeConfig> {
    store: Arc<Store>,
    group: GroupId,
    /// Completions queued behind the syncer and not yet run.
    queued: Arc<AtomicU64>,
    _c: std::marker::PhantomData<C>,
}

impl<C: GroupTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore { store: self.store.clone(), group: self.group, queued: self.queued.clone(), _c: Default::default() }
    }
}

impl<C: GroupTypeConfig> LogStore<C> {
    pub fn new(store: Arc<Store>, group: GroupId) -> Self {
        LogStore { store, group, queued: Arc::new(AtomicU64::new(0)), _c: Default::default() }
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
        for entry in entries {
            needs_sync |= C::entry_needs_sync(&entry);
            let bytes = encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, io_err(e)))?;
            batch.put_cf(&cf, keys::log_key(self.group, entry.log_id.index), bytes);
        }
        self.store.write(batch).map_err(|e| StorageIOError::write_logs(io_err(e)))?;

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
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // State machines write without the WAL: before dropping log entries
        // they may still need to replay, make their effects durable.
        self.store.flush_memtables().map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let log_cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let state_cf = self.store.cf(CF_RAFT_STATE).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            &state_cf,
            keys::raft_state_key(self.group, RaftStateTag::Purged),
            encode(&log_id).map_err(|e| StorageIOError::write_logs(io_err(e)))?,
        );
        batch.delete_range_cf(&log_cf, keys::log_key(self.group, 0), keys::log_key(self.group, log_id.index + 1));
        self.store.write(batch).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        Ok(())
    }
}
