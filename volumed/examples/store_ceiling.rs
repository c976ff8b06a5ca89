//! How fast this machine's RocksDB, opened exactly as volumed opens it,
//! takes block data with nothing else in the way: no NBD, no Raft, no
//! version lookups, no accounting. It bounds what any volumed write path
//! that keeps block data and the Raft log in the node's RocksDB can reach
//! (see docs/benchmarks.md, "Ceiling of the storage design").
//!
//!   cargo run --release -p volumed --example store_ceiling -- [SECONDS] [DIR]
//!
//! Each run overwrites a 1 GiB range with 4 KiB blocks (crc ‖ data, as
//! stored), in one of two patterns: `seq`, 1 MiB batches of consecutive
//! blocks (what 1 MiB sequential writes become), and `rand`, batches of 32
//! random blocks (what 4 KiB random writes at queue depth 32 become). Per
//! pattern, three runs:
//! - `blocks`: each batch written without the WAL, every block under one
//!   fixed key (the least a state machine can do per block);
//! - `log`: each batch's payload appended as one Raft log entry with
//!   the WAL, purged as volumes purge theirs (at every snapshot of
//!   `raft::volume_config`'s policy, keeping the entries it keeps, after
//!   flushing the memtables);
//! - `log+blocks`: both, on two threads (log append and apply run in
//!   parallel in volumed as well).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use openraft::SnapshotPolicy;
use rocksdb::WriteBatch;
use volumed::raft::volume_config;
use volumed::storage::keys::{self, GroupId, CF_BLOCKS, CF_RAFT_LOG};
use volumed::storage::{Store, StoreError};
use volumed::volume::blocks::encode_value;

const BLOCK: usize = 4096;
const RANGE_BLOCKS: u64 = (1 << 30) / BLOCK as u64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(15);
    let parent = args.next().map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let config = volume_config("ceiling")?;
    let SnapshotPolicy::LogsSinceLast(every) = config.snapshot_policy else {
        return Err("volumes no longer snapshot every N entries: update this example".into());
    };
    let purge = Purge { every, keep: config.max_in_snapshot_log_to_keep };
    for (pattern, per_batch) in [("seq", 256u64), ("rand", 32)] {
        for mode in ["blocks", "log", "log+blocks"] {
            let dir = tempfile::tempdir_in(&parent)?;
            let store = Store::open(dir.path())?;
            let bytes = run(&store, mode, per_batch, purge, Duration::from_secs(secs))?;
            let rate = bytes as f64 / secs as f64;
            println!("{pattern} {mode}: {:.0} MB/s, {:.0} blocks/s", rate / 1e6, rate / BLOCK as f64);
        }
    }
    Ok(())
}

/// Payload bytes stored in `time`.
/// When the log is purged and how much of it stays.
#[derive(Clone, Copy)]
struct Purge {
    every: u64,
    keep: u64,
}

/// With 256 blocks per batch the batches are consecutive; with fewer,
/// every block lands at random.
fn run(store: &Arc<Store>, mode: &str, per_batch: u64, purge: Purge, time: Duration) -> Result<u64, StoreError> {
    let group = GroupId(uuid::Uuid::from_bytes([7; 16]));
    let payload: Vec<u8> = (0..BLOCK * per_batch as usize).map(|i| (i * 31 % 251) as u8).collect();
    let deadline = Instant::now() + time;
    let stop = Arc::new(AtomicBool::new(false));
    let with_blocks = mode != "log";
    let with_log = mode != "blocks";
    let (tx, rx) = mpsc::sync_channel::<u64>(4);
    let applier = {
        let store = store.clone();
        let payload = payload.clone();
        std::thread::spawn(move || -> Result<u64, StoreError> {
            let blocks_cf = store.cf(CF_BLOCKS)?;
            let mut done = 0u64;
            // xorshift: cheap, and the same sequence every run.
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            while let Ok(entry) = rx.recv() {
                let first = (entry * per_batch) % RANGE_BLOCKS;
                let mut batch = WriteBatch::default();
                for (i, chunk) in payload.chunks(BLOCK).enumerate() {
                    let block = if per_batch == 256 {
                        first + i as u64
                    } else {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed % RANGE_BLOCKS
                    };
                    batch.put_cf(&blocks_cf, keys::block_key(group, block, 1), encode_value(chunk));
                }
                store.write_unlogged(batch)?;
                done += payload.len() as u64;
            }
            Ok(done)
        })
    };
    let log_cf = store.cf(CF_RAFT_LOG)?;
    let mut entry = 0u64;
    let mut logged = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if with_log {
            let mut batch = WriteBatch::default();
            batch.put_cf(&log_cf, keys::log_key(group, entry), &payload);
            store.write(batch)?;
            logged += payload.len() as u64;
            if entry > purge.keep && entry.is_multiple_of(purge.every) {
                store.flush_memtables()?;
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(&log_cf, keys::log_key(group, 0), keys::log_key(group, entry - purge.keep));
                store.write(batch)?;
            }
        }
        if with_blocks && tx.send(entry).is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        entry += 1;
    }
    drop(tx);
    let applied = applier.join().map_err(|_| StoreError::Sync("applier panicked".into()))??;
    Ok(if with_blocks { applied } else { logged })
}
