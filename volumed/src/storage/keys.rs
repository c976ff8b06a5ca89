//! The key codec: every RocksDB key volumed writes is built here, so the
//! on-disk layout is defined in one place (as in TiKV's `keys` module).
//!
//! All groups (the catalog and every volume replica on this node) share one
//! RocksDB. Each key starts with the 16-byte group id, so one group's data is
//! a contiguous range that can be iterated or dropped with one range delete.
//! Integers are big-endian so byte order equals numeric order.
//!
//! | column family | key                                   | value                         |
//! |---------------|---------------------------------------|-------------------------------|
//! | `raft_log`    | group ‖ index:u64                      | bincode `Entry`               |
//! | `raft_state`  | group ‖ tag:u8                         | vote / purged id / committed  |
//! | `sm`          | group ‖ tag:u8 [‖ suffix]              | state-machine metadata        |
//! | `blocks`      | group ‖ block:u64 ‖ !version:u64       | crc32:u32 ‖ 4 KiB data, or empty (zero block) |
//! | `heads`       | group ‖ block:u64                      | newest version:u64 ‖ zero:u8  |
//!
//! A block's `version` is the Raft log index of the command that wrote it;
//! storing its bitwise complement makes a forward seek find the newest
//! version first. Snapshots are "the newest version at or below index S",
//! which is what makes them O(1) to take (see `volume::blocks`).
//!
//! `heads` indexes the newest stored version of every block that has one,
//! so a write learns what it replaces from a small record instead of
//! loading the 4 KiB value a seek in `blocks` lands on.

use uuid::Uuid;

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_SM: &str = "sm";
pub const CF_BLOCKS: &str = "blocks";
pub const CF_HEADS: &str = "heads";
pub const COLUMN_FAMILIES: [&str; 5] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_SM, CF_BLOCKS, CF_HEADS];

/// Length of the group-and-block prefix of a block key (the RocksDB prefix
/// extractor length of the `blocks` column family).
pub const BLOCK_PREFIX_LEN: usize = 16 + 8;

/// Identifies one Raft group on disk and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct GroupId(pub Uuid);

impl GroupId {
    /// The cluster-wide catalog group.
    pub const CATALOG: GroupId = GroupId(Uuid::nil());

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_slice(b: &[u8]) -> Option<GroupId> {
        Uuid::from_slice(b).ok().map(GroupId)
    }

    pub fn is_catalog(&self) -> bool {
        self.0.is_nil()
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_catalog() {
            f.write_str("catalog")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Tags under `raft_state`.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum RaftStateTag {
    Vote = 1,
    Purged = 2,
    Committed = 3,
}

/// Tags under `sm`.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum SmTag {
    /// Last applied log id and membership.
    Applied = 1,
    /// Volume metadata (size, fence, counters).
    VolumeMeta = 2,
    /// The current Raft snapshot's meta (and, for the catalog, its data).
    RaftSnapshot = 3,
    /// A user snapshot (suffix: snapshot id bytes).
    UserSnapshot = 4,
    /// Set while a received snapshot is being installed (crash recovery).
    InstallMarker = 5,
    /// Catalog state machine data (suffix: entity key).
    Catalog = 6,
    /// File-volume state (suffix: file-system key).
    File = 7,
    /// Present once the group's `heads` index matches its blocks (absent
    /// in data directories written before the index existed).
    HeadsBuilt = 8,
}

fn with_group(group: GroupId, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + extra);
    k.extend_from_slice(group.as_bytes());
    k
}

pub fn log_key(group: GroupId, index: u64) -> Vec<u8> {
    let mut k = with_group(group, 8);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Index stored in a `raft_log` key, if the key belongs to `group`.
pub fn log_index(group: GroupId, key: &[u8]) -> Option<u64> {
    if key.len() != 24 || &key[..16] != group.as_bytes() {
        return None;
    }
    Some(u64::from_be_bytes(key[16..24].try_into().ok()?))
}

pub fn raft_state_key(group: GroupId, tag: RaftStateTag) -> Vec<u8> {
    let mut k = with_group(group, 1);
    k.push(tag as u8);
    k
}

pub fn sm_key(group: GroupId, tag: SmTag) -> Vec<u8> {
    let mut k = with_group(group, 1);
    k.push(tag as u8);
    k
}

pub fn sm_key_with(group: GroupId, tag: SmTag, suffix: &[u8]) -> Vec<u8> {
    let mut k = with_group(group, 1 + suffix.len());
    k.push(tag as u8);
    k.extend_from_slice(suffix);
    k
}

/// `[start, end)` covering every `sm` key of `group` with `tag`.
pub fn sm_tag_range(group: GroupId, tag: SmTag) -> (Vec<u8>, Vec<u8>) {
    let start = sm_key(group, tag);
    let mut end = with_group(group, 1);
    end.push(tag as u8 + 1);
    (start, end)
}

pub fn block_key(group: GroupId, block: u64, version: u64) -> Vec<u8> {
    let mut k = with_group(group, 16);
    k.extend_from_slice(&block.to_be_bytes());
    k.extend_from_slice(&(!version).to_be_bytes());
    k
}

/// The 24-byte prefix shared by every version of one block.
pub fn block_prefix(group: GroupId, block: u64) -> Vec<u8> {
    let mut k = with_group(group, 8);
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// The `heads` key of one block.
pub fn head_key(group: GroupId, block: u64) -> Vec<u8> {
    block_prefix(group, block)
}

/// Decodes a `blocks` key into (group, block, version).
pub fn parse_block_key(key: &[u8]) -> Option<(GroupId, u64, u64)> {
    if key.len() != 32 {
        return None;
    }
    let group = GroupId::from_slice(&key[..16])?;
    let block = u64::from_be_bytes(key[16..24].try_into().ok()?);
    let version = !u64::from_be_bytes(key[24..32].try_into().ok()?);
    Some((group, block, version))
}

/// `[start, end)` covering every key of `group` in any column family keyed
/// by group first.
pub fn group_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let start = group.as_bytes().to_vec();
    let mut end = start.clone();
    // The successor of a 16-byte prefix: increment with carry. The all-ones
    // group id cannot be produced by uuid v4, but handle it anyway.
    for i in (0..16).rev() {
        if end[i] == 0xff {
            end[i] = 0;
        } else {
            end[i] += 1;
            return (start, end);
        }
    }
    let mut end = vec![0xff; 17];
    end[16] = 0xff;
    (start, end)
}

/// `[start, end)` of the block keys of `group` for blocks `from..to`.
pub fn block_range(group: GroupId, from: u64, to: u64) -> (Vec<u8>, Vec<u8>) {
    (block_prefix(group, from), block_prefix(group, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_versions_sort_newest_first() {
        let g = GroupId(Uuid::new_v4());
        let old = block_key(g, 7, 10);
        let new = block_key(g, 7, 11);
        let next_block = block_key(g, 8, 1);
        assert!(new < old, "newer version must sort first");
        assert!(old < next_block);
        assert_eq!(parse_block_key(&new), Some((g, 7, 11)));
    }

    #[test]
    fn group_range_contains_all_group_keys_only() {
        let g = GroupId(Uuid::from_bytes([1; 16]));
        let (s, e) = group_range(g);
        for k in [log_key(g, 0), log_key(g, u64::MAX), block_key(g, u64::MAX, 0), sm_key(g, SmTag::File)] {
            assert!(k.as_slice() >= s.as_slice() && k.as_slice() < e.as_slice());
        }
        let other = GroupId(Uuid::from_bytes([2; 16]));
        assert!(log_key(other, 0).as_slice() >= e.as_slice());
    }

    #[test]
    fn log_index_roundtrip() {
        let g = GroupId(Uuid::new_v4());
        assert_eq!(log_index(g, &log_key(g, 42)), Some(42));
        assert_eq!(log_index(GroupId::CATALOG, &log_key(g, 42)), None);
    }
}
