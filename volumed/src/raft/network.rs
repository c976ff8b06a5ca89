//! Client side of the peer transport: openraft's `RaftNetwork` over gRPC.
//!
//! Every group on a node shares one HTTP/2 connection per peer (a tonic
//! `Channel` multiplexes concurrent calls), and each call names its group.
//! Peer addresses come from the catalog's node table when known, so a node
//! that restarts with a new address is reached without a membership change;
//! the address recorded in the Raft membership is the fallback.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use tonic::transport::{Channel, Endpoint};
use volumed_proto::volumed::v1::raft_transport_client::RaftTransportClient;
use volumed_proto::volumed::v1::{RaftMessage, SnapshotChunk};

use crate::storage::keys::GroupId;
use crate::storage::log_store::{GroupTypeConfig, NodeId};
use crate::storage::{decode, encode};

/// Largest gRPC message between peers: an AppendEntries carries up to
/// `max_payload_entries` entries of up to 1 MiB of block data each.
pub const MAX_PEER_MESSAGE: usize = 256 << 20;

/// Size of the data chunks a snapshot is streamed in.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {node}: no address known")]
    NoAddress { node: NodeId },
    #[error("peer {node} at {addr}: {source}")]
    Connect { node: NodeId, addr: String, source: tonic::transport::Error },
    #[error("peer {node}: {status}")]
    Status { node: NodeId, status: tonic::Status },
    #[error("peer {node}: bad reply: {detail}")]
    Decode { node: NodeId, detail: String },
}

impl PeerError {
    pub fn is_unreachable(&self) -> bool {
        match self {
            PeerError::NoAddress { .. } | PeerError::Connect { .. } => true,
            PeerError::Status { status, .. } => {
                matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
            }
            PeerError::Decode { .. } => false,
        }
    }
}

/// Addresses and connections of the other nodes.
#[derive(Default)]
pub struct PeerPool {
    addrs: RwLock<HashMap<NodeId, String>>,
    channels: RwLock<HashMap<String, Channel>>,
}

impl PeerPool {
    pub fn new() -> Arc<PeerPool> {
        Arc::new(PeerPool::default())
    }

    /// Records where `node` listens (from the catalog or a hello).
    pub fn set_addr(&self, node: NodeId, addr: &str) {
        if let Ok(mut map) = self.addrs.write() {
            if map.get(&node).map(String::as_str) != Some(addr) {
                map.insert(node, addr.to_string());
            }
        }
    }

    pub fn addr_of(&self, node: NodeId) -> Option<String> {
        self.addrs.read().ok().and_then(|m| m.get(&node).cloned())
    }

    /// A channel to `addr`, created lazily and shared by every caller.
    pub fn channel_to(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        if let Some(ch) = self.channels.read().ok().and_then(|m| m.get(addr).cloned()) {
            return Ok(ch);
        }
        let ch = peer_endpoint(addr)?.connect_lazy();
        if let Ok(mut m) = self.channels.write() {
            m.insert(addr.to_string(), ch.clone());
        }
        Ok(ch)
    }

    /// A transport client for `node`; `fallback` is the address in the
    /// group's membership, used when the catalog has not told us one.
    pub fn client(&self, node: NodeId, fallback: Option<&str>) -> Result<RaftTransportClient<Channel>, PeerError> {
        let addr = self
            .addr_of(node)
            .or_else(|| fallback.filter(|a| !a.is_empty()).map(str::to_string))
            .ok_or(PeerError::NoAddress { node })?;
        let ch = self.channel_to(&addr).map_err(|source| PeerError::Connect { node, addr, source })?;
        Ok(transport_client(ch))
    }
}

pub fn transport_client(ch: Channel) -> RaftTransportClient<Channel> {
    RaftTransportClient::new(ch).max_decoding_message_size(MAX_PEER_MESSAGE).max_encoding_message_size(MAX_PEER_MESSAGE)
}

/// Endpoint settings for peer connections: no proxy, no Nagle, keepalives
/// that notice a dead peer in seconds rather than minutes.
pub fn peer_endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(4))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20)))
}

/// Produces the bytes of a snapshot for sending to a peer.
pub trait SnapshotSource<C: GroupTypeConfig>: Send + Sync + 'static {
    /// A type-specific header (sent once) and the data chunks.
    #[allow(clippy::type_complexity)]
    fn open(
        &self,
        snapshot: &Snapshot<C>,
        target: NodeId,
    ) -> Result<(Vec<u8>, BoxStream<'static, Result<Bytes, String>>), String>;
}

/// The first chunk of a snapshot stream.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, BasicNode>,
    /// Group-type-specific (e.g. the volume metadata at the snapshot point).
    pub extra: Vec<u8>,
}

/// The chunk stream of one snapshot transfer: header, data, end marker. A
/// failed read on our side must not look like a complete snapshot to the
/// receiver, so the stream then ends without the `last` marker.
fn snapshot_stream(
    group: GroupId,
    header: Vec<u8>,
    mut data: BoxStream<'static, Result<Bytes, String>>,
) -> tokio_stream::wrappers::ReceiverStream<SnapshotChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let first = SnapshotChunk {
            group_id: Bytes::copy_from_slice(group.as_bytes()),
            header: Bytes::from(header),
            data: Bytes::new(),
            last: false,
        };
        if tx.send(first).await.is_err() {
            return;
        }
        while let Some(item) = data.next().await {
            let Ok(chunk) = item else { return };
            let msg = SnapshotChunk { group_id: Bytes::new(), header: Bytes::new(), data: chunk, last: false };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(SnapshotChunk { group_id: Bytes::new(), header: Bytes::new(), data: Bytes::new(), last: true })
            .await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// When each follower last acknowledged this node as its leader: the send
/// time of the latest AppendEntries (heartbeats included) it accepted, with
/// the vote the request carried. Lease reads are judged from these rather
/// than from openraft's `millis_since_quorum_ack`, which is only as fresh
/// as the last metrics report: a leader frozen (SIGSTOP, a long stall) and
/// thawed after others elected a new one would still see a recent
/// acknowledgement there and serve a stale read. Send times are taken
/// before a request leaves, so a lease derived from them errs on the short
/// side only.
#[derive(Debug, Default)]
pub struct LeaderAcks {
    acks: Mutex<HashMap<NodeId, (Vote<NodeId>, Instant)>>,
}

impl LeaderAcks {
    fn record(&self, target: NodeId, vote: Vote<NodeId>, sent: Instant) {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        match acks.get(&target) {
            Some((v, t)) if *v == vote && *t >= sent => {}
            _ => {
                acks.insert(target, (vote, sent));
            }
        }
    }

    /// Whether a majority of `voters` (`me` counting for itself)
    /// acknowledged `vote` less than `lease` ago.
    pub fn quorum_within(&self, me: NodeId, vote: &Vote<NodeId>, voters: &[NodeId], lease: Duration) -> bool {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = voters
            .iter()
            .filter(|n| **n == me || acks.get(n).is_some_and(|(v, t)| v == vote && t.elapsed() < lease))
            .count();
        fresh > voters.len() / 2
    }
}

pub struct GroupNetworkFactory<C: GroupTypeConfig> {
    group: GroupId,
    pool: Arc<PeerPool>,
    snapshots: Arc<dyn SnapshotSource<C>>,
    acks: Arc<LeaderAcks>,
}

impl<C: GroupTypeConfig> GroupNetworkFactory<C> {
    pub fn new(group: GroupId, pool: Arc<PeerPool>, snapshots: Arc<dyn SnapshotSource<C>>) -> Self {
        GroupNetworkFactory { group, pool, snapshots, acks: Arc::new(LeaderAcks::default()) }
    }

    /// The acknowledgements this group's replication records (for leases).
    pub fn acks(&self) -> Arc<LeaderAcks> {
        self.acks.clone()
    }
}

impl<C: GroupTypeConfig> RaftNetworkFactory<C> for GroupNetworkFactory<C> {
    type Network = GroupNetwork<C>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GroupNetwork {
            group: self.group,
            target,
            fallback_addr: node.addr.clone(),
            pool: self.pool.clone(),
            snapshots: self.snapshots.clone(),
            acks: self.acks.clone(),
        }
    }
}

pub struct GroupNetwork<C: GroupTypeConfig> {
    group: GroupId,
    target: NodeId,
    fallback_addr: String,
    pool: Arc<PeerPool>,
    snapshots: Arc<dyn SnapshotSource<C>>,
    acks: Arc<LeaderAcks>,
}

fn to_rpc_error<E: std::error::Error>(e: PeerError) -> RPCError<NodeId, BasicNode, E> {
    if e.is_unreachable() {
        RPCError::Unreachable(Unreachable::new(&e))
    } else {
        RPCError::Network(NetworkError::new(&e))
    }
}

impl<C: GroupTypeConfig> GroupNetwork<C> {
    async fn call<Req, Resp, E>(
        &self,
        rpc: &Req,
        option: &RPCOption,
        vote: bool,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let target = self.target;
        let payload = encode(rpc)
            .map_err(|e| to_rpc_error(PeerError::Decode { node: target, detail: format!("encode: {e}") }))?;
        let payload_len = payload.len();
        let mut client = self.pool.client(target, Some(&self.fallback_addr)).map_err(to_rpc_error)?;
        let mut req = tonic::Request::new(RaftMessage {
            group_id: Bytes::copy_from_slice(self.group.as_bytes()),
            payload: Bytes::from(payload),
        });
        // openraft's deadline is the heartbeat interval, which a batch of
        // large block writes cannot meet; give big payloads time in
        // proportion to their size (at a pessimistic 50 MB/s).
        let size_allowance = Duration::from_millis(payload_len as u64 / 50_000);
        req.set_timeout(option.hard_ttl().max(Duration::from_millis(500) + size_allowance));
        let reply = if vote { client.vote(req).await } else { client.append_entries(req).await };
        let reply = reply.map_err(|status| to_rpc_error(PeerError::Status { node: target, status }))?;
        let result: Result<Resp, RaftError<NodeId, E>> = decode("raft reply", &reply.into_inner().payload)
            .map_err(|e| to_rpc_error(PeerError::Decode { node: target, detail: e.to_string() }))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}

impl<C: GroupTypeConfig> RaftNetwork<C> for GroupNetwork<C> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let (vote, sent) = (rpc.vote, Instant::now());
        let res = self.call(&rpc, &option, false).await;
        // Anything but a higher vote means the target accepted our
        // leadership (a log conflict included).
        if let Ok(r) = &res {
            if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                self.acks.record(self.target, vote, sent);
            }
        }
        res
    }

    #[allow(deprecated)]
    async fn install_snapshot(
        &mut self,
        _rpc: openraft::raft::InstallSnapshotRequest<C>,
        _option: RPCOption,
    ) -> Result<
        openraft::raft::InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        // With generic snapshot data openraft always uses full_snapshot().
        Err(RPCError::Network(NetworkError::new(&std::io::Error::other(
            "chunked snapshot transfer is not used; full_snapshot streams instead",
        ))))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, true).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<C>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<C, Fatal<NodeId>>> {
        let target = self.target;
        let net_err =
            |detail: String| StreamingError::Network(NetworkError::new(&PeerError::Decode { node: target, detail }));
        let (extra, data) = self.snapshots.open(&snapshot, target).map_err(net_err)?;
        let header = SnapshotHeader { vote, meta: snapshot.meta.clone(), extra };
        let header = encode(&header).map_err(|e| net_err(e.to_string()))?;
        let stream = snapshot_stream(self.group, header, data);

        let mut client = self
            .pool
            .client(target, Some(&self.fallback_addr))
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        // Run the streaming call in its own task: its future is then a plain
        // JoinHandle, which keeps this trait method's future `Send`.
        let send = tokio::spawn(async move { client.install_snapshot(tonic::Request::new(stream)).await });
        let abort = send.abort_handle();
        let reply = tokio::select! {
            r = send => r.map_err(|e| net_err(format!("snapshot task: {e}")))?,
            closed = cancel => {
                abort.abort();
                return Err(StreamingError::Closed(closed));
            }
        };
        let reply = reply.map_err(|status| {
            let e = PeerError::Status { node: target, status };
            if e.is_unreachable() {
                StreamingError::Unreachable(Unreachable::new(&e))
            } else {
                StreamingError::Network(NetworkError::new(&e))
            }
        })?;
        let result: Result<SnapshotResponse<NodeId>, String> =
            decode("snapshot reply", &reply.into_inner().payload).map_err(|e| net_err(e.to_string()))?;
        result.map_err(net_err)
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
