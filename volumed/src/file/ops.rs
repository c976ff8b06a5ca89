//! What a file volume's Raft log carries: one [`FileOp`] per namespace,
//! attribute or data change, and what applying it answered.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout::Inode;

/// A POSIX errno, mapped to the application at the FUSE edge.
pub type Errno = i32;

/// One change to the filesystem. `now` is the proposer's clock
/// (nanoseconds since the epoch), so every replica sets the same times.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileOp {
    /// Creates the root directory if the volume has none (idempotent).
    Init {
        now: i64,
    },
    /// Creates a file, directory, symlink (`target`), fifo, socket or
    /// device node. With `open`, that mount session holds it open.
    /// Without `excl`, an existing regular file is opened instead.
    Create {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Vec<u8>,
        excl: bool,
        open: Option<u64>,
        creator: (u64, u64),
        now: i64,
    },
    Link {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
        now: i64,
    },
    /// unlink, or rmdir with `dir`.
    Unlink {
        parent: u64,
        name: Vec<u8>,
        dir: bool,
        now: i64,
    },
    /// `flags`: RENAME_NOREPLACE / RENAME_EXCHANGE.
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
        now: i64,
    },
    SetAttr {
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<i64>,
        mtime: Option<i64>,
        now: i64,
    },
    Write {
        ino: u64,
        offset: u64,
        data: Bytes,
        now: i64,
    },
    /// `flags`: XATTR_CREATE / XATTR_REPLACE.
    SetXattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
        now: i64,
    },
    RemoveXattr {
        ino: u64,
        name: Vec<u8>,
        now: i64,
    },
    /// Mount `session` holds `ino` open (idempotent). Answers the current
    /// attributes: open is where close-to-open consistency fetches them.
    Open {
        ino: u64,
        session: u64,
    },
    /// Mount `session` closed its last handle of `ino`; an unlinked inode
    /// nobody holds open any more is freed.
    Release {
        ino: u64,
        session: u64,
    },
    /// Mount `session` is gone: its open handles are dropped.
    EndSession {
        session: u64,
    },
}

impl FileOp {
    pub fn data_len(&self) -> usize {
        match self {
            FileOp::Write { data, .. } => data.len(),
            FileOp::SetXattr { value, .. } => value.len(),
            _ => 0,
        }
    }

    /// Short name for logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            FileOp::Init { .. } => "init",
            FileOp::Create { .. } => "create",
            FileOp::Link { .. } => "link",
            FileOp::Unlink { dir: false, .. } => "unlink",
            FileOp::Unlink { dir: true, .. } => "rmdir",
            FileOp::Rename { .. } => "rename",
            FileOp::SetAttr { .. } => "setattr",
            FileOp::Write { .. } => "write",
            FileOp::SetXattr { .. } => "setxattr",
            FileOp::RemoveXattr { .. } => "removexattr",
            FileOp::Open { .. } => "open",
            FileOp::Release { .. } => "release",
            FileOp::EndSession { .. } => "end-session",
        }
    }
}

/// Attributes of one inode, as FUSE needs them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    /// Data blocks (4 KiB) holding content.
    pub blocks: u64,
    pub generation: u64,
}

impl Attr {
    pub fn of(ino: u64, i: &Inode) -> Attr {
        Attr {
            ino,
            mode: i.mode,
            uid: i.uid,
            gid: i.gid,
            nlink: i.nlink,
            size: i.size,
            rdev: i.rdev,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            blocks: i.blocks,
            generation: i.generation,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileResult {
    Ok,
    Attr(Attr),
    Err(Errno),
}
