//! The node's single RocksDB, shared by the catalog group and every volume
//! replica hosted here: Raft logs, Raft state, state machines and block data.
//!
//! Durability model (documented in docs/architecture.md): ordinary writes go
//! to RocksDB's WAL without fsync, which survives a process crash (the data
//! is in the kernel's page cache) but not a power loss — the same contract as
//! a disk's volatile write cache. Whatever must survive power loss (votes,
//! membership, catalog commands, and every block write acknowledged before
//! an NBD FLUSH or with FUA) is fsynced through the [`Syncer`], which batches
//! concurrent requests into one WAL fsync (group commit).

pub mod keys;
pub mod log_store;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options, SliceTransform,
    WriteBatch, WriteOptions, DB,
};

use self::keys::{GroupId, BLOCK_PREFIX_LEN, CF_BLOCKS, CF_RAFT_LOG, CF_RAFT_STATE, CF_SM, COLUMN_FAMILIES};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb at {path}: {source}")]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("data directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("missing column family {0}")]
    MissingCf(&'static str),
    #[error("corrupt record {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("encoding: {0}")]
    Encode(String),
    #[error("wal sync failed: {0}")]
    Sync(String),
}

/// A deferred action run by the syncer after the WAL is durable (or failed).
pub type SyncCallback = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

struct SyncJob {
    needs_sync: bool,
    done: SyncCallback,
}

/// One RocksDB per node.
///
/// Dropping the last `Arc<Store>` closes the database before the drop
/// returns (the syncer thread is stopped and joined first): a process that
/// exits with RocksDB still open races its background threads against
/// static destructors and can abort ("pthread lock: Invalid argument")
/// after an otherwise clean shutdown.
pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
    sync_tx: Option<mpsc::Sender<SyncJob>>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the channel ends the syncer loop; it then drops its
        // handle of the database, leaving ours as the last one.
        self.sync_tx = None;
        if let Some(t) = self.syncer.take() {
            // (A sync callback never owns the store, but joining our own
            // thread would deadlock if one ever did.)
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        tracing::info!(path = %self.path.display(), "database closed");
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Arc<Store>, StoreError> {
        let path = dir.join("db");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // Blocks are written, overwritten and trimmed at random: compression
        // costs CPU on the write path for little gain on random data.
        opts.set_compression_type(DBCompressionType::None);
        opts.set_keep_log_file_num(4);
        // State-machine writes skip the WAL (the Raft log already holds the
        // data); flushing every column family together keeps what reaches
        // disk a consistent cut of every group's state machine.
        opts.set_atomic_flush(true);
        // HyperClockCache (charge estimated automatically): lookups without
        // the LRU cache's shard mutex and hash-chain walk, which took 5% of
        // a volume leader's CPU under sequential writes.
        let cache = Cache::new_hyper_clock_cache(256 << 20, 0);

        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);

        let descriptors = COLUMN_FAMILIES.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(DBCompressionType::None);
            cf.set_block_based_table_factory(&table);
            match *name {
                CF_BLOCKS => {
                    // Version lookups seek within one block's prefix; a
                    // prefix bloom filter lets them skip SST files.
                    cf.set_prefix_extractor(SliceTransform::create_fixed_prefix(BLOCK_PREFIX_LEN));
                    cf.set_memtable_prefix_bloom_ratio(0.1);
                    cf.set_write_buffer_size(64 << 20);
                    cf.set_max_write_buffer_number(4);
                }
                CF_RAFT_LOG => {
                    cf.set_write_buffer_size(64 << 20);
                    cf.set_max_write_buffer_number(4);
                }
                _ => {}
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.to_path_buf(), source })?;
        let db = DB::open_cf_descriptors(&opts, &path, descriptors)
            .map_err(|source| StoreError::Open { path: path.clone(), source })?;
        let db = Arc::new(db);
        let (sync_tx, sync_rx) = mpsc::channel::<SyncJob>();
        let sync_db = db.clone();
        let syncer = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || syncer_loop(sync_db, sync_rx))
            .map_err(|e| StoreError::Sync(e.to_string()))?;
        Ok(Arc::new(Store { db, path, sync_tx: Some(sync_tx), syncer: Some(syncer) }))
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }

    /// Write without fsync (durable against process crash only).
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Write without the WAL. Only for state-machine updates that the Raft
    /// log can reproduce: after a crash they roll back to the last memtable
    /// flush and openraft re-applies the log from there. Log purges are
    /// written the same way and made durable only by
    /// [`Store::flush_memtables`], together with the state-machine writes
    /// before them, so the log always covers the gap.
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Flushes every memtable to SST files (atomically across column
    /// families), making unlogged state-machine writes durable.
    pub fn flush_memtables(&self) -> Result<(), StoreError> {
        let cfs: Vec<&ColumnFamily> = COLUMN_FAMILIES.iter().filter_map(|n| self.db.cf_handle(n)).collect();
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &fo)?;
        Ok(())
    }

    /// Write and fsync the WAL before returning.
    pub fn write_sync(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Queue `done` behind the syncer: it runs after everything written
    /// before this call is durable when `needs_sync`, or simply in order with
    /// earlier queued jobs otherwise.
    pub fn after_sync(&self, needs_sync: bool, done: SyncCallback) {
        let job = SyncJob { needs_sync, done };
        let unsent = match &self.sync_tx {
            Some(tx) => tx.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = unsent {
            (job.done)(Err(std::io::Error::other("wal syncer stopped")));
        }
    }

    /// Remove every key of `group` from every column family.
    pub fn delete_group(&self, group: GroupId) -> Result<(), StoreError> {
        let (start, end) = keys::group_range(group);
        let mut batch = WriteBatch::default();
        for name in COLUMN_FAMILIES {
            let cf = self.cf(name)?;
            batch.delete_range_cf(&cf, &start, &end);
        }
        self.write_sync(batch)
    }

    /// Volume groups with any Raft log, Raft state or state-machine record
    /// in this database (never the catalog): every replica this node ever
    /// hosted and has not dropped.
    pub fn stored_groups(&self) -> Result<Vec<GroupId>, StoreError> {
        let mut found = std::collections::BTreeSet::new();
        for name in [CF_RAFT_LOG, CF_RAFT_STATE, CF_SM] {
            let cf = self.cf(name)?;
            let mut from: Vec<u8> = Vec::new();
            // One seek per group: the log of a group can be long.
            loop {
                let mut it = self.db.iterator_cf(&cf, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward));
                let Some(item) = it.next() else { break };
                let (k, _) = item?;
                let Some(group) = k.get(..16).and_then(GroupId::from_slice) else { break };
                if !group.is_catalog() {
                    found.insert(group);
                }
                from = keys::group_range(group).1;
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Bytes of live data on disk (SST files + memtables), for capacity reports.
    pub fn approximate_size(&self) -> u64 {
        let mut total = 0u64;
        for name in COLUMN_FAMILIES {
            if let Some(cf) = self.db.cf_handle(name) {
                for prop in ["rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"] {
                    if let Ok(Some(v)) = self.db.property_int_value_cf(&cf, prop) {
                        total += v;
                    }
                }
            }
        }
        total
    }
}

fn syncer_loop(db: Arc<DB>, rx: mpsc::Receiver<SyncJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let result =
            if jobs.iter().any(|j| j.needs_sync) { db.flush_wal(true).map_err(|e| e.to_string()) } else { Ok(()) };
        for job in jobs {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.clone())),
            };
            (job.done)(r);
        }
    }
}

/// bincode configuration used for every record volumed stores or sends.
pub fn codec() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(value, codec()).map_err(|e| StoreError::Encode(e.to_string()))
}

pub fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, codec())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Corrupt { what: what.to_string(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_groups_lists_volume_groups_once_and_never_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = GroupId(uuid::Uuid::from_bytes([1; 16]));
        let b = GroupId(uuid::Uuid::from_bytes([2; 16]));
        let mut batch = WriteBatch::default();
        for i in 0..5 {
            batch.put_cf(store.cf(CF_RAFT_LOG).unwrap(), keys::log_key(a, i), b"entry");
        }
        batch.put_cf(store.cf(CF_RAFT_STATE).unwrap(), keys::raft_state_key(a, keys::RaftStateTag::Vote), b"vote");
        batch.put_cf(store.cf(CF_SM).unwrap(), keys::sm_key(b, keys::SmTag::Applied), b"applied");
        batch.put_cf(store.cf(CF_SM).unwrap(), keys::sm_key(GroupId::CATALOG, keys::SmTag::Catalog), b"catalog");
        store.write(batch).unwrap();
        assert_eq!(store.stored_groups().unwrap(), vec![a, b]);
        store.delete_group(a).unwrap();
        assert_eq!(store.stored_groups().unwrap(), vec![b]);
    }

    #[test]
    fn dropping_the_store_closes_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        store.after_sync(true, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.recv().unwrap());
        drop(store);
        // RocksDB refuses a second open of a database this process holds.
        let again = Store::open(dir.path()).expect("the first store released the database");
        drop(again);
    }
}
