//! Server side of the peer transport: routes each call to the group it
//! names (the catalog, or a volume replica hosted here).

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{Raft, Snapshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use volumed_proto::volumed::v1::raft_transport_server::RaftTransport;
use volumed_proto::volumed::v1::{
    FetchBlockRequest, FetchBlockResponse, HeartbeatReply, HelloReply, JoinReply, NodeHeartbeat, PeerInfo,
    PromiseReply, PromiseRequest, RaftMessage, ReadSnapshotChunk, ReadSnapshotRequest, SnapshotChunk,
};

use crate::catalog::service::NodeReport;
use crate::catalog::state::{CatalogCommand, CatalogResponse};
use crate::catalog::store::{CatalogSnapshotData, CatalogTc};
use crate::cluster::bootstrap::{self, record_of};
use crate::cluster::control::{self, ControlRequest};
use crate::cluster::node::NodeRuntime;
use crate::raft::network::SnapshotHeader;
use crate::storage::keys::GroupId;
use crate::storage::log_store::{GroupTypeConfig, NodeId};
use crate::storage::{decode, encode};
use crate::volume::command::VolumeTc;
use crate::volume::hydrate;
use crate::volume::replica::ReplicaReport;
use crate::volume::snapshot::{decode_header, receive_to_file, VolumeSnapshotData};

pub struct TransportService {
    node: Arc<NodeRuntime>,
}

impl TransportService {
    pub fn new(node: Arc<NodeRuntime>) -> Self {
        TransportService { node }
    }
}

fn group_of(raw: &[u8]) -> Result<GroupId, Status> {
    GroupId::from_slice(raw).ok_or_else(|| Status::invalid_argument("group id must be 16 bytes"))
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable message: {e}"))
}

fn reply<T: serde::Serialize>(group: &[u8], value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { group_id: Bytes::copy_from_slice(group), payload: Bytes::from(payload) }))
}

enum Target {
    Catalog(Raft<CatalogTc>),
    Volume(Raft<VolumeTc>),
}

impl TransportService {
    fn target(&self, group: GroupId) -> Result<Target, Status> {
        if group.is_catalog() {
            return Ok(Target::Catalog(self.node.catalog.raft.clone()));
        }
        match self.node.replica(group) {
            Some(r) => Ok(Target::Volume(r.raft.clone())),
            // Not started yet (placement just reached us) or already gone:
            // the sender retries.
            None => Err(Status::unavailable(format!("node {} hosts no replica of {group}", self.node.node_id()))),
        }
    }
}

async fn append<C: GroupTypeConfig>(
    raft: &Raft<C>,
    payload: &[u8],
    group: &[u8],
) -> Result<Response<RaftMessage>, Status> {
    let req: AppendEntriesRequest<C> = decode("append entries", payload).map_err(bad)?;
    let res = raft.append_entries(req).await;
    reply(group, &res)
}

async fn vote<C: GroupTypeConfig>(
    raft: &Raft<C>,
    payload: &[u8],
    group: &[u8],
) -> Result<Response<RaftMessage>, Status> {
    let req: VoteRequest<NodeId> = decode("vote", payload).map_err(bad)?;
    let res = raft.vote(req).await;
    reply(group, &res)
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    type ReadSnapshotStream = futures::stream::BoxStream<'static, Result<ReadSnapshotChunk, Status>>;

    async fn read_snapshot(
        &self,
        request: Request<ReadSnapshotRequest>,
    ) -> Result<Response<Self::ReadSnapshotStream>, Status> {
        let req = request.into_inner();
        let group = group_of(&req.group_id)?;
        let replica = self
            .node
            .replica(group)
            .ok_or_else(|| Status::unavailable(format!("node {} hosts no replica of {group}", self.node.node_id())))?;
        let stream = hydrate::serve(&replica, req.index, req.from_block, req.end_block).await.map_err(|e| match e {
            hydrate::ServeError::NoSnapshot { .. } => Status::not_found(e.to_string()),
            hydrate::ServeError::Behind { .. } => Status::unavailable(e.to_string()),
            hydrate::ServeError::Range { .. } => Status::invalid_argument(e.to_string()),
            hydrate::ServeError::Spawn(_) | hydrate::ServeError::Orphans(_) => Status::internal(e.to_string()),
        })?;
        Ok(Response::new(Box::pin(stream.map(|r| r.map_err(Status::data_loss)))))
    }

    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        match self.target(group_of(&m.group_id)?)? {
            Target::Catalog(r) => append(&r, &m.payload, &m.group_id).await,
            Target::Volume(r) => append(&r, &m.payload, &m.group_id).await,
        }
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        match self.target(group_of(&m.group_id)?)? {
            Target::Catalog(r) => vote(&r, &m.payload, &m.group_id).await,
            Target::Volume(r) => vote(&r, &m.payload, &m.group_id).await,
        }
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?
            .map_err(|s| Status::aborted(s.message().to_string()))?;
        let group = group_of(&first.group_id)?;
        let header: SnapshotHeader = decode("snapshot header", &first.header).map_err(bad)?;
        let data = stream.map(|c| c.map(|c| (c.data, c.last)).map_err(|s| s.message().to_string()));
        let index = header.meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let result: Result<openraft::raft::SnapshotResponse<NodeId>, String> = match self.target(group)? {
            Target::Catalog(raft) => {
                let mut buf = Vec::new();
                let mut data = Box::pin(data);
                let mut complete = false;
                while let Some(item) = data.next().await {
                    let (bytes, last) = item.map_err(Status::aborted)?;
                    buf.extend_from_slice(&bytes);
                    if last {
                        complete = true;
                        break;
                    }
                }
                if !complete {
                    return Err(Status::aborted("snapshot stream ended early"));
                }
                let snap = Snapshot { meta: header.meta, snapshot: Box::new(CatalogSnapshotData(buf)) };
                raft.install_full_snapshot(header.vote, snap).await.map_err(|e| e.to_string())
            }
            Target::Volume(raft) => {
                let volume = decode_header(&header.extra).map_err(bad)?;
                let dir = self.node.replica_ctx.snap_dir.clone();
                info!(volume = %group, index, "receiving snapshot");
                let path = receive_to_file(&dir, group, index, Box::pin(data))
                    .await
                    .map_err(|e| Status::aborted(e.to_string()))?;
                let snap = Snapshot {
                    meta: header.meta,
                    snapshot: Box::new(VolumeSnapshotData::Received { path: path.clone(), volume }),
                };
                let r = raft.install_full_snapshot(header.vote, snap).await.map_err(|e| e.to_string());
                if r.is_err() {
                    // Not installed (e.g. a newer vote arrived): the spool is garbage.
                    if let Err(e) = tokio::fs::remove_file(&path).await {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            warn!(volume = %group, error = %e, "cannot remove snapshot spool");
                        }
                    }
                }
                r
            }
        };
        reply(&first.group_id, &result)
    }

    async fn catalog_write(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let cmd: CatalogCommand = decode("catalog command", &m.payload).map_err(bad)?;
        let result: Result<CatalogResponse, String> = self.node.catalog.write_local(cmd).await;
        reply(&m.group_id, &result)
    }

    async fn heartbeat(&self, request: Request<NodeHeartbeat>) -> Result<Response<HeartbeatReply>, Status> {
        let hb = request.into_inner();
        let replicas: Vec<ReplicaReport> = decode("heartbeat status", &hb.status).map_err(bad)?;
        let attachments = if hb.attachments.is_empty() {
            Vec::new()
        } else {
            decode("heartbeat attachments", &hb.attachments).map_err(bad)?
        };
        if self.node.catalog.is_leader() {
            self.node.catalog.record_heartbeat(
                hb.node_id,
                NodeReport {
                    at: std::time::Instant::now(),
                    capacity_bytes: hb.capacity_bytes,
                    disk_free_bytes: hb.disk_free_bytes,
                    crc_repairs: hb.crc_repairs,
                    replicas,
                    attachments,
                },
            );
        }
        Ok(Response::new(HeartbeatReply { leader_id: self.node.catalog.leader().unwrap_or(0) }))
    }

    async fn volume_control(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let group = group_of(&m.group_id)?;
        let req: ControlRequest = decode("control request", &m.payload).map_err(bad)?;
        let r = control::handle(&self.node, group, req).await;
        reply(&m.group_id, &r)
    }

    async fn fetch_block(&self, request: Request<FetchBlockRequest>) -> Result<Response<FetchBlockResponse>, Status> {
        let req = request.into_inner();
        let group = group_of(&req.group_id)?;
        let Some(replica) = self.node.replica(group) else {
            return Ok(Response::new(FetchBlockResponse::default()));
        };
        let (found, data, applied_index) = replica.fetch_local(req.block, req.version).await;
        Ok(Response::new(FetchBlockResponse { found, data: Bytes::from(data), applied_index }))
    }

    async fn hello(&self, request: Request<PeerInfo>) -> Result<Response<HelloReply>, Status> {
        let peer = request.into_inner();
        if peer.node_id == self.node.node_id() && peer.api_addr != self.node.config.advertise {
            return Err(Status::already_exists(format!(
                "node id {} is already used by the node at {}",
                peer.node_id, self.node.config.advertise
            )));
        }
        self.node.bootstrap.remember(&peer);
        self.node.pool.set_addr(peer.node_id, &peer.api_addr);
        Ok(Response::new(bootstrap::hello_reply(&self.node)))
    }

    async fn promise(&self, request: Request<PromiseRequest>) -> Result<Response<PromiseReply>, Status> {
        Ok(Response::new(self.node.bootstrap.promise(&self.node, &request.into_inner())))
    }

    async fn join(&self, request: Request<PeerInfo>) -> Result<Response<JoinReply>, Status> {
        let peer = request.into_inner();
        self.node.bootstrap.remember(&peer);
        self.node.pool.set_addr(peer.node_id, &peer.api_addr);
        let cluster_id = self
            .node
            .catalog
            .cluster_id()
            .ok_or_else(|| Status::failed_precondition("this node is not in a cluster yet"))?;
        match self.node.catalog.write(CatalogCommand::UpsertNode(record_of(&peer))).await {
            Ok(_) => {
                info!(node = peer.node_id, name = %peer.name, "node joined");
                Ok(Response::new(JoinReply {
                    cluster_id: cluster_id.to_string(),
                    catalog_leader: self.node.catalog.leader().unwrap_or(0),
                }))
            }
            Err(e) => Err(crate::api::status_of_catalog(e)),
        }
    }
}
