//! Volume-group control between nodes (`RaftTransport.VolumeControl`):
//! status of a remote replica, scrub, membership questions, and the
//! snapshot operations the catalog leader asks of a volume's leader.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volumed_proto::volumed::v1::RaftMessage;

use super::node::NodeRuntime;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::storage::{decode, encode};
use crate::volume::command::UserSnapshot;
use crate::volume::replica::{ReplicaReport, SnapshotError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    Scrub,
    /// Leader: take user snapshot `id` (idempotent), under write barrier
    /// `barrier` if given.
    CreateSnapshot {
        id: Uuid,
        created_at_ms: i64,
        barrier: Option<u64>,
    },
    /// Leader: release user snapshot `id` (idempotent).
    DeleteSnapshot {
        id: Uuid,
    },
    /// Leader: hold new writes, wait for in-flight ones (see
    /// `VolumeReplica::barrier`).
    Barrier {
        token: u64,
        wait_ms: u64,
        hold_ms: u64,
    },
    Release {
        token: u64,
    },
    /// File volumes: an operation or read for the volume's leader.
    File(crate::file::service::FileRequest),
}

// One reply per control call, moved once: the size of the status variant
// costs nothing worth an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlReply {
    Status(Option<ReplicaReport>),
    Scrub {
        checked: u64,
        repaired: u64,
        failed: u64,
    },
    NoReplica,
    Snapshot(UserSnapshot),
    Deleted(bool),
    BarrierHeld {
        term: u64,
    },
    Released(bool),
    /// `not_leader`: ask the volume's leader instead.
    Failed {
        not_leader: bool,
        detail: String,
    },
    File(Box<Result<crate::file::service::FileResponse, crate::file::service::FileFault>>),
}

fn failed(e: SnapshotError) -> ControlReply {
    ControlReply::Failed { not_leader: matches!(e, SnapshotError::NotLeader { .. }), detail: e.to_string() }
}

pub async fn handle(node: &NodeRuntime, group: GroupId, req: ControlRequest) -> ControlReply {
    let Some(replica) = node.replica(group) else { return ControlReply::NoReplica };
    match req {
        ControlRequest::Status => ControlReply::Status(Some(replica.report())),
        ControlRequest::Scrub => {
            let (checked, repaired, failed) = replica.scrub().await;
            ControlReply::Scrub { checked, repaired, failed }
        }
        ControlRequest::CreateSnapshot { id, created_at_ms, barrier } => {
            match replica.create_snapshot(id, created_at_ms, barrier).await {
                Ok(s) => ControlReply::Snapshot(s),
                Err(e) => failed(e),
            }
        }
        ControlRequest::DeleteSnapshot { id } => match replica.delete_snapshot(id).await {
            Ok(existed) => ControlReply::Deleted(existed),
            Err(e) => failed(e),
        },
        ControlRequest::Barrier { token, wait_ms, hold_ms } => {
            match replica.barrier(token, Duration::from_millis(wait_ms), Duration::from_millis(hold_ms)).await {
                Ok(term) => ControlReply::BarrierHeld { term },
                Err(e) => failed(e),
            }
        }
        ControlRequest::Release { token } => ControlReply::Released(replica.release(token)),
        ControlRequest::File(req) => {
            ControlReply::File(Box::new(crate::file::service::handle(node, &replica, req).await))
        }
    }
}

pub async fn call(
    node: &NodeRuntime,
    peer: NodeId,
    group: GroupId,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, String> {
    if peer == node.node_id() {
        return Ok(handle(node, group, req.clone()).await);
    }
    let mut client = node.pool.client(peer, None).map_err(|e| e.to_string())?;
    let mut r = tonic::Request::new(RaftMessage {
        group_id: Bytes::copy_from_slice(group.as_bytes()),
        payload: Bytes::from(encode(req).map_err(|e| e.to_string())?),
    });
    r.set_timeout(timeout);
    let reply = client.volume_control(r).await.map_err(|s| format!("node {peer}: {}", s.message()))?;
    decode("control reply", &reply.into_inner().payload).map_err(|e| e.to_string())
}

pub async fn remote_status(node: &NodeRuntime, peer: NodeId, group: GroupId) -> Option<ReplicaReport> {
    match call(node, peer, group, &ControlRequest::Status, Duration::from_secs(2)).await {
        Ok(ControlReply::Status(r)) => r,
        _ => None,
    }
}
