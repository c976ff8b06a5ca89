//! Direct access to a stopped node's RocksDB, through volumed's own key
//! codec and value format: what bit rot and leftover data look like from
//! outside the daemon.

#![allow(dead_code)]

use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, DB};
use uuid::Uuid;
use volumed::storage::keys::{self, GroupId, CF_BLOCKS, COLUMN_FAMILIES};
use volumed::volume::blocks::{decode_value, Stored};

/// Opens `<data_dir>/db` for writing. The node must be stopped (RocksDB
/// holds a lock on it).
pub fn open(data_dir: &Path) -> DB {
    let opts = Options::default();
    DB::open_cf(&opts, data_dir.join("db"), COLUMN_FAMILIES)
        .unwrap_or_else(|e| panic!("open {}: {e}", data_dir.display()))
}

fn group(volume: &str) -> GroupId {
    GroupId(Uuid::parse_str(volume).expect("volume id"))
}

/// Keys of `volume` in every column family.
pub fn group_keys(data_dir: &Path, volume: &str) -> usize {
    let db = open(data_dir);
    let (start, end) = keys::group_range(group(volume));
    let mut n = 0;
    for cf in COLUMN_FAMILIES {
        let h = db.cf_handle(cf).expect("column family");
        for item in db.iterator_cf(&h, IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item.expect("iterate");
            if k.as_ref() >= end.as_slice() {
                break;
            }
            n += 1;
        }
    }
    n
}

/// Flips a byte in the data of the newest stored version of `block`.
/// Returns that version.
pub fn corrupt_block(data_dir: &Path, volume: &str, block: u64) -> u64 {
    let db = open(data_dir);
    let cf = db.cf_handle(CF_BLOCKS).expect("blocks column family");
    let prefix = keys::block_prefix(group(volume), block);
    let (key, mut value) = db
        .iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward))
        .next()
        .expect("a stored block")
        .expect("iterate");
    assert!(key.starts_with(&prefix), "block {block} of {volume} is not stored on {}", data_dir.display());
    let (_, b, version) = keys::parse_block_key(&key).expect("block key");
    assert_eq!(b, block);
    assert!(decode_value(&value).is_some_and(|s| !s.is_zero()), "block {block} must hold intact data");
    value[4 + 1000] ^= 0x5a;
    value[4 + 3000] ^= 0x01;
    db.put_cf(&cf, &key, &value).expect("put");
    db.flush_cf(&cf).expect("flush");
    version
}

/// The newest stored content of `block` as the node would read it: `None`
/// when absent, `Some(Err(()))` when it fails its checksum.
pub fn stored_block(db: &DB, volume: &str, block: u64) -> Option<Result<Vec<u8>, ()>> {
    let cf = db.cf_handle(CF_BLOCKS).expect("blocks column family");
    let prefix = keys::block_prefix(group(volume), block);
    let (key, value) = db.iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward)).next()?.expect("iterate");
    if !key.starts_with(&prefix) {
        return None;
    }
    Some(match decode_value(&value) {
        Some(Stored::Data(d)) => Ok(d),
        Some(Stored::Zero) => Ok(vec![0; 4096]),
        None => Err(()),
    })
}

/// Stored block versions of `volume` (keys in the `blocks` column family).
pub fn block_keys(data_dir: &Path, volume: &str) -> usize {
    let db = open(data_dir);
    let cf = db.cf_handle(CF_BLOCKS).expect("blocks column family");
    let (start, end) = keys::group_range(group(volume));
    let mut n = 0;
    for item in db.iterator_cf(&cf, IteratorMode::From(&start, Direction::Forward)) {
        let (k, _) = item.expect("iterate");
        if k.as_ref() >= end.as_slice() {
            break;
        }
        n += 1;
    }
    n
}
