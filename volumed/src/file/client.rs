//! The mount side: sends file requests to the volume's leader, wherever it
//! is, and rides out leader changes. A request that fails because the
//! leader died or moved is retried on the new one (found by asking the
//! replicas, as the block attachments do); the application only sees a
//! pause. Only a volume that is really gone ends in an error.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use uuid::Uuid;

use super::ops::{Errno, FileOp, FileResult};
use super::service::{FileFault, FileRequest, FileResponse};
use crate::attach::endpoints;
use crate::cluster::control::{self, ControlReply, ControlRequest};
use crate::cluster::node::NodeRuntime;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;

/// How long one request may wait for a reachable leader before the
/// application gets EIO (a volume without a quorum for this long is an
/// outage, not a failover).
const RETRY_FOR: Duration = Duration::from_secs(120);
/// Limit of one call: big writes on a busy leader take a while.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("volume {0} no longer exists")]
    Gone(Uuid),
    #[error("volume {volume}: no leader answered within {waited:?}: {last}")]
    Timeout { volume: Uuid, waited: Duration, last: String },
}

impl ClientError {
    pub fn errno(&self) -> Errno {
        match self {
            ClientError::Gone(_) => libc::ESTALE,
            ClientError::Timeout { .. } => libc::EIO,
        }
    }
}

/// What a call answered, and whether an earlier attempt may have been
/// applied without us hearing back (a retried operation then meets its
/// own effect: see [`FileClient::apply`]).
pub struct Answer {
    pub response: FileResponse,
    pub retried: bool,
}

pub struct FileClient {
    node: Arc<NodeRuntime>,
    pub volume: Uuid,
    leader: Mutex<Option<NodeId>>,
    /// Leader changes this client rode out (shown in mount reports).
    pub failovers: std::sync::atomic::AtomicU64,
}

impl FileClient {
    pub fn new(node: Arc<NodeRuntime>, volume: Uuid) -> Arc<FileClient> {
        Arc::new(FileClient { node, volume, leader: Mutex::new(None), failovers: Default::default() })
    }

    fn cached_leader(&self) -> Option<NodeId> {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_leader(&self, l: Option<NodeId>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }

    fn exists(&self) -> bool {
        self.node.catalog.read(|s| s.volumes.get(&self.volume).is_some_and(|v| !v.retained))
    }

    pub async fn call(&self, req: &FileRequest) -> Result<Answer, ClientError> {
        let start = Instant::now();
        let group = GroupId(self.volume);
        let wrapped = ControlRequest::File(req.clone());
        let mut retried = false;
        let mut backoff = Duration::from_millis(10);
        let mut last: String;
        loop {
            let target = match self.cached_leader() {
                Some(l) => Some(l),
                None => {
                    let view = endpoints::discover(&self.node, self.volume).await;
                    if view.placement.is_empty() && !self.exists() {
                        return Err(ClientError::Gone(self.volume));
                    }
                    self.set_leader(view.leader);
                    view.leader
                }
            };
            if let Some(peer) = target {
                let reply = control::call(&self.node, peer, group, &wrapped, CALL_TIMEOUT).await.map(|r| match r {
                    ControlReply::File(f) => Ok(*f),
                    ControlReply::NoReplica => Err(None),
                    other => Err(Some(format!("{other:?}"))),
                });
                match reply {
                    Ok(Ok(Ok(response))) => {
                        if retried {
                            self.failovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        return Ok(Answer { response, retried });
                    }
                    Ok(Ok(Err(FileFault::NotLeader(Some(l))))) if l != peer => {
                        // Not applied there: the new leader gets the same request.
                        debug!(volume = %self.volume, "node {peer} redirected to node {l}");
                        self.set_leader(Some(l));
                        continue;
                    }
                    Ok(Ok(Err(f))) => {
                        last = format!("node {peer}: {f}");
                        if matches!(f, FileFault::Unavailable(_)) {
                            retried = true;
                        }
                        self.set_leader(None);
                    }
                    Ok(Err(None)) => {
                        last = format!("node {peer} holds no replica");
                        self.set_leader(None);
                    }
                    Ok(Err(Some(other))) => {
                        last = format!("node {peer}: unexpected answer {other}");
                        self.set_leader(None);
                    }
                    Err(e) => {
                        // The request may have reached the leader before the
                        // connection broke.
                        retried = true;
                        last = e;
                        self.set_leader(None);
                    }
                }
            } else {
                last = "no replica claims leadership (election in progress)".into();
            }
            if !self.exists() {
                return Err(ClientError::Gone(self.volume));
            }
            if start.elapsed() > RETRY_FOR {
                warn!(volume = %self.volume, error = %last, "giving up on a file request");
                return Err(ClientError::Timeout { volume: self.volume, waited: start.elapsed(), last });
            }
            debug!(volume = %self.volume, error = %last, "retrying a file request");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Applies operations; one result per operation. A retried unlink,
    /// rmdir or rename that finds its source gone was applied by the
    /// attempt whose answer was lost; the rest are idempotent by
    /// construction (creates carry their creator id, link finds itself).
    pub async fn apply(&self, ops: Vec<FileOp>) -> Result<Vec<FileResult>, ClientError> {
        let kinds: Vec<bool> = ops
            .iter()
            .map(|o| matches!(o, FileOp::Unlink { .. } | FileOp::Rename { .. } | FileOp::RemoveXattr { .. }))
            .collect();
        let a = self.call(&FileRequest::Apply(ops)).await?;
        match a.response {
            FileResponse::Results(mut results) => {
                if a.retried {
                    for (r, removes) in results.iter_mut().zip(kinds) {
                        if removes && matches!(r, FileResult::Err(e) if *e == libc::ENOENT || *e == libc::ENODATA) {
                            *r = FileResult::Ok;
                        }
                    }
                }
                Ok(results)
            }
            FileResponse::Err(e) => Ok(vec![FileResult::Err(e)]),
            other => Err(ClientError::Timeout {
                volume: self.volume,
                waited: Duration::ZERO,
                last: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// One operation.
    pub async fn apply_one(&self, op: FileOp) -> Result<FileResult, ClientError> {
        let mut r = self.apply(vec![op]).await?;
        Ok(r.pop().unwrap_or(FileResult::Err(libc::EIO)))
    }

    pub async fn read(&self, req: FileRequest) -> Result<FileResponse, ClientError> {
        Ok(self.call(&req).await?.response)
    }
}
