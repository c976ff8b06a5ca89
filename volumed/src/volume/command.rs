//! What a volume group's Raft log carries.

use bytes::Bytes;
use openraft::{BasicNode, Entry, EntryPayload};
use serde::{Deserialize, Serialize};

use crate::storage::log_store::GroupTypeConfig;

/// Block size of every volume: the unit of checksums, versions and
/// copy-on-write. 4 KiB matches the page size and what filesystems issue.
pub const BLOCK_SIZE: u64 = 4096;

/// Largest amount of data one log entry carries; bigger writes are split so
/// a single AppendEntries stays bounded.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;

openraft::declare_raft_types!(
    /// Type configuration of a volume group.
    pub VolumeTc:
        D = VolumeCommand,
        R = VolumeResponse,
        Node = BasicNode,
        SnapshotData = crate::volume::snapshot::VolumeSnapshotData,
);

impl GroupTypeConfig for VolumeTc {
    fn entry_needs_sync(entry: &Entry<Self>) -> bool {
        match &entry.payload {
            EntryPayload::Blank => false,
            EntryPayload::Membership(_) => true,
            EntryPayload::Normal(cmd) => cmd.needs_sync(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VolumeCommand {
    /// Block writes, batched by the leader from concurrent requests.
    Io(Vec<IoOp>),
    /// No state change: appending it fsyncs the WAL on every replica that
    /// stores it, so once it commits, everything before it is durable on a
    /// majority. This is how NBD FLUSH is implemented.
    Flush,
    /// Grow the volume (set by the catalog's size).
    Resize { size_bytes: u64 },
    /// Fencing: reject writes whose attachment generation is below `floor`;
    /// with `exclusive`, also reject writes that carry no generation.
    SetFence { floor: u64, exclusive: bool },
}

impl VolumeCommand {
    pub fn needs_sync(&self) -> bool {
        match self {
            VolumeCommand::Io(ops) => ops.iter().any(|o| o.fua),
            VolumeCommand::Flush | VolumeCommand::Resize { .. } | VolumeCommand::SetFence { .. } => true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IoOp {
    /// Attachment generation of the writer; `None` for admin connections.
    pub generation: Option<u64>,
    pub fua: bool,
    pub kind: IoKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum IoKind {
    Write { offset: u64, data: Bytes },
    /// Trim and write-zeroes: the range reads as zeros and its blocks are
    /// freed (unless a snapshot still holds them).
    Zero { offset: u64, len: u64 },
}

impl IoOp {
    pub fn data_len(&self) -> usize {
        match &self.kind {
            IoKind::Write { data, .. } => data.len(),
            IoKind::Zero { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OpResult {
    Ok,
    /// The writer's generation is older than the fence (or it has none and
    /// the volume is exclusively attached).
    Fenced,
    OutOfRange,
    /// A block needed for a partial write failed its checksum everywhere.
    Corrupt,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VolumeResponse {
    pub results: Vec<OpResult>,
}
