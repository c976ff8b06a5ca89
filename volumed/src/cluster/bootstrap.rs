//! Finding the cluster, or forming it, with no manual steps.
//!
//! Every node knows some seed addresses (`--join`; in Kubernetes a headless
//! Service name that resolves to every volumed pod) and says hello to them
//! and to every peer it hears of. Then:
//!
//! - if any peer belongs to a cluster, the node asks to join it: the catalog
//!   leader records the node and adds it to the catalog group as a learner
//!   (the reconciler promotes learners while voters are missing);
//! - otherwise, once `--bootstrap-expect` nodes know each other, the node
//!   with the lowest id proposes the lowest ids as the first catalog voters
//!   and asks each of them for an exclusive promise. A node promises at most
//!   one proposal (for 30 s) and none once it belongs to a cluster, so two
//!   overlapping proposals cannot both succeed. With all promises in hand,
//!   the proposer initialises the catalog group and records every known
//!   node.
//!
//! A restarted node already has catalog state on disk and skips all this;
//! it only refreshes its own record (addresses, labels, capacity).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::BasicNode;
use tracing::{debug, info, warn};
use uuid::Uuid;
use volumed_proto::volumed::v1::{HelloReply, PeerInfo, PromiseReply, PromiseRequest};

use super::node::NodeRuntime;
use crate::catalog::state::{CatalogCommand, NodeRecord};
use crate::config::NodeConfig;
use crate::raft::network::transport_client;
use crate::storage::log_store::NodeId;

const PROMISE_TTL: Duration = Duration::from_secs(30);

struct Promise {
    proposer: NodeId,
    cluster_id: String,
    at: Instant,
}

pub struct Bootstrap {
    known: Mutex<BTreeMap<NodeId, PeerInfo>>,
    promise: Mutex<Option<Promise>>,
}

pub fn peer_info_of(rec: &NodeRecord) -> PeerInfo {
    PeerInfo {
        node_id: rec.id,
        name: rec.name.clone(),
        api_addr: rec.api_addr.clone(),
        nbd_addr: rec.nbd_addr.clone(),
        labels: rec.labels.clone().into_iter().collect(),
        capacity_bytes: rec.capacity_bytes,
        max_volumes: rec.max_volumes,
    }
}

pub fn record_of(p: &PeerInfo) -> NodeRecord {
    NodeRecord {
        id: p.node_id,
        name: p.name.clone(),
        api_addr: p.api_addr.clone(),
        nbd_addr: p.nbd_addr.clone(),
        labels: p.labels.clone().into_iter().collect(),
        capacity_bytes: p.capacity_bytes,
        max_volumes: p.max_volumes,
        removed: false,
        down: false,
        joined_at_ms: crate::catalog::service::now_ms(),
    }
}

impl Bootstrap {
    pub fn new(_config: &NodeConfig) -> Self {
        Bootstrap { known: Mutex::new(BTreeMap::new()), promise: Mutex::new(None) }
    }

    pub fn remember(&self, p: &PeerInfo) {
        if p.node_id == 0 || p.api_addr.is_empty() {
            return;
        }
        if let Ok(mut k) = self.known.lock() {
            k.insert(p.node_id, p.clone());
        }
    }

    pub fn known(&self) -> Vec<PeerInfo> {
        self.known.lock().map(|k| k.values().cloned().collect()).unwrap_or_default()
    }

    /// Answers a peer's promise request.
    pub fn promise(&self, node: &NodeRuntime, req: &PromiseRequest) -> PromiseReply {
        if in_cluster(node) {
            return PromiseReply { granted: false, reason: "already a member of a cluster".into() };
        }
        let Ok(mut slot) = self.promise.lock() else {
            return PromiseReply { granted: false, reason: "internal lock poisoned".into() };
        };
        if let Some(p) = slot.as_ref() {
            let same = p.proposer == req.proposer && p.cluster_id == req.cluster_id;
            if !same && p.at.elapsed() < PROMISE_TTL {
                return PromiseReply {
                    granted: false,
                    reason: format!("promised to node {} for cluster {}", p.proposer, p.cluster_id),
                };
            }
        }
        *slot = Some(Promise { proposer: req.proposer, cluster_id: req.cluster_id.clone(), at: Instant::now() });
        PromiseReply { granted: true, reason: String::new() }
    }
}

/// Whether this node has catalog state (it was initialised or joined).
pub fn in_cluster(node: &NodeRuntime) -> bool {
    let m = node.catalog.raft.metrics().borrow().clone();
    m.membership_config.membership().nodes().next().is_some() || node.catalog.cluster_id().is_some()
}

pub fn hello_reply(node: &NodeRuntime) -> HelloReply {
    HelloReply {
        me: Some(peer_info_of(&node.self_record())),
        cluster_id: node.catalog.cluster_id().map(|c| c.to_string()).unwrap_or_default(),
        catalog_leader: node.catalog.leader().unwrap_or(0),
        known: node.bootstrap.known(),
    }
}

async fn resolve_seeds(seeds: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for s in seeds {
        match tokio::net::lookup_host(s.as_str()).await {
            Ok(addrs) => out.extend(addrs.map(|a| a.to_string())),
            Err(e) => debug!(seed = %s, error = %e, "cannot resolve seed"),
        }
    }
    out.sort();
    out.dedup();
    out
}

async fn hello(node: &NodeRuntime, addr: &str) -> Option<HelloReply> {
    let ch = node.pool.channel_to(addr).ok()?;
    let mut client = transport_client(ch);
    let mut req = tonic::Request::new(peer_info_of(&node.self_record()));
    req.set_timeout(Duration::from_secs(2));
    client.hello(req).await.ok().map(|r| r.into_inner())
}

/// Runs until this node belongs to a cluster and its catalog record is
/// current.
pub async fn run(node: Arc<NodeRuntime>) {
    let me = node.self_record();
    let mut shutdown = node.shutdown.subscribe();
    let mut stable_rounds = 0;
    let mut last_view: Vec<NodeId> = Vec::new();
    loop {
        if in_cluster(&node) {
            break;
        }
        // Discovery round.
        let mut addrs = resolve_seeds(&node.config.join).await;
        addrs.extend(node.bootstrap.known().into_iter().map(|p| p.api_addr));
        addrs.retain(|a| *a != node.config.advertise);
        addrs.sort();
        addrs.dedup();
        let mut cluster_peer: Option<PeerInfo> = None;
        for a in &addrs {
            if let Some(reply) = hello(&node, a).await {
                if let Some(p) = &reply.me {
                    node.bootstrap.remember(p);
                    node.pool.set_addr(p.node_id, &p.api_addr);
                    if !reply.cluster_id.is_empty() {
                        cluster_peer = Some(p.clone());
                    }
                }
                for p in &reply.known {
                    if p.node_id != me.id {
                        node.bootstrap.remember(p);
                    }
                }
            }
        }
        if let Some(peer) = cluster_peer {
            match join_via(&node, &peer).await {
                Ok(()) => {
                    info!(via = peer.node_id, "joined the cluster");
                    break;
                }
                Err(e) => warn!(via = peer.node_id, error = %e, "join failed; retrying"),
            }
        } else {
            let mut view: Vec<NodeId> = node.bootstrap.known().iter().map(|p| p.node_id).collect();
            view.push(me.id);
            view.sort_unstable();
            view.dedup();
            stable_rounds = if view == last_view { stable_rounds + 1 } else { 0 };
            last_view = view.clone();
            // Propose only with a view that held still for a couple of rounds,
            // so nodes starting together see each other first.
            if view.len() >= node.config.bootstrap_expect && view[0] == me.id && stable_rounds >= 2 {
                let voters = node.config.catalog_voters.min(view.len()).max(1);
                let members: Vec<NodeId> = view[..voters].to_vec();
                match form_cluster(&node, &members).await {
                    Ok(()) => break,
                    Err(e) => warn!(error = %e, "could not form the cluster yet"),
                }
            } else {
                debug!(known = view.len(), expect = node.config.bootstrap_expect, "waiting for peers");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
    register_self(&node).await;
}

async fn join_via(node: &NodeRuntime, peer: &PeerInfo) -> Result<(), String> {
    let ch = node.pool.channel_to(&peer.api_addr).map_err(|e| e.to_string())?;
    let mut client = transport_client(ch);
    let mut req = tonic::Request::new(peer_info_of(&node.self_record()));
    req.set_timeout(Duration::from_secs(15));
    client.join(req).await.map_err(|s| s.message().to_string())?;
    // The leader adds us to the catalog group; wait until its log reaches us.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if in_cluster(node) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("the catalog leader did not replicate to this node in 30 s".into())
}

async fn form_cluster(node: &NodeRuntime, members: &[NodeId]) -> Result<(), String> {
    let cluster_id = Uuid::new_v4().to_string();
    let known: BTreeMap<NodeId, PeerInfo> = node.bootstrap.known().into_iter().map(|p| (p.node_id, p)).collect();
    let req = PromiseRequest { proposer: node.node_id(), cluster_id: cluster_id.clone(), members: members.to_vec() };
    let own = node.bootstrap.promise(node, &req);
    if !own.granted {
        return Err(format!("this node cannot promise: {}", own.reason));
    }
    for m in members.iter().filter(|m| **m != node.node_id()) {
        let peer = known.get(m).ok_or_else(|| format!("node {m} is not known any more"))?;
        let ch = node.pool.channel_to(&peer.api_addr).map_err(|e| e.to_string())?;
        let mut client = transport_client(ch);
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(Duration::from_secs(3));
        let reply = client.promise(r).await.map_err(|s| format!("node {m}: {}", s.message()))?.into_inner();
        if !reply.granted {
            return Err(format!("node {m} refused: {}", reply.reason));
        }
    }
    let mut voters = BTreeMap::new();
    for m in members {
        let addr = if *m == node.node_id() {
            node.config.advertise.clone()
        } else {
            known.get(m).map(|p| p.api_addr.clone()).unwrap_or_default()
        };
        voters.insert(*m, BasicNode::new(addr));
    }
    info!(?members, %cluster_id, "forming a new cluster");
    node.catalog.raft.initialize(voters).await.map_err(|e| e.to_string())?;
    let mut nodes: Vec<NodeRecord> = known.values().map(record_of).collect();
    nodes.push(node.self_record());
    let cid = Uuid::parse_str(&cluster_id).map_err(|e| e.to_string())?;
    node.catalog.write(CatalogCommand::Bootstrap { cluster_id: cid, nodes }).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Makes sure the catalog has this node's current addresses and labels.
async fn register_self(node: &NodeRuntime) {
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let want = node.self_record();
        let current = node.catalog.read(|s| s.nodes.get(&want.id).cloned());
        let up_to_date = current.as_ref().is_some_and(|c| {
            c.api_addr == want.api_addr
                && c.nbd_addr == want.nbd_addr
                && c.labels == want.labels
                && c.capacity_bytes == want.capacity_bytes
                && c.max_volumes == want.max_volumes
                && c.name == want.name
        });
        if up_to_date {
            return;
        }
        if current.as_ref().is_some_and(|c| c.removed) {
            warn!("this node was removed from the cluster; it holds no replicas (wipe --data-dir to join again)");
            return;
        }
        match node.catalog.write(CatalogCommand::UpsertNode(want)).await {
            Ok(_) => {
                info!("node record updated in the catalog");
                return;
            }
            Err(e) => debug!(error = %e, "cannot update node record yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
