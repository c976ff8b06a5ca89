//! Volume-group control between nodes (`RaftTransport.VolumeControl`):
//! status of a remote replica, scrub, and membership questions.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use volumed_proto::volumed::v1::RaftMessage;

use super::node::NodeRuntime;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::storage::{decode, encode};
use crate::volume::replica::ReplicaReport;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    Scrub,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlReply {
    Status(Option<ReplicaReport>),
    Scrub { checked: u64, repaired: u64, failed: u64 },
    NoReplica,
}

pub async fn handle(node: &NodeRuntime, group: GroupId, req: ControlRequest) -> ControlReply {
    let Some(replica) = node.replica(group) else { return ControlReply::NoReplica };
    match req {
        ControlRequest::Status => ControlReply::Status(Some(replica.report())),
        ControlRequest::Scrub => {
            let (checked, repaired, failed) = replica.scrub().await;
            ControlReply::Scrub { checked, repaired, failed }
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
