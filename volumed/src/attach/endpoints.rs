//! Where an attachment's NBD client connects: the volume's leader, found by
//! asking the replicas themselves (a node that attaches a volume usually
//! holds no replica of it, and the catalog does not track leadership).
//!
//! Only a replica that says it leads counts. While nobody does (an
//! election after the leader died) the client is given no address for a
//! short while, so it connects straight to the new leader once elected
//! instead of bouncing through a forwarding follower; if no leader appears
//! within [`FORWARD_AFTER`] (or no replica answers status questions at
//! all) every replica is offered, and a follower forwards to whatever
//! leader it can reach.

use std::net::SocketAddr;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use uuid::Uuid;
use volumed_nbd::client::EndpointSource;

use crate::cluster::control::{self, ControlReply, ControlRequest};
use crate::cluster::node::NodeRuntime;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::volume::replica::ReportedRole;

/// How long to wait for an election before accepting a forwarding node.
pub const FORWARD_AFTER: Duration = Duration::from_secs(10);
/// Limit of one status question.
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// What the replicas said about leadership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderView {
    /// A replica that says it leads (the highest term wins).
    pub leader: Option<NodeId>,
    /// The replicas of the volume, in catalog order.
    pub placement: Vec<NodeId>,
    /// How many replicas answered.
    pub answered: usize,
}

/// Asks one replica for its status.
pub async fn status_of(
    node: &NodeRuntime,
    peer: NodeId,
    group: GroupId,
) -> Option<crate::volume::replica::ReplicaReport> {
    match control::call(node, peer, group, &ControlRequest::Status, STATUS_TIMEOUT).await {
        Ok(ControlReply::Status(r)) => r,
        _ => None,
    }
}

/// Asks every replica of `volume` whether it leads. Returns as soon as a
/// majority answered and one of them leads: a dead replica's question would
/// only add its timeout to the failover pause, and a majority includes a
/// member of any newer leader's quorum, which no longer follows an old one.
pub async fn discover(node: &NodeRuntime, volume: Uuid) -> LeaderView {
    use futures::stream::{FuturesUnordered, StreamExt};
    let group = GroupId(volume);
    let placement: Vec<NodeId> =
        node.catalog.read(|s| s.volumes.get(&volume).map(|v| v.placement.clone()).unwrap_or_default());
    let majority = placement.len() / 2 + 1;
    let mut pending: FuturesUnordered<_> =
        placement.clone().into_iter().map(|n| async move { (n, status_of(node, n, group).await) }).collect();
    let mut best: Option<(u64, NodeId)> = None;
    let mut max_term = 0;
    let mut answered = 0;
    while let Some((n, r)) = pending.next().await {
        let Some(r) = r else { continue };
        answered += 1;
        max_term = max_term.max(r.term);
        if r.role == Some(ReportedRole::Leader) && best.is_none_or(|(t, _)| r.term > t) {
            best = Some((r.term, n));
        }
        if best.is_some_and(|(t, _)| t >= max_term) && answered >= majority {
            break;
        }
    }
    // A claimant with an older term than someone else has seen was deposed.
    let leader = best.filter(|(t, _)| *t >= max_term).map(|(_, n)| n);
    drop(pending);
    LeaderView { leader, placement, answered }
}

/// The NBD address of `node` from the catalog.
pub async fn nbd_addr_of(node: &NodeRuntime, id: NodeId) -> Vec<SocketAddr> {
    let Some(addr) = node.catalog.read(|s| s.nodes.get(&id).map(|n| n.nbd_addr.clone())) else { return Vec::new() };
    let found = tokio::net::lookup_host(addr.as_str()).await;
    match found {
        Ok(found) => found.collect(),
        Err(_) => Vec::new(),
    }
}

/// The node whose NBD address is `addr`, if any.
pub async fn node_at(node: &NodeRuntime, addr: SocketAddr) -> Option<NodeId> {
    let nodes: Vec<NodeId> = node.catalog.read(|s| s.nodes.keys().copied().collect());
    for n in nodes {
        if nbd_addr_of(node, n).await.contains(&addr) {
            return Some(n);
        }
    }
    None
}

/// The [`EndpointSource`] of an attachment's client.
pub struct VolumeEndpoints {
    node: Weak<NodeRuntime>,
    volume: Uuid,
    /// Since when no replica has claimed leadership.
    leaderless_since: Mutex<Option<Instant>>,
}

impl VolumeEndpoints {
    pub fn new(node: Weak<NodeRuntime>, volume: Uuid) -> VolumeEndpoints {
        VolumeEndpoints { node, volume, leaderless_since: Mutex::new(None) }
    }

    fn leaderless_for(&self, leaderless: bool) -> Duration {
        let Ok(mut g) = self.leaderless_since.lock() else { return Duration::ZERO };
        if !leaderless {
            *g = None;
            return Duration::ZERO;
        }
        g.get_or_insert_with(Instant::now).elapsed()
    }
}

/// The order to try nodes in, given what the replicas said and how long
/// the volume has been without a leader.
pub fn order(view: &LeaderView, leaderless_for: Duration) -> Vec<NodeId> {
    match view.leader {
        Some(l) => {
            let mut out = vec![l];
            out.extend(view.placement.iter().copied().filter(|n| *n != l));
            out
        }
        None if view.answered > 0 && leaderless_for < FORWARD_AFTER => Vec::new(),
        None => view.placement.clone(),
    }
}

impl EndpointSource for VolumeEndpoints {
    fn endpoints(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else { return Vec::new() };
            let view = discover(&node, self.volume).await;
            let waited = self.leaderless_for(view.leader.is_none());
            let mut out = Vec::new();
            for n in order(&view, waited) {
                out.extend(nbd_addr_of(&node, n).await);
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_first_then_the_other_replicas() {
        let v = LeaderView { leader: Some(3), placement: vec![1, 2, 3], answered: 3 };
        assert_eq!(order(&v, Duration::ZERO), vec![3, 1, 2]);
    }

    #[test]
    fn an_election_is_waited_out_before_forwarding() {
        let v = LeaderView { leader: None, placement: vec![1, 2, 3], answered: 2 };
        assert!(order(&v, Duration::from_millis(500)).is_empty());
        assert_eq!(order(&v, FORWARD_AFTER), vec![1, 2, 3]);
    }

    #[test]
    fn silent_replicas_get_every_address() {
        let v = LeaderView { leader: None, placement: vec![1, 2, 3], answered: 0 };
        assert_eq!(order(&v, Duration::ZERO), vec![1, 2, 3]);
    }
}
