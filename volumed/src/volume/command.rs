//! What a volume group's Raft log carries.

use bytes::Bytes;
use openraft::{BasicNode, Entry, EntryPayload};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    /// A user snapshot: pins this entry's own log index, so every replica
    /// cuts it at the same point. Idempotent by `id`.
    CreateSnapshot { id: Uuid, created_at_ms: i64 },
    /// Releases a user snapshot's pin; a sweep then drops what only it read.
    DeleteSnapshot { id: Uuid },
    /// This volume is restored from another volume's snapshot: I/O is
    /// refused until the copy finished. Applied before the volume gets a
    /// size, so no write can come first.
    StartHydration(Hydration),
    /// Blocks copied from the source snapshot, covering the source's
    /// blocks `from_block..next_block` (absent ones read as zeros). Applied
    /// only in order (`from_block` equal to the copy's cursor), so a
    /// leftover entry of an earlier leader cannot move the cursor wrongly.
    Hydrate { from_block: u64, next_block: u64, blocks: Vec<(u64, Bytes)> },
    /// File-volume operations (see `crate::file`), batched by the leader;
    /// each is applied atomically, in order, and answers in
    /// `VolumeResponse::file`.
    File(Vec<crate::file::ops::FileOp>),
}

/// Progress of a restore into this volume (replicated: a new leader
/// resumes where the last one stopped).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hydration {
    pub source_volume: Uuid,
    pub source_snapshot: Uuid,
    /// Log index of the snapshot in the source volume's group.
    pub source_index: u64,
    /// Blocks of the source at the snapshot: the copy covers `0..end_block`.
    pub end_block: u64,
    /// Blocks below this were copied.
    pub next_block: u64,
    pub copied_blocks: u64,
    /// Blocks holding data in the snapshot (the copy's total).
    pub total_blocks: u64,
    pub finished: bool,
}

impl VolumeCommand {
    pub fn needs_sync(&self) -> bool {
        match self {
            VolumeCommand::Io(ops) => ops.iter().any(|o| o.fua),
            // Like unflushed block writes: durable on a majority once an
            // fsync (a Flush entry) follows them.
            VolumeCommand::File(_) => false,
            // Snapshot records and restore progress are acted upon by the
            // catalog as soon as they apply: they must not be lost.
            VolumeCommand::Flush
            | VolumeCommand::Resize { .. }
            | VolumeCommand::SetFence { .. }
            | VolumeCommand::CreateSnapshot { .. }
            | VolumeCommand::DeleteSnapshot { .. }
            | VolumeCommand::StartHydration(_)
            | VolumeCommand::Hydrate { .. } => true,
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
    Write {
        offset: u64,
        data: Bytes,
    },
    /// Trim and write-zeroes: the range reads as zeros and its blocks are
    /// freed (unless a snapshot still holds them).
    Zero {
        offset: u64,
        len: u64,
    },
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
    /// CreateSnapshot: the snapshot (new or existing).
    pub snapshot: Option<UserSnapshot>,
    /// DeleteSnapshot: whether it existed.
    pub existed: bool,
    /// A command refused by the state machine, and why.
    pub refused: Option<String>,
    /// File: one result per operation of the entry.
    pub file: Vec<crate::file::ops::FileResult>,
}

/// A user snapshot as the volume group records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserSnapshot {
    pub id: Uuid,
    /// The log index it pins (and reads at).
    pub index: u64,
    pub created_at_ms: i64,
    /// Volume size at the snapshot.
    pub size_bytes: u64,
    /// Blocks holding data at the snapshot.
    pub live_blocks: u64,
}
