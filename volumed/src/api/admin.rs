//! The Admin API. Answered by the catalog leader, which has the freshest
//! catalog and every node's replica reports; other nodes proxy calls to it,
//! so clients can talk to any node. `ClusterStatus` is answered locally
//! (it is how one diagnoses a node that cannot reach the leader).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, Instrument};
use uuid::Uuid;
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::admin_client::AdminClient;
use volumed_proto::volumed::v1::admin_server::Admin;

use super::status_of_catalog;
use crate::catalog::placement::{self, PlacementRequest};
use crate::catalog::state::{
    AccessMode, AttachmentRecord, CatalogCommand, CatalogResponse, CatalogState, Labels, PlacementConstraints,
    VolumeKind, VolumeRecord, VolumeSpec, MAX_REPLICAS, MIN_VOLUME_SIZE,
};
use crate::cluster::control::{self, ControlReply, ControlRequest};
use crate::cluster::node::NodeRuntime;
use crate::raft::network::{peer_endpoint, MAX_PEER_MESSAGE};
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::volume::command::BLOCK_SIZE;
use crate::volume::replica::{ReplicaReport, ReportedRole};

/// How long mutating calls wait for the volume group to reflect the change.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AdminService {
    node: Arc<NodeRuntime>,
}

impl AdminService {
    pub fn new(node: Arc<NodeRuntime>) -> Self {
        AdminService { node }
    }

    /// `None` when this node leads the catalog; otherwise a client of the
    /// leader. Waits out an election.
    async fn leader_client(&self) -> Result<Option<AdminClient<Channel>>, Status> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.node.catalog.leader() {
                // Answer here only as a confirmed leader; a deposed one that
                // does not know it yet waits for the new leader's name.
                Some(l) if l == self.node.node_id() => {
                    if self.node.catalog.confirm_leader().await {
                        return Ok(None);
                    }
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(
                            "this node cannot confirm it still leads the catalog; is a majority of catalog voters up? \
                             (volctl cluster status)",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(l) => {
                    let addr = self
                        .node
                        .pool
                        .addr_of(l)
                        .ok_or_else(|| Status::unavailable(format!("address of catalog leader {l} unknown")))?;
                    let ch = peer_endpoint(&addr).map_err(|e| Status::internal(e.to_string()))?.connect_lazy();
                    return Ok(Some(
                        AdminClient::new(ch)
                            .max_decoding_message_size(MAX_PEER_MESSAGE)
                            .max_encoding_message_size(MAX_PEER_MESSAGE),
                    ));
                }
                None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                None => {
                    return Err(Status::unavailable(
                        "the catalog has no leader; is a majority of catalog voters up? (volctl cluster status)",
                    ))
                }
            }
        }
    }

    fn volume(&self, key: &str) -> Result<VolumeRecord, Status> {
        if key.trim().is_empty() {
            return Err(Status::invalid_argument("volume id or name is required"));
        }
        self.node
            .catalog
            .read(|s| s.volume_by_id_or_name(key).cloned())
            .ok_or_else(|| Status::not_found(format!("volume {key} not found")))
    }

    fn volume_proto(&self, v: &VolumeRecord) -> pb::Volume {
        let reports = self.node.catalog.volume_reports(v.id);
        let state = self.node.catalog.read(|s| s.clone());
        let mut p = volume_to_proto(v, &reports, &state);
        merge_attachment_reports(&mut p, &self.node.catalog.attachment_reports(v.id), &state);
        p
    }

    /// Inode counters of a file volume, asked of its leader. A leader that
    /// does not answer soon (electing, restoring) leaves them 0: a status
    /// query must not hang on the volume.
    async fn fill_file_counters(&self, p: &mut pb::Volume, id: Uuid) {
        let client = crate::file::client::FileClient::new(self.node.clone(), id);
        let ask = client.read(crate::file::service::FileRequest::StatFs);
        if let Ok(Ok(crate::file::service::FileResponse::Stats(s))) =
            tokio::time::timeout(Duration::from_secs(2), ask).await
        {
            p.file_inodes = s.inodes;
            p.file_max_inodes = s.max_inodes;
        }
    }

    /// Waits until the volume group shows `done` in its leader's report.
    async fn settle(&self, id: Uuid, what: &str, done: impl Fn(&ReplicaReport) -> bool) -> Result<(), Status> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let reports = self.node.catalog.volume_reports(id);
            if reports.values().any(|r| r.role == Some(ReportedRole::Leader) && done(r)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "volume {id}: {what} not confirmed by the volume's leader within {}s; retry",
                    SETTLE_TIMEOUT.as_secs()
                )));
            }
            self.node.report_now.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn kind_from_proto(k: i32) -> VolumeKind {
    match pb::VolumeKind::try_from(k) {
        Ok(pb::VolumeKind::File) => VolumeKind::File,
        _ => VolumeKind::Block,
    }
}

fn kind_to_proto(k: VolumeKind) -> pb::VolumeKind {
    match k {
        VolumeKind::Block => pb::VolumeKind::Block,
        VolumeKind::File => pb::VolumeKind::File,
    }
}

pub fn mode_from_proto(m: i32) -> Result<AccessMode, Status> {
    Ok(match pb::AccessMode::try_from(m) {
        Ok(pb::AccessMode::SingleNodeWriter) | Ok(pb::AccessMode::Unspecified) => AccessMode::SingleNodeWriter,
        Ok(pb::AccessMode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(pb::AccessMode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(pb::AccessMode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(pb::AccessMode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Err(_) => return Err(Status::invalid_argument(format!("unknown access mode {m}"))),
    })
}

fn mode_to_proto(m: AccessMode) -> pb::AccessMode {
    match m {
        AccessMode::SingleNodeWriter => pb::AccessMode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => pb::AccessMode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => pb::AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => pb::AccessMode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => pb::AccessMode::MultiNodeMultiWriter,
    }
}

pub fn attachment_to_proto(volume: Uuid, a: &AttachmentRecord, state: &CatalogState) -> pb::Attachment {
    pb::Attachment {
        volume_id: volume.to_string(),
        node_id: a.node,
        node_name: state.nodes.get(&a.node).map(|n| n.name.clone()).unwrap_or_default(),
        mode: mode_to_proto(a.mode) as i32,
        readonly: a.readonly,
        generation: a.generation,
        attached_at_unix_ms: a.attached_at_ms,
        device: String::new(),
        frontend: String::new(),
        state: "published".into(),
    }
}

/// Adds what the attaching nodes report (device, frontend, state) to the
/// catalog's attachments, and lists local attachments the catalog no longer
/// has (fenced devices still present on their node).
pub fn merge_attachment_reports(
    p: &mut pb::Volume,
    reports: &BTreeMap<NodeId, crate::attach::AttachmentReport>,
    state: &CatalogState,
) {
    for a in &mut p.attachments {
        if let Some(r) = reports.get(&a.node_id).filter(|r| r.generation == a.generation) {
            a.device = r.device.clone();
            a.frontend = r.frontend.clone();
            a.state = r.state_line();
        }
    }
    for (node, r) in reports {
        if p.attachments.iter().any(|a| a.node_id == *node && a.generation == r.generation) {
            continue;
        }
        p.attachments.push(pb::Attachment {
            volume_id: p.id.clone(),
            node_id: *node,
            node_name: state.nodes.get(node).map(|n| n.name.clone()).unwrap_or_default(),
            mode: pb::AccessMode::Unspecified as i32,
            readonly: false,
            generation: r.generation,
            attached_at_unix_ms: 0,
            device: r.device.clone(),
            frontend: r.frontend.clone(),
            state: r.state_line(),
        });
    }
}

fn role_to_proto(r: Option<ReportedRole>) -> pb::ReplicaRole {
    match r {
        Some(ReportedRole::Leader) => pb::ReplicaRole::Leader,
        Some(ReportedRole::Follower) => pb::ReplicaRole::Follower,
        Some(ReportedRole::Learner) => pb::ReplicaRole::Learner,
        Some(ReportedRole::Candidate) => pb::ReplicaRole::Candidate,
        Some(ReportedRole::Shutdown) | None => pb::ReplicaRole::Unknown,
    }
}

/// Builds the API view of a volume from its record and replica reports.
pub fn volume_to_proto(
    v: &VolumeRecord,
    reports: &BTreeMap<NodeId, ReplicaReport>,
    state: &CatalogState,
) -> pb::Volume {
    let leader = reports.iter().filter(|(_, r)| r.role == Some(ReportedRole::Leader)).max_by_key(|(_, r)| r.term);
    let leader_id = leader.map(|(n, _)| *n);
    let leader_report = leader.map(|(_, r)| r);
    let last = leader_report.map(|r| r.last_log_index).unwrap_or(0);
    let mut nodes: BTreeSet<NodeId> = v.placement.iter().copied().collect();
    nodes.extend(reports.keys().copied());
    let mut replicas = Vec::new();
    let mut healthy = 0u32;
    for n in nodes {
        let report = reports.get(&n);
        let in_placement = v.placement.contains(&n);
        let rebuilding = v.rebuilds.iter().any(|r| r.by == n);
        let transfer = leader_report.and_then(|l| l.transfers.iter().find(|(t, _, _)| *t == n).copied());
        let matched = if Some(n) == leader_id {
            last
        } else {
            leader_report.and_then(|l| l.matched.get(&n).copied()).unwrap_or(0)
        };
        let is_voter = leader_report.is_some_and(|l| l.voters.contains(&n));
        let state_of = if !in_placement {
            pb::ReplicaState::Removing
        } else if report.is_none() {
            pb::ReplicaState::Unreachable
        } else if rebuilding || transfer.is_some() || (leader_report.is_some() && !is_voter) {
            pb::ReplicaState::Rebuilding
        } else if leader_report.is_some() && matched + 1000 < last {
            pb::ReplicaState::Lagging
        } else {
            pb::ReplicaState::Healthy
        };
        if state_of == pb::ReplicaState::Healthy {
            healthy += 1;
        }
        let total = leader_report.map(|l| l.live_blocks * BLOCK_SIZE).unwrap_or(0);
        let (done, total) = match transfer {
            Some((_, d, t)) => (d, t),
            None if state_of == pb::ReplicaState::Rebuilding => (0, total),
            None => (0, 0),
        };
        replicas.push(pb::Replica {
            node_id: n,
            node_name: state.nodes.get(&n).map(|r| r.name.clone()).unwrap_or_default(),
            // The leader's view of membership is authoritative; a new member
            // learns it a moment after the leader does.
            role: match leader_report {
                Some(_) if Some(n) == leader_id => pb::ReplicaRole::Leader,
                Some(l) if l.voters.contains(&n) && report.is_some() => pb::ReplicaRole::Follower,
                Some(l) if l.learners.contains(&n) && report.is_some() => pb::ReplicaRole::Learner,
                _ => role_to_proto(report.and_then(|r| r.role)),
            } as i32,
            state: state_of as i32,
            rebuild_bytes_done: done,
            rebuild_bytes_total: total,
            applied_index: report.map(|r| r.applied_index).unwrap_or(0),
            matched_index: matched,
        });
    }
    let hydration = leader_report.and_then(|l| l.hydration.clone());
    let vstate = if v.retained {
        pb::VolumeState::Deleting
    } else if leader_report.is_some() && !v.hydrated {
        pb::VolumeState::Creating
    } else if leader_report.is_none() {
        if reports.is_empty() && age_ms(v) < 60_000 {
            pb::VolumeState::Creating
        } else {
            pb::VolumeState::Unavailable
        }
    } else if leader_report.is_some_and(|l| l.size_bytes < v.size_bytes) && age_ms(v) < 60_000 {
        pb::VolumeState::Creating
    } else if !v.rebuilds.is_empty() || replicas.iter().any(|r| r.state == pb::ReplicaState::Rebuilding as i32) {
        pb::VolumeState::Rebuilding
    } else if healthy < v.replica_count {
        pb::VolumeState::Degraded
    } else {
        pb::VolumeState::Healthy
    };
    let nbd_node = leader_id.or_else(|| v.placement.first().copied());
    let nbd_uri = nbd_node
        .and_then(|n| state.nodes.get(&n))
        .map(|n| format!("nbd://{}/{}", n.nbd_addr, v.id))
        .unwrap_or_default();
    pb::Volume {
        id: v.id.to_string(),
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        kind: kind_to_proto(v.kind) as i32,
        replica_count: v.replica_count,
        state: vstate as i32,
        replicas,
        nbd_uri,
        parameters: v.parameters.clone().into_iter().collect(),
        attachments: v.attachments.iter().map(|a| attachment_to_proto(v.id, a, state)).collect(),
        created_at_unix_ms: v.created_at_ms,
        leader_node_id: leader_id.unwrap_or(0),
        fence_generation: v.generation,
        used_bytes: leader_report.map(|l| l.live_blocks * BLOCK_SIZE).unwrap_or(0),
        crc_repairs: reports.values().map(|r| r.crc_repairs).sum(),
        source_snapshot_id: v.source.as_ref().map(|s| s.snapshot.to_string()).unwrap_or_default(),
        source_volume_id: v.source.as_ref().map(|s| s.volume.to_string()).unwrap_or_default(),
        restore_bytes_done: match (&hydration, v.hydrated) {
            (Some(h), false) => h.copied_blocks * BLOCK_SIZE,
            (_, true) => v.source.as_ref().map(|s| s.used_bytes).unwrap_or(0),
            (None, false) => 0,
        },
        restore_bytes_total: v.source.as_ref().map(|s| s.used_bytes).unwrap_or(0),
        snapshot_bytes: leader_report.map(|l| l.held_blocks * BLOCK_SIZE).unwrap_or(0),
        snapshot_count: state
            .snapshots
            .values()
            .filter(|s| s.source_volume == v.id && !s.deleting && s.for_clone.is_none())
            .count() as u32,
        reclaimed_bytes: leader_report.map(|l| l.reclaimed_blocks * BLOCK_SIZE).unwrap_or(0),
        sweep_pending: leader_report.is_some_and(|l| l.sweep_cursor.is_some()),
        retained: v.retained,
        // Asked of the leader by GetVolume only (see fill_file_counters).
        file_inodes: 0,
        file_max_inodes: 0,
    }
}

fn age_ms(v: &VolumeRecord) -> i64 {
    crate::catalog::service::now_ms() - v.created_at_ms
}

fn topology(t: &pb::Topology) -> Labels {
    t.segments.clone().into_iter().collect()
}

fn list_token(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_token(t: &str) -> Option<String> {
    if !t.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..t.len()).step_by(2).map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// How long a call keeps trying to reach the catalog leader when the one
/// this node knows does not answer: a dead leader is replaced by an
/// election (1-2 s), and the caller should not see it die.
const PROXY_RETRY: Duration = Duration::from_secs(15);

/// Where a call is answered: here, or already by the catalog leader.
enum Proxied<Req, Resp> {
    Local(Request<Req>),
    Answered(Response<Resp>),
}

impl AdminService {
    /// Sends `req` to the catalog leader with `call`, unless this node leads
    /// (then the request comes back as [`Proxied::Local`]). A leader that
    /// cannot be reached (the status was made on this side of the wire, so
    /// it carries a source error) may just have died: the call is retried,
    /// against whichever node leads by then, for up to [`PROXY_RETRY`].
    /// Every proxied call is idempotent, so a retry after a reply was lost
    /// is harmless.
    async fn proxy<Req, Resp, Fut>(
        &self,
        req: Request<Req>,
        call: impl Fn(AdminClient<Channel>, Req) -> Fut,
    ) -> Result<Proxied<Req, Resp>, Status>
    where
        Req: Clone,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        let deadline = Instant::now() + PROXY_RETRY;
        let msg = req.into_inner();
        loop {
            let leader = self.node.catalog.leader();
            let Some(client) = self.leader_client().await? else {
                return Ok(Proxied::Local(Request::new(msg)));
            };
            match call(client, msg.clone()).await {
                Err(s) if std::error::Error::source(&s).is_some() => {
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(format!(
                            "the catalog leader (node {}) does not answer: {}; retry once a new leader is elected \
                             (volctl cluster status)",
                            leader.unwrap_or(0),
                            s.message()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other.map(Proxied::Answered),
            }
        }
    }
}

mod snapshots;

macro_rules! proxy {
    ($self:ident, $method:ident, $req:ident) => {
        #[allow(unused_variables)]
        let $req = match $self.proxy($req, |mut c, r| async move { c.$method(r).await }).await? {
            Proxied::Answered(resp) => return Ok(resp),
            Proxied::Local(r) => r,
        };
    };
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let m = self.node.catalog.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let state = self.node.catalog.read(|s| s.clone());
        let live = if self.node.catalog.is_leader() { Some(self.node.catalog.live_nodes()) } else { None };
        let nodes_up = match &live {
            Some(l) => state.nodes.values().filter(|n| !n.removed && l.contains(&n.id)).count(),
            None => state.nodes.values().filter(|n| !n.removed && !n.down).count(),
        };
        let mut healthy = 0;
        let mut degraded = 0;
        let mut rebuilding = 0;
        if self.node.catalog.is_leader() {
            for v in state.volumes.values() {
                let p = self.volume_proto(v);
                match pb::VolumeState::try_from(p.state) {
                    Ok(pb::VolumeState::Healthy) => healthy += 1,
                    Ok(pb::VolumeState::Rebuilding) => rebuilding += 1,
                    Ok(pb::VolumeState::Degraded) | Ok(pb::VolumeState::Unavailable) => degraded += 1,
                    _ => {}
                }
            }
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            cluster_id: state.cluster_id.map(|c| c.to_string()).unwrap_or_default(),
            catalog_leader_id: m.current_leader.unwrap_or(0),
            catalog_voters: membership.voter_ids().collect(),
            catalog_learners: membership.learner_ids().collect(),
            catalog_term: m.current_term,
            catalog_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            nodes_total: state.nodes.values().filter(|n| !n.removed).count() as u32,
            nodes_up: nodes_up as u32,
            volumes_total: state.volumes.len() as u32,
            volumes_healthy: healthy,
            volumes_degraded: degraded,
            volumes_rebuilding: rebuilding,
            answered_by: self.node.node_id(),
            ready: m.current_leader.is_some() && state.cluster_id.is_some(),
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        proxy!(self, list_nodes, request);
        let state = self.node.catalog.read(|s| s.clone());
        let m = self.node.catalog.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let liveness = self.node.catalog.liveness();
        let mut replicas: BTreeMap<NodeId, u32> = BTreeMap::new();
        for v in state.volumes.values() {
            for n in &v.placement {
                *replicas.entry(*n).or_default() += 1;
            }
        }
        let provisioned = state.provisioned_by_node();
        let nodes = state
            .nodes
            .values()
            .map(|n| {
                let silent = self.node.catalog.silence(n.id);
                let node_state = if n.removed {
                    pb::NodeState::Removed
                } else if n.down {
                    pb::NodeState::Down
                } else if silent >= liveness.suspect_after {
                    pb::NodeState::Suspect
                } else {
                    pb::NodeState::Up
                };
                let report = self.node.catalog.report_of(n.id);
                pb::Node {
                    node_id: n.id,
                    name: n.name.clone(),
                    api_addr: n.api_addr.clone(),
                    nbd_addr: n.nbd_addr.clone(),
                    labels: n.labels.clone().into_iter().collect(),
                    capacity_bytes: n.capacity_bytes,
                    free_bytes: n.capacity_bytes.saturating_sub(provisioned.get(&n.id).copied().unwrap_or(0)),
                    state: node_state as i32,
                    catalog_voter: voters.contains(&n.id),
                    last_heartbeat_ms_ago: silent.as_millis().min(u64::MAX as u128) as u64,
                    replicas: replicas.get(&n.id).copied().unwrap_or(0),
                    crc_repairs: report.map(|r| r.crc_repairs).unwrap_or(0),
                    max_volumes: n.max_volumes,
                }
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        proxy!(self, remove_node, request);
        let id = request.into_inner().node_id;
        if id == 0 {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let moving = self.node.catalog.read(|s| s.volumes.values().filter(|v| v.placement.contains(&id)).count());
        self.node.catalog.write(CatalogCommand::RemoveNode { node: id }).await.map_err(status_of_catalog)?;
        info!(node = id, replicas = moving, "node removed by the operator");
        Ok(Response::new(pb::RemoveNodeResponse { replicas_moving: moving as u32 }))
    }

    async fn create_volume(&self, request: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let budget = snapshots::call_budget(&request);
        proxy!(self, create_volume, request);
        let req = request.into_inner();
        let span = tracing::info_span!("create_volume", name = %req.name);
        async move {
            let name = req.name.trim().to_string();
            if name.is_empty() {
                return Err(Status::invalid_argument("volume name is required"));
            }
            if name.len() > 253 || name.chars().any(|c| c.is_control() || c == '/') {
                return Err(Status::invalid_argument(format!(
                    "volume name {name:?} must be at most 253 characters without '/' or control characters"
                )));
            }
            if Uuid::parse_str(&name).is_ok() {
                return Err(Status::invalid_argument(format!("volume name {name:?} must not look like a volume id")));
            }
            let has_source = !req.source_snapshot.trim().is_empty() || !req.source_volume.trim().is_empty();
            if req.size_bytes == 0 && !has_source {
                return Err(Status::invalid_argument("size_bytes must be greater than 0"));
            }
            let id = Uuid::new_v4();
            let source = self.volume_source(&req, &name, id).await?;
            let requested = match (&source, req.size_bytes) {
                (Some((src, _)), 0) => src.size_bytes,
                (_, n) => n,
            };
            let size = requested.max(MIN_VOLUME_SIZE).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
            if let Some((src, _)) = &source {
                if size < src.size_bytes {
                    return Err(Status::out_of_range(format!(
                        "volume {name} would be {size} bytes, smaller than its source ({} bytes); ask for at least that",
                        src.size_bytes
                    )));
                }
            }
            let id = source.as_ref().map(|(_, id)| *id).unwrap_or(id);
            let replica_count = if req.replica_count == 0 { 3 } else { req.replica_count };
            if replica_count > MAX_REPLICAS {
                return Err(Status::invalid_argument(format!(
                    "replica_count {replica_count} is out of range (1..={MAX_REPLICAS})"
                )));
            }
            let spec = VolumeSpec {
                name: name.clone(),
                size_bytes: size,
                // A restore or clone left unspecified takes its source's kind.
                kind: match (&source, pb::VolumeKind::try_from(req.kind)) {
                    (Some((s, _)), Ok(pb::VolumeKind::Unspecified)) => self
                        .node
                        .catalog
                        .read(|st| st.volumes.get(&s.volume).map(|v| v.kind))
                        .unwrap_or(VolumeKind::Block),
                    _ => kind_from_proto(req.kind),
                },
                replica_count,
                parameters: req.parameters.clone().into_iter().collect(),
                constraints: PlacementConstraints {
                    requisite: req.requisite.iter().map(topology).collect(),
                    preferred: req.preferred.iter().map(topology).collect(),
                    spread_zones: req.spread_zones,
                },
                source: source.map(|(s, _)| s),
            };
            // For a name that exists, the catalog answers idempotently (or
            // ALREADY_EXISTS) and ignores the placement we send.
            let existing = self.node.catalog.read(|s| s.names.get(&name).and_then(|id| s.volumes.get(id)).cloned());
            let placement = if let Some(v) = &existing {
                v.placement.clone()
            } else {
                let state = self.node.catalog.read(|s| s.clone());
                let total = state.nodes.values().filter(|n| !n.removed).count();
                if replica_count as usize > total {
                    return Err(Status::resource_exhausted(format!(
                        "{replica_count} replicas need {replica_count} nodes but the cluster has {total}; \
                         use fewer replicas or add nodes"
                    )));
                }
                let live = self.node.catalog.live_nodes();
                let exclude = BTreeSet::new();
                let preq = PlacementRequest {
                    size_bytes: size,
                    count: replica_count as usize,
                    constraints: &spec.constraints,
                    exclude: &exclude,
                    used_zones: BTreeSet::new(),
                };
                placement::place(&state, &live, &preq).map_err(|e| Status::resource_exhausted(e.0))?
            };
            let resp = self
                .node
                .catalog
                .write(CatalogCommand::CreateVolume { id, spec, placement, now_ms: crate::catalog::service::now_ms() })
                .await
                .map_err(status_of_catalog)?;
            let CatalogResponse::Volume(rec) = resp else {
                return Err(Status::internal("unexpected catalog answer to CreateVolume"));
            };
            self.settle(rec.id, "creation", |r| r.size_bytes >= rec.size_bytes).await?;
            if rec.source.is_some() && !req.no_wait {
                self.wait_hydrated(&rec, budget).await?;
            }
            let rec = self.node.catalog.read(|s| s.volumes.get(&rec.id).cloned()).unwrap_or(*rec);
            info!(volume = %rec.id, size = rec.size_bytes, replicas = rec.replica_count, "volume ready");
            Ok(Response::new(self.volume_proto(&rec)))
        }
        .instrument(span)
        .await
    }

    async fn get_volume(&self, request: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        proxy!(self, get_volume, request);
        let v = self.volume(&request.into_inner().id_or_name)?;
        let mut p = self.volume_proto(&v);
        if v.kind == VolumeKind::File && !v.retained {
            self.fill_file_counters(&mut p, v.id).await;
        }
        Ok(Response::new(p))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        proxy!(self, list_volumes, request);
        let req = request.into_inner();
        let after = if req.starting_token.is_empty() {
            None
        } else {
            Some(parse_token(&req.starting_token).ok_or_else(|| {
                Status::invalid_argument(format!("starting_token {:?} was not issued by this API", req.starting_token))
            })?)
        };
        let mut all: Vec<VolumeRecord> = self
            .node
            .catalog
            .read(|s| s.volumes.values().filter(|v| req.include_retained || !v.retained).cloned().collect());
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let start = match &after {
            Some(name) => all.partition_point(|v| v.name <= *name),
            None => 0,
        };
        let max = if req.max_entries == 0 { usize::MAX } else { req.max_entries as usize };
        let page: Vec<&VolumeRecord> = all[start..].iter().take(max).collect();
        let next_token = if start + page.len() < all.len() {
            page.last().map(|v| list_token(&v.name)).unwrap_or_default()
        } else {
            String::new()
        };
        let volumes = page.iter().map(|v| self.volume_proto(v)).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes, next_token }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        proxy!(self, delete_volume, request);
        let key = request.into_inner().id_or_name;
        if key.trim().is_empty() {
            return Err(Status::invalid_argument("volume id or name is required"));
        }
        let Some(v) = self.node.catalog.read(|s| s.volume_by_id_or_name(&key).cloned()) else {
            return Ok(Response::new(pb::DeleteVolumeResponse { existed: false }));
        };
        let r = self.node.catalog.write(CatalogCommand::DeleteVolume { id: v.id }).await.map_err(status_of_catalog)?;
        let retained = self.node.catalog.read(|s| s.volumes.get(&v.id).is_some_and(|x| x.retained));
        info!(volume = %v.id, name = %v.name, retained_for_snapshots = retained, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse { existed: matches!(r, CatalogResponse::Existed(true)) }))
    }

    async fn resize_volume(&self, request: Request<pb::ResizeVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        proxy!(self, resize_volume, request);
        let req = request.into_inner();
        let v = self.volume(&req.id_or_name)?;
        if req.size_bytes == 0 {
            return Err(Status::invalid_argument("size_bytes must be greater than 0"));
        }
        let size = req.size_bytes.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        if size > v.size_bytes {
            let state = self.node.catalog.read(|s| s.clone());
            let provisioned = state.provisioned_by_node();
            for n in &v.placement {
                let cap = state.nodes.get(n).map(|r| r.capacity_bytes).unwrap_or(0);
                let used = provisioned.get(n).copied().unwrap_or(0);
                if used - v.size_bytes.min(used) + size > cap {
                    return Err(Status::resource_exhausted(format!(
                        "node {n} cannot hold {size} bytes for volume {} ({} of {cap} bytes provisioned)",
                        v.name, used
                    )));
                }
            }
        }
        let r = self
            .node
            .catalog
            .write(CatalogCommand::ResizeVolume { id: v.id, size_bytes: size })
            .await
            .map_err(status_of_catalog)?;
        let CatalogResponse::Volume(rec) = r else { return Err(Status::internal("unexpected catalog answer")) };
        self.settle(rec.id, "resize", |r| r.size_bytes >= size).await?;
        Ok(Response::new(self.volume_proto(&rec)))
    }

    async fn modify_volume(&self, request: Request<pb::ModifyVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        proxy!(self, modify_volume, request);
        let req = request.into_inner();
        let v = self.volume(&req.id_or_name)?;
        let r = self
            .node
            .catalog
            .write(CatalogCommand::ModifyVolume { id: v.id, parameters: req.parameters.into_iter().collect() })
            .await
            .map_err(status_of_catalog)?;
        let CatalogResponse::Volume(rec) = r else { return Err(Status::internal("unexpected catalog answer")) };
        Ok(Response::new(self.volume_proto(&rec)))
    }

    /// Node-local, never proxied: it freezes what is mounted on this node.
    async fn freeze_filesystems(
        &self,
        request: Request<pb::FreezeFilesystemsRequest>,
    ) -> Result<Response<pb::FreezeFilesystemsResponse>, Status> {
        crate::attach::freeze::freeze(&self.node, request.into_inner()).await.map(Response::new)
    }

    async fn thaw_filesystems(
        &self,
        request: Request<pb::ThawFilesystemsRequest>,
    ) -> Result<Response<pb::ThawFilesystemsResponse>, Status> {
        crate::attach::freeze::thaw(&self.node, request.into_inner()).await.map(Response::new)
    }

    async fn scrub_volume(
        &self,
        request: Request<pb::ScrubVolumeRequest>,
    ) -> Result<Response<pb::ScrubVolumeResponse>, Status> {
        proxy!(self, scrub_volume, request);
        let v = self.volume(&request.into_inner().id_or_name)?;
        let mut out = pb::ScrubVolumeResponse::default();
        for n in &v.placement {
            match control::call(&self.node, *n, GroupId(v.id), &ControlRequest::Scrub, Duration::from_secs(3600)).await
            {
                Ok(ControlReply::Scrub { checked, repaired, failed }) => {
                    out.blocks_checked += checked;
                    out.blocks_repaired += repaired;
                    out.blocks_unrepairable += failed;
                }
                Ok(_) => return Err(Status::unavailable(format!("node {n} hosts no replica of {} right now", v.name))),
                Err(e) => return Err(Status::unavailable(format!("scrub on node {n}: {e}"))),
            }
        }
        Ok(Response::new(out))
    }

    async fn publish_volume(
        &self,
        request: Request<pb::PublishVolumeRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        proxy!(self, publish_volume, request);
        let req = request.into_inner();
        let v = self.volume(&req.id_or_name)?;
        if req.node_id == 0 {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let mode = mode_from_proto(req.mode)?;
        let r = self
            .node
            .catalog
            .write(CatalogCommand::Publish {
                id: v.id,
                node: req.node_id,
                mode,
                readonly: req.readonly,
                force: req.force,
                now_ms: crate::catalog::service::now_ms(),
            })
            .await
            .map_err(status_of_catalog)?;
        let CatalogResponse::Attachment { attachment, created } = r else {
            return Err(Status::internal("unexpected catalog answer"));
        };

        let rec = self.volume(&v.id.to_string())?;
        // Fencing takes effect only once the volume group applied it.
        let floor = rec.fence_floor;
        self.settle(v.id, "fencing", |r| r.fence_floor >= floor).await?;
        if created {
            info!(volume = %v.id, node = req.node_id, generation = attachment.generation, force = req.force, "published");
        }
        let state = self.node.catalog.read(|s| s.clone());
        Ok(Response::new(attachment_to_proto(v.id, &attachment, &state)))
    }

    async fn unpublish_volume(
        &self,
        request: Request<pb::UnpublishVolumeRequest>,
    ) -> Result<Response<pb::UnpublishVolumeResponse>, Status> {
        proxy!(self, unpublish_volume, request);
        let req = request.into_inner();
        let Some(v) = self.node.catalog.read(|s| s.volume_by_id_or_name(&req.id_or_name).cloned()) else {
            return Ok(Response::new(pb::UnpublishVolumeResponse { existed: false }));
        };
        let node = if req.node_id == 0 { None } else { Some(req.node_id) };
        let r =
            self.node.catalog.write(CatalogCommand::Unpublish { id: v.id, node }).await.map_err(status_of_catalog)?;
        Ok(Response::new(pb::UnpublishVolumeResponse { existed: matches!(r, CatalogResponse::Existed(true)) }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        proxy!(self, create_snapshot, request);
        self.create_snapshot_here(request.into_inner()).await.map(Response::new)
    }

    async fn get_snapshot(&self, request: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        proxy!(self, get_snapshot, request);
        self.get_snapshot_here(&request.into_inner().id_or_name).map(Response::new)
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        proxy!(self, list_snapshots, request);
        self.list_snapshots_here(request.into_inner()).map(Response::new)
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        proxy!(self, delete_snapshot, request);
        self.delete_snapshot_here(&request.into_inner().id_or_name).await.map(Response::new)
    }

    async fn create_group_snapshot(
        &self,
        request: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Result<Response<pb::GroupSnapshot>, Status> {
        proxy!(self, create_group_snapshot, request);
        self.create_group_snapshot_here(request.into_inner()).await.map(Response::new)
    }

    async fn get_group_snapshot(
        &self,
        request: Request<pb::GetGroupSnapshotRequest>,
    ) -> Result<Response<pb::GroupSnapshot>, Status> {
        proxy!(self, get_group_snapshot, request);
        self.get_group_snapshot_here(&request.into_inner().id_or_name).map(Response::new)
    }

    async fn delete_group_snapshot(
        &self,
        request: Request<pb::DeleteGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteGroupSnapshotResponse>, Status> {
        proxy!(self, delete_group_snapshot, request);
        self.delete_group_snapshot_here(&request.into_inner().id_or_name).await.map(Response::new)
    }
}
