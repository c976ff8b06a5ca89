//! Reads of a file volume, answered by its leader from the applied state
//! (under the same read lease as block reads). Every value is checked
//! against its CRC; a mismatch is repaired from a peer replica first.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout::{self, Bucket, Inode, Super, ROOT_INO};
use super::ops::{Attr, Errno};
use crate::storage::decode;
use crate::volume::blocks::{decode_value, BlockReadError, Stored};
use crate::volume::command::BLOCK_SIZE;
use crate::volume::replica::VolumeReplica;

/// Why a read failed: an errno for the application, or a storage fault.
#[derive(Debug)]
pub enum ReadFail {
    Errno(Errno),
    Fault(String),
}

type R<T> = Result<T, ReadFail>;

fn errno<T>(e: Errno) -> R<T> {
    Err(ReadFail::Errno(e))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    pub cookie: u64,
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: u32,
}

/// What `statfs` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsStats {
    pub size_bytes: u64,
    pub used_blocks: u64,
    pub inodes: u64,
    pub max_inodes: u64,
    pub orphans: u64,
}

async fn record(r: &VolumeReplica, block: u64) -> R<Option<Vec<u8>>> {
    let stored = match r.blocks().read_at(block, u64::MAX) {
        Ok(None) => return Ok(None),
        Ok(Some((_, s))) => s,
        Err(BlockReadError::Store(e)) => return Err(ReadFail::Fault(e.to_string())),
        Err(BlockReadError::Checksum { block, version }) => {
            r.repair_for_read(block, version).await.map_err(|e| ReadFail::Fault(e.to_string()))?
        }
    };
    Ok(match stored {
        Stored::Zero => None,
        Stored::Data(d) => Some(d),
    })
}

fn decoded<T: serde::de::DeserializeOwned>(what: &str, raw: &[u8]) -> R<T> {
    decode(what, raw).map_err(|e| ReadFail::Fault(e.to_string()))
}

pub async fn inode(r: &VolumeReplica, ino: u64) -> R<Inode> {
    if ino == 0 || ino > layout::MAX_INO {
        return errno(libc::ENOENT);
    }
    match record(r, layout::inode_block(ino)).await? {
        Some(raw) => decoded("inode", &raw),
        None => errno(libc::ENOENT),
    }
}

pub async fn getattr(r: &VolumeReplica, ino: u64) -> R<Attr> {
    Ok(Attr::of(ino, &inode(r, ino).await?))
}

pub async fn lookup(r: &VolumeReplica, parent: u64, name: &[u8]) -> R<Attr> {
    let dir = inode(r, parent).await?;
    if !dir.is_dir() {
        return errno(libc::ENOTDIR);
    }
    if name.len() > layout::MAX_NAME {
        return errno(libc::ENAMETOOLONG);
    }
    let block = layout::dentry_block(parent, layout::name_hash(name));
    let Some(raw) = record(r, block).await? else { return errno(libc::ENOENT) };
    let bucket: Bucket = decoded("directory bucket", &raw)?;
    match bucket.0.iter().find(|d| d.name == name) {
        Some(d) => getattr(r, d.ino).await,
        None => errno(libc::ENOENT),
    }
}

/// Entries of `dir` after readdir cookie `after`, at most `max`, and the
/// directory's parent (for `..`).
pub async fn readdir(r: &VolumeReplica, dir: u64, after: u64, max: usize) -> R<(u64, Vec<DirEntry>)> {
    let d = inode(r, dir).await?;
    if !d.is_dir() {
        return errno(libc::ENOTDIR);
    }
    let parent = if dir == ROOT_INO { ROOT_INO } else { d.parent };
    let (start_hash, start_pos) = layout::resume_after(after);
    let (from, to) = layout::dentry_range(dir);
    let from = from + start_hash;
    let mut raw: Vec<(u64, Vec<u8>)> = Vec::new();
    r.blocks()
        .scan_at(u64::MAX, from, to, |b, v| {
            raw.push((b, v.to_vec()));
            raw.len() < max
        })
        .map_err(|e| ReadFail::Fault(e.to_string()))?;
    let mut out = Vec::new();
    for (block, value) in raw {
        let data = match decode_value(&value) {
            Some(Stored::Data(d)) => d,
            Some(Stored::Zero) => continue,
            // Re-read through the repairing path.
            None => match record(r, block).await? {
                Some(d) => d,
                None => continue,
            },
        };
        let bucket: Bucket = decoded("directory bucket", &data)?;
        let hash = layout::bucket_hash(block);
        for (pos, e) in bucket.0.into_iter().enumerate() {
            if hash == start_hash && pos < start_pos && after >= 256 {
                continue;
            }
            out.push(DirEntry { cookie: layout::cookie(hash, pos), name: e.name, ino: e.ino, kind: e.kind });
        }
    }
    Ok((parent, out))
}

pub async fn read(r: &VolumeReplica, ino: u64, offset: u64, len: u32) -> R<Bytes> {
    let i = inode(r, ino).await?;
    if i.is_dir() {
        return errno(libc::EISDIR);
    }
    if offset >= i.size || len == 0 {
        return Ok(Bytes::new());
    }
    let end = (offset + len as u64).min(i.size);
    let first = offset / BLOCK_SIZE;
    let count = (end - 1) / BLOCK_SIZE - first + 1;
    let buf = r.read_blocks(layout::data_block(ino, first), count).await.map_err(|e| ReadFail::Fault(e.to_string()))?;
    let start = (offset - first * BLOCK_SIZE) as usize;
    Ok(buf.freeze().slice(start..start + (end - offset) as usize))
}

pub async fn readlink(r: &VolumeReplica, ino: u64) -> R<Vec<u8>> {
    let i = inode(r, ino).await?;
    if i.file_type() != libc::S_IFLNK {
        return errno(libc::EINVAL);
    }
    Ok(i.target)
}

pub async fn getxattr(r: &VolumeReplica, ino: u64, name: &[u8]) -> R<Vec<u8>> {
    let i = inode(r, ino).await?;
    match i.xattrs.get(name) {
        Some(v) => Ok(v.clone()),
        None => errno(libc::ENODATA),
    }
}

pub async fn listxattr(r: &VolumeReplica, ino: u64) -> R<Vec<Vec<u8>>> {
    Ok(inode(r, ino).await?.xattrs.into_keys().collect())
}

pub async fn statfs(r: &VolumeReplica) -> R<FsStats> {
    let size_bytes = r.size();
    let sup: Super = match record(r, layout::SUPER_BLOCK).await? {
        Some(raw) => decoded("file volume counters", &raw)?,
        None => Super::default(),
    };
    Ok(FsStats {
        size_bytes,
        used_blocks: sup.data_blocks,
        inodes: sup.inodes,
        max_inodes: layout::max_inodes(size_bytes),
        orphans: sup.orphans,
    })
}
