//! The leader side of file volumes: requests from mounts (on any node)
//! arrive as `VolumeControl` calls and are answered here — operations are
//! batched into log entries, reads come from the leader's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use openraft::Raft;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, Instrument};

use super::ops::{Attr, Errno, FileOp, FileResult};
use super::read::{self, DirEntry, FsStats, ReadFail};
use crate::cluster::node::NodeRuntime;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::volume::command::{VolumeCommand, VolumeTc, MAX_ENTRY_BYTES};
use crate::volume::replica::VolumeReplica;

/// Most operations one log entry carries, and entries in flight (more than
/// the block proposer: a sequential writer keeps up to 8 MiB in flight).
const MAX_OPS_PER_ENTRY: usize = 256;
const MAX_PROPOSALS_IN_FLIGHT: usize = 4;
/// Most directory buckets one readdir answer covers.
const READDIR_BATCH: usize = 512;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileRequest {
    Apply(Vec<FileOp>),
    GetAttr {
        ino: u64,
    },
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    ReadDir {
        ino: u64,
        after: u64,
    },
    Read {
        ino: u64,
        offset: u64,
        len: u32,
    },
    ReadLink {
        ino: u64,
    },
    GetXattr {
        ino: u64,
        name: Vec<u8>,
    },
    ListXattr {
        ino: u64,
    },
    StatFs,
    /// fsync: returns once everything applied before is durable on a
    /// majority.
    Sync,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileResponse {
    Results(Vec<FileResult>),
    Attr(Attr),
    Entries { parent: u64, entries: Vec<DirEntry> },
    Data(Bytes),
    Bytes(Vec<u8>),
    Names(Vec<Vec<u8>>),
    Stats(FsStats),
    Done,
    Err(Errno),
}

/// Why a request was not answered: the mount retries elsewhere or later.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum FileFault {
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    #[error("{0}")]
    Unavailable(String),
}

struct Proposal {
    ops: Vec<FileOp>,
    done: oneshot::Sender<Result<Vec<FileResult>, FileFault>>,
}

struct ProposerSlot {
    replica: Weak<VolumeReplica>,
    tx: mpsc::Sender<Proposal>,
}

/// One proposer per hosted replica, created on first use (the replica
/// runtime itself knows nothing of file volumes).
fn proposers() -> &'static Mutex<HashMap<(NodeId, GroupId), ProposerSlot>> {
    static P: OnceLock<Mutex<HashMap<(NodeId, GroupId), ProposerSlot>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

fn proposer_of(replica: &Arc<VolumeReplica>) -> mpsc::Sender<Proposal> {
    let mut map = proposers().lock().unwrap_or_else(|p| p.into_inner());
    map.retain(|_, s| s.replica.strong_count() > 0);
    let key = (replica.node_id, replica.id);
    if let Some(s) = map.get(&key) {
        if s.replica.upgrade().is_some_and(|r| Arc::ptr_eq(&r, replica)) {
            return s.tx.clone();
        }
    }
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(
        run_proposer(replica.raft.clone(), rx).instrument(tracing::info_span!("file-proposer", volume = %replica.id)),
    );
    map.insert(key, ProposerSlot { replica: Arc::downgrade(replica), tx: tx.clone() });
    tx
}

/// Packs concurrent requests into log entries (as the block proposer
/// does), so many small namespace operations cost few Raft rounds.
async fn run_proposer(raft: Raft<VolumeTc>, mut rx: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(MAX_PROPOSALS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let mut bytes: usize = first.ops.iter().map(|o| o.data_len()).sum();
        let mut count = first.ops.len();
        let mut batch = vec![first];
        while count < MAX_OPS_PER_ENTRY && bytes < MAX_ENTRY_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.ops.iter().map(|o| o.data_len()).sum::<usize>();
                    count += p.ops.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut ops = Vec::with_capacity(count);
            let mut dones = Vec::with_capacity(batch.len());
            for p in batch {
                dones.push((p.ops.len(), p.done));
                ops.extend(p.ops);
            }
            match raft.client_write(VolumeCommand::File(ops)).await {
                Ok(resp) => {
                    let mut results = resp.data.file.into_iter();
                    for (n, done) in dones {
                        let mine: Vec<FileResult> = results.by_ref().take(n).collect();
                        let r = if mine.len() == n {
                            Ok(mine)
                        } else {
                            Err(FileFault::Unavailable("the state machine answered fewer results".into()))
                        };
                        let _ = done.send(r);
                    }
                }
                Err(e) => {
                    let fault = match e.forward_to_leader() {
                        Some(f) => FileFault::NotLeader(f.leader_id),
                        None => FileFault::Unavailable(e.to_string()),
                    };
                    debug!(error = %e, "file proposal failed");
                    for (_, done) in dones {
                        let _ = done.send(Err(fault.clone()));
                    }
                }
            }
        });
    }
}

fn answer<T>(r: Result<T, ReadFail>, ok: impl FnOnce(T) -> FileResponse) -> Result<FileResponse, FileFault> {
    match r {
        Ok(v) => Ok(ok(v)),
        Err(ReadFail::Errno(e)) => Ok(FileResponse::Err(e)),
        Err(ReadFail::Fault(f)) => Ok(FileResponse::Err({
            tracing::warn!(fault = %f, "file read failed");
            libc::EIO
        })),
    }
}

/// Answers one request on this node's replica of the volume.
pub async fn handle(
    _node: &NodeRuntime,
    replica: &Arc<VolumeReplica>,
    req: FileRequest,
) -> Result<FileResponse, FileFault> {
    if !replica.is_leader() {
        return Err(FileFault::NotLeader(replica.leader()));
    }
    replica.refuse_while_hydrating().map_err(|e| FileFault::Unavailable(e.to_string()))?;
    match req {
        FileRequest::Apply(ops) => {
            let (done, rx) = oneshot::channel();
            proposer_of(replica)
                .send(Proposal { ops, done })
                .await
                .map_err(|_| FileFault::Unavailable("replica stopping".into()))?;
            let results = rx.await.map_err(|_| FileFault::Unavailable("replica stopping".into()))??;
            Ok(FileResponse::Results(results))
        }
        FileRequest::Sync => match replica.flush().await {
            Ok(()) => Ok(FileResponse::Done),
            Err(e) => Err(FileFault::Unavailable(e.to_string())),
        },
        read_req => {
            replica.ensure_readable().await.map_err(|e| FileFault::Unavailable(e.to_string()))?;
            let r = replica.as_ref();
            match read_req {
                FileRequest::GetAttr { ino } => answer(read::getattr(r, ino).await, FileResponse::Attr),
                FileRequest::Lookup { parent, name } => {
                    answer(read::lookup(r, parent, &name).await, FileResponse::Attr)
                }
                FileRequest::ReadDir { ino, after } => {
                    answer(read::readdir(r, ino, after, READDIR_BATCH).await, |(parent, entries)| {
                        FileResponse::Entries { parent, entries }
                    })
                }
                FileRequest::Read { ino, offset, len } => {
                    answer(read::read(r, ino, offset, len).await, FileResponse::Data)
                }
                FileRequest::ReadLink { ino } => answer(read::readlink(r, ino).await, FileResponse::Bytes),
                FileRequest::GetXattr { ino, name } => answer(read::getxattr(r, ino, &name).await, FileResponse::Bytes),
                FileRequest::ListXattr { ino } => answer(read::listxattr(r, ino).await, FileResponse::Names),
                FileRequest::StatFs => answer(read::statfs(r).await, FileResponse::Stats),
                FileRequest::Apply(_) | FileRequest::Sync => Err(FileFault::Unavailable("unreachable".into())),
            }
        }
    }
}
