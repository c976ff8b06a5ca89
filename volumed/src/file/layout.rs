//! Where a file volume keeps its objects: every inode, directory entry,
//! open-handle record and data chunk is a *block* of the volume's versioned
//! block store, at a block number reserved for it.
//!
//! Keeping the filesystem in the block keyspace is what lets every existing
//! mechanism carry it unchanged: Raft snapshot streaming (`scan_visible`)
//! and install, user snapshots (a pinned index is a consistent cut of the
//! whole tree), CRC checks with repair from a peer, scrub, garbage
//! collection of superseded versions, log compaction. Data chunks are
//! ordinary 4 KiB blocks; metadata records are shorter values under the
//! same `crc32 ‖ bytes` framing (at most one block long).
//!
//! Block numbers (the top 4 bits name the kind):
//!
//! | kind | block number                              | value                         |
//! |------|-------------------------------------------|-------------------------------|
//! | 0    | ino:32 ‖ file block:28                    | 4 KiB of file data            |
//! | 1    | 1 ‖ ino                                   | bincode [`Inode`]             |
//! | 2    | 2 ‖ parent ino:32 ‖ name hash:28          | bincode [`Bucket`] (entries)  |
//! | 3    | 3 ‖ 0                                     | bincode [`Super`] (counters)  |
//! | 4    | 4 ‖ ino                                   | bincode [`OpenRefs`]          |
//!
//! Entries of one directory are contiguous and ordered by name hash, so a
//! readdir is one range scan and its cookie (hash, position) stays valid
//! while the directory changes, as with ext4's hashed directories.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::volume::command::BLOCK_SIZE;

pub const ROOT_INO: u64 = 1;
/// Inode numbers are never reused; 2^32 of them over a volume's life.
pub const MAX_INO: u64 = (1 << 32) - 1;
const FILE_BLOCK_BITS: u32 = 28;
/// Largest file: 2^28 blocks of 4 KiB (1 TiB).
pub const MAX_FILE_SIZE: u64 = (1u64 << FILE_BLOCK_BITS) * BLOCK_SIZE;
const KIND_SHIFT: u32 = 60;
const KIND_INODE: u64 = 1 << KIND_SHIFT;
const KIND_DENTRY: u64 = 2 << KIND_SHIFT;
const KIND_SUPER: u64 = 3 << KIND_SHIFT;
const KIND_OPEN: u64 = 4 << KIND_SHIFT;
/// Largest encoded record: one block, like an ext4 inode's xattr space.
pub const MAX_RECORD: usize = BLOCK_SIZE as usize;
pub const MAX_NAME: usize = 255;
/// Bytes of quota one inode costs in the inode limit (statfs `f_files`).
pub const BYTES_PER_INODE: u64 = 4096;

pub fn data_block(ino: u64, index: u64) -> u64 {
    (ino << FILE_BLOCK_BITS) | index
}

/// `[start, end)` of the data blocks of `ino`.
pub fn data_range(ino: u64) -> (u64, u64) {
    (ino << FILE_BLOCK_BITS, (ino + 1) << FILE_BLOCK_BITS)
}

pub fn inode_block(ino: u64) -> u64 {
    KIND_INODE | ino
}

pub fn dentry_block(parent: u64, hash: u64) -> u64 {
    KIND_DENTRY | (parent << FILE_BLOCK_BITS) | (hash & ((1 << FILE_BLOCK_BITS) - 1))
}

/// `[start, end)` of the entry buckets of directory `parent`.
pub fn dentry_range(parent: u64) -> (u64, u64) {
    (KIND_DENTRY | (parent << FILE_BLOCK_BITS), KIND_DENTRY | ((parent + 1) << FILE_BLOCK_BITS))
}

/// The hash part of a bucket's block number.
pub fn bucket_hash(block: u64) -> u64 {
    block & ((1 << FILE_BLOCK_BITS) - 1)
}

pub const SUPER_BLOCK: u64 = KIND_SUPER;

pub fn open_block(ino: u64) -> u64 {
    KIND_OPEN | ino
}

/// `[start, end)` of every open-handle record.
pub fn open_range() -> (u64, u64) {
    (KIND_OPEN, KIND_OPEN + (1 << KIND_SHIFT))
}

pub fn ino_of_open_block(block: u64) -> u64 {
    block & !(0xf << KIND_SHIFT)
}

/// FNV-1a, 64 bit: fixed forever, since it places entries on disk.
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) & ((1 << FILE_BLOCK_BITS) - 1)
}

/// readdir cookie of the `pos`-th entry of the bucket with `hash`;
/// 1 and 2 are "." and "..".
pub fn cookie(hash: u64, pos: usize) -> u64 {
    ((hash + 1) << 8) | (pos as u64 & 0xff)
}

/// The first (hash, position) a readdir resumes at after `cookie`.
pub fn resume_after(cookie: u64) -> (u64, usize) {
    if cookie < 256 {
        return (0, 0);
    }
    ((cookie >> 8) - 1, (cookie & 0xff) as usize + 1)
}

/// One inode. Times are nanoseconds since the epoch, chosen by the node
/// that proposed the operation (so every replica applies the same value).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inode {
    /// `st_mode`, file type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    /// Directories: the parent (for `..`).
    pub parent: u64,
    /// Data blocks holding non-zero content.
    pub blocks: u64,
    /// Symlink target.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// (session, operation) that created it: a retried create after a lost
    /// answer finds its own inode instead of failing with EEXIST.
    pub creator: (u64, u64),
    /// Log index of the creation (FUSE generation).
    pub generation: u64,
}

impl Inode {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dentry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// File type bits of the target.
    pub kind: u32,
}

/// The entries of one directory whose names share a hash (almost always
/// one entry).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bucket(pub Vec<Dentry>);

/// Volume-wide counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Super {
    pub next_ino: u64,
    pub inodes: u64,
    pub data_blocks: u64,
    /// Unlinked inodes still open somewhere.
    pub orphans: u64,
}

impl Default for Super {
    fn default() -> Self {
        Super { next_ino: ROOT_INO + 1, inodes: 0, data_blocks: 0, orphans: 0 }
    }
}

/// Mount sessions that hold an inode open.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenRefs(pub BTreeSet<u64>);

/// Inodes a volume of `size_bytes` may hold.
pub fn max_inodes(size_bytes: u64) -> u64 {
    (size_bytes / BYTES_PER_INODE).max(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_do_not_overlap() {
        let (ds, de) = data_range(MAX_INO);
        assert!(de <= inode_block(0), "data of the last inode stays below the inode records");
        assert!(ds < de);
        let (s, e) = dentry_range(MAX_INO);
        assert!(inode_block(MAX_INO) < s && e <= SUPER_BLOCK);
        assert!(SUPER_BLOCK < open_range().0);
        assert_eq!(ino_of_open_block(open_block(77)), 77);
        assert_eq!(bucket_hash(dentry_block(5, name_hash(b"x"))), name_hash(b"x"));
    }

    #[test]
    fn cookies_resume_after_themselves() {
        assert_eq!(resume_after(0), (0, 0));
        assert_eq!(resume_after(2), (0, 0));
        let c = cookie(41, 0);
        assert!(c > 2);
        assert_eq!(resume_after(c), (41, 1));
        assert!(cookie(41, 1) > c && cookie(42, 0) > cookie(41, 7));
    }
}
