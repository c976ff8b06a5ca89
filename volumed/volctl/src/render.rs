//! API answers as JSON for scripts (lowercase enum names, never proto
//! numbers) and as tables for people (human sizes, rebuild progress).

use std::collections::BTreeMap;

use serde::Serialize;
use volumed_proto::volumed::v1 as pb;

use crate::table::{key_values, Table};
use crate::units::{human_size, percent, utc_time};

pub mod snapshots;

pub use snapshots::SnapshotView;

// ---------------------------------------------------------------- enum names

pub fn volume_state(s: pb::VolumeState) -> &'static str {
    match s {
        pb::VolumeState::Creating => "creating",
        pb::VolumeState::Healthy => "healthy",
        pb::VolumeState::Degraded => "degraded",
        pb::VolumeState::Rebuilding => "rebuilding",
        pb::VolumeState::Unavailable => "unavailable",
        pb::VolumeState::Deleting => "deleting",
        pb::VolumeState::Unspecified => "unknown",
    }
}

pub fn volume_kind(k: pb::VolumeKind) -> &'static str {
    match k {
        pb::VolumeKind::File => "file",
        pb::VolumeKind::Block | pb::VolumeKind::Unspecified => "block",
    }
}

pub fn replica_role(r: pb::ReplicaRole) -> &'static str {
    match r {
        pb::ReplicaRole::Leader => "leader",
        pb::ReplicaRole::Follower => "follower",
        pb::ReplicaRole::Learner => "learner",
        pb::ReplicaRole::Candidate => "candidate",
        pb::ReplicaRole::Unknown | pb::ReplicaRole::Unspecified => "unknown",
    }
}

pub fn replica_state(s: pb::ReplicaState) -> &'static str {
    match s {
        pb::ReplicaState::Healthy => "healthy",
        pb::ReplicaState::Rebuilding => "rebuilding",
        pb::ReplicaState::Lagging => "lagging",
        pb::ReplicaState::Unreachable => "unreachable",
        pb::ReplicaState::Removing => "removing",
        pb::ReplicaState::Unspecified => "unknown",
    }
}

pub fn node_state(s: pb::NodeState) -> &'static str {
    match s {
        pb::NodeState::Up => "up",
        pb::NodeState::Suspect => "suspect",
        pb::NodeState::Down => "down",
        pb::NodeState::Removed => "removed",
        pb::NodeState::Unspecified => "unknown",
    }
}

pub fn access_mode(m: pb::AccessMode) -> &'static str {
    match m {
        pb::AccessMode::SingleNodeWriter => "single-node-writer",
        pb::AccessMode::SingleNodeReaderOnly => "single-node-reader-only",
        pb::AccessMode::MultiNodeReaderOnly => "multi-node-reader-only",
        pb::AccessMode::MultiNodeSingleWriter => "multi-node-single-writer",
        pb::AccessMode::MultiNodeMultiWriter => "multi-node-multi-writer",
        pb::AccessMode::Unspecified => "unspecified",
    }
}

fn sorted(m: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// ---------------------------------------------------------------- JSON views

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub cluster_id: String,
    pub ready: bool,
    pub catalog_leader_id: u64,
    pub catalog_voters: Vec<u64>,
    pub catalog_learners: Vec<u64>,
    pub catalog_term: u64,
    pub catalog_applied_index: u64,
    pub nodes_total: u32,
    pub nodes_up: u32,
    pub volumes_total: u32,
    pub volumes_healthy: u32,
    pub volumes_degraded: u32,
    pub volumes_rebuilding: u32,
    pub answered_by: u64,
}

pub fn cluster_view(c: &pb::ClusterStatusResponse) -> ClusterView {
    ClusterView {
        cluster_id: c.cluster_id.clone(),
        ready: c.ready,
        catalog_leader_id: c.catalog_leader_id,
        catalog_voters: c.catalog_voters.clone(),
        catalog_learners: c.catalog_learners.clone(),
        catalog_term: c.catalog_term,
        catalog_applied_index: c.catalog_applied_index,
        nodes_total: c.nodes_total,
        nodes_up: c.nodes_up,
        volumes_total: c.volumes_total,
        volumes_healthy: c.volumes_healthy,
        volumes_degraded: c.volumes_degraded,
        volumes_rebuilding: c.volumes_rebuilding,
        answered_by: c.answered_by,
    }
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub node_id: u64,
    pub name: String,
    pub state: &'static str,
    pub api_addr: String,
    pub nbd_addr: String,
    pub labels: BTreeMap<String, String>,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub catalog_voter: bool,
    pub last_heartbeat_ms_ago: u64,
    pub replicas: u32,
    pub crc_repairs: u64,
    pub max_volumes: u32,
}

pub fn node_view(n: &pb::Node) -> NodeView {
    NodeView {
        node_id: n.node_id,
        name: n.name.clone(),
        state: node_state(n.state()),
        api_addr: n.api_addr.clone(),
        nbd_addr: n.nbd_addr.clone(),
        labels: sorted(&n.labels),
        capacity_bytes: n.capacity_bytes,
        free_bytes: n.free_bytes,
        catalog_voter: n.catalog_voter,
        last_heartbeat_ms_ago: n.last_heartbeat_ms_ago,
        replicas: n.replicas,
        crc_repairs: n.crc_repairs,
        max_volumes: n.max_volumes,
    }
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub node_id: u64,
    pub node_name: String,
    pub role: &'static str,
    pub state: &'static str,
    pub rebuild_bytes_done: u64,
    pub rebuild_bytes_total: u64,
    pub applied_index: u64,
    pub matched_index: u64,
}

#[derive(Debug, Serialize)]
pub struct AttachmentView {
    pub volume_id: String,
    pub node_id: u64,
    pub node_name: String,
    pub mode: &'static str,
    pub readonly: bool,
    pub generation: u64,
    pub attached_at_unix_ms: i64,
    pub device: String,
    pub frontend: String,
    pub state: String,
}

pub fn attachment_view(a: &pb::Attachment) -> AttachmentView {
    AttachmentView {
        volume_id: a.volume_id.clone(),
        node_id: a.node_id,
        node_name: a.node_name.clone(),
        mode: access_mode(a.mode()),
        readonly: a.readonly,
        generation: a.generation,
        attached_at_unix_ms: a.attached_at_unix_ms,
        device: a.device.clone(),
        frontend: a.frontend.clone(),
        state: a.state.clone(),
    }
}

#[derive(Debug, Serialize)]
pub struct VolumeView {
    pub id: String,
    pub name: String,
    pub kind: &'static str,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub state: &'static str,
    pub replica_count: u32,
    pub replicas: Vec<ReplicaView>,
    pub leader_node_id: u64,
    pub leader_node_name: String,
    pub nbd_uri: String,
    pub parameters: BTreeMap<String, String>,
    pub attachments: Vec<AttachmentView>,
    pub fence_generation: u64,
    pub crc_repairs: u64,
    pub created_at_unix_ms: i64,
    /// Restore/clone source (empty when none) and copy progress.
    pub source_snapshot_id: String,
    pub source_volume_id: String,
    pub restore_bytes_done: u64,
    pub restore_bytes_total: u64,
    pub snapshot_count: u32,
    /// Data held only by snapshots (not current content).
    pub snapshot_bytes: u64,
    pub reclaimed_bytes: u64,
    pub sweep_pending: bool,
    /// Deleted, kept hidden for its snapshots.
    pub retained: bool,
    /// Its snapshots, oldest first (`volume get` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotView>>,
}

fn leader_name(v: &pb::Volume) -> String {
    v.replicas
        .iter()
        .find(|r| r.node_id == v.leader_node_id && v.leader_node_id != 0)
        .map(|r| r.node_name.clone())
        .unwrap_or_default()
}

pub fn volume_view(v: &pb::Volume) -> VolumeView {
    VolumeView {
        id: v.id.clone(),
        name: v.name.clone(),
        kind: volume_kind(v.kind()),
        size_bytes: v.size_bytes,
        used_bytes: v.used_bytes,
        state: volume_state(v.state()),
        replica_count: v.replica_count,
        replicas: v
            .replicas
            .iter()
            .map(|r| ReplicaView {
                node_id: r.node_id,
                node_name: r.node_name.clone(),
                role: replica_role(r.role()),
                state: replica_state(r.state()),
                rebuild_bytes_done: r.rebuild_bytes_done,
                rebuild_bytes_total: r.rebuild_bytes_total,
                applied_index: r.applied_index,
                matched_index: r.matched_index,
            })
            .collect(),
        leader_node_id: v.leader_node_id,
        leader_node_name: leader_name(v),
        nbd_uri: v.nbd_uri.clone(),
        parameters: sorted(&v.parameters),
        attachments: v.attachments.iter().map(attachment_view).collect(),
        fence_generation: v.fence_generation,
        crc_repairs: v.crc_repairs,
        created_at_unix_ms: v.created_at_unix_ms,
        source_snapshot_id: v.source_snapshot_id.clone(),
        source_volume_id: v.source_volume_id.clone(),
        restore_bytes_done: v.restore_bytes_done,
        restore_bytes_total: v.restore_bytes_total,
        snapshot_count: v.snapshot_count,
        snapshot_bytes: v.snapshot_bytes,
        reclaimed_bytes: v.reclaimed_bytes,
        sweep_pending: v.sweep_pending,
        retained: v.retained,
        snapshots: None,
    }
}

#[derive(Debug, Serialize)]
pub struct AttachView {
    pub volume_id: String,
    pub device: String,
    pub frontend: String,
    pub generation: u64,
    pub size_bytes: u64,
}

pub fn attach_view(a: &pb::AttachResponse) -> AttachView {
    AttachView {
        volume_id: a.volume_id.clone(),
        device: a.device.clone(),
        frontend: a.frontend.clone(),
        generation: a.generation,
        size_bytes: a.size_bytes,
    }
}

#[derive(Debug, Serialize)]
pub struct LocalAttachmentView {
    pub volume_id: String,
    pub volume_name: String,
    pub device: String,
    pub frontend: String,
    pub generation: u64,
    pub state: String,
    pub healthy: bool,
    pub reason: String,
    pub readonly: bool,
    pub size_bytes: u64,
    pub reconnects: u64,
    pub last_pause_ms: u64,
    pub migrations: u64,
    pub io_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct LocalMountView {
    pub volume_id: String,
    pub volume_name: String,
    pub target: String,
    pub healthy: bool,
    pub reason: String,
    pub readonly: bool,
}

#[derive(Debug, Serialize)]
pub struct LocalView {
    pub attachments: Vec<LocalAttachmentView>,
    pub mounts: Vec<LocalMountView>,
}

pub fn local_view(l: &pb::ListAttachmentsResponse) -> LocalView {
    LocalView {
        attachments: l
            .attachments
            .iter()
            .map(|a| LocalAttachmentView {
                volume_id: a.volume_id.clone(),
                volume_name: a.volume_name.clone(),
                device: a.device.clone(),
                frontend: a.frontend.clone(),
                generation: a.generation,
                state: a.state.clone(),
                healthy: a.healthy,
                reason: a.reason.clone(),
                readonly: a.readonly,
                size_bytes: a.size_bytes,
                reconnects: a.reconnects,
                last_pause_ms: a.last_pause_ms,
                migrations: a.migrations,
                io_errors: a.io_errors,
            })
            .collect(),
        mounts: l
            .mounts
            .iter()
            .map(|m| LocalMountView {
                volume_id: m.volume_id.clone(),
                volume_name: m.volume_name.clone(),
                target: m.target.clone(),
                healthy: m.healthy,
                reason: m.reason.clone(),
                readonly: m.readonly,
            })
            .collect(),
    }
}

pub fn json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail.
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

// ---------------------------------------------------------------- tables

pub(crate) fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn ids(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

pub fn cluster_text(c: &pb::ClusterStatusResponse) -> String {
    key_values(&[
        ("cluster", dash(&c.cluster_id)),
        ("ready", if c.ready { "yes".into() } else { "no (the catalog has no leader or has not formed yet)".into() }),
        ("catalog leader", if c.catalog_leader_id == 0 { "none".into() } else { c.catalog_leader_id.to_string() }),
        ("catalog voters", ids(&c.catalog_voters)),
        ("catalog learners", ids(&c.catalog_learners)),
        ("catalog term", c.catalog_term.to_string()),
        ("applied index", c.catalog_applied_index.to_string()),
        ("nodes", format!("{} up of {}", c.nodes_up, c.nodes_total)),
        (
            "volumes",
            format!(
                "{} ({} healthy, {} degraded, {} rebuilding)",
                c.volumes_total, c.volumes_healthy, c.volumes_degraded, c.volumes_rebuilding
            ),
        ),
        ("answered by", format!("node {}", c.answered_by)),
    ])
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    sorted(labels).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn heartbeat(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=119_999 => format!("{}s", ms / 1000),
        _ => format!("{}m", ms / 60_000),
    }
}

pub fn nodes_text(nodes: &[pb::Node]) -> String {
    if nodes.is_empty() {
        return "no nodes\n".into();
    }
    let mut t = Table::new(&[
        "NAME",
        "ID",
        "STATE",
        "VOTER",
        "API",
        "NBD",
        "CAPACITY",
        "FREE",
        "REPLICAS",
        "CRC-REPAIRS",
        "HEARTBEAT",
        "LABELS",
    ]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            n.node_id.to_string(),
            node_state(n.state()).into(),
            yes_no(n.catalog_voter),
            dash(&n.api_addr),
            dash(&n.nbd_addr),
            human_size(n.capacity_bytes),
            human_size(n.free_bytes),
            n.replicas.to_string(),
            n.crc_repairs.to_string(),
            format!("{} ago", heartbeat(n.last_heartbeat_ms_ago)),
            labels_text(&n.labels),
        ]);
    }
    t.render()
}

/// Aggregate rebuild progress of the volume's rebuilding replicas.
fn rebuild_percent(v: &pb::Volume) -> Option<u64> {
    let rebuilding: Vec<&pb::Replica> =
        v.replicas.iter().filter(|r| r.state() == pb::ReplicaState::Rebuilding && r.rebuild_bytes_total > 0).collect();
    if rebuilding.is_empty() {
        return None;
    }
    let done: u64 = rebuilding.iter().map(|r| r.rebuild_bytes_done).sum();
    let total: u64 = rebuilding.iter().map(|r| r.rebuild_bytes_total).sum();
    Some(percent(done, total))
}

/// Whether the volume is still being filled from a snapshot or volume.
fn restoring(v: &pb::Volume) -> bool {
    !v.source_snapshot_id.is_empty() && v.state() == pb::VolumeState::Creating
}

fn state_with_progress(v: &pb::Volume) -> String {
    let s = volume_state(v.state());
    if v.retained {
        let n = v.snapshot_count;
        return format!("deleted, kept for {n} snapshot{}", if n == 1 { "" } else { "s" });
    }
    if restoring(v) {
        return format!("restoring {}%", percent(v.restore_bytes_done, v.restore_bytes_total));
    }
    match rebuild_percent(v) {
        Some(p) if v.state() == pb::VolumeState::Rebuilding => format!("{s} {p}%"),
        _ => s.to_string(),
    }
}

fn restore_text(v: &pb::Volume) -> String {
    let what = format!("{} of {}", human_size(v.restore_bytes_done), human_size(v.restore_bytes_total));
    if restoring(v) {
        format!("{}% ({what} copied)", percent(v.restore_bytes_done, v.restore_bytes_total))
    } else {
        format!("done ({} copied)", human_size(v.restore_bytes_total))
    }
}

fn snapshots_summary(v: &pb::Volume) -> String {
    let mut s = format!("{} ({} held only by snapshots", v.snapshot_count, human_size(v.snapshot_bytes));
    if v.reclaimed_bytes > 0 {
        s.push_str(&format!(", {} reclaimed after deletions", human_size(v.reclaimed_bytes)));
    }
    if v.sweep_pending {
        s.push_str(", reclaiming now");
    }
    s.push(')');
    s
}

fn healthy_replicas(v: &pb::Volume) -> String {
    let healthy = v.replicas.iter().filter(|r| r.state() == pb::ReplicaState::Healthy).count();
    format!("{healthy}/{}", v.replica_count)
}

fn attached_to(v: &pb::Volume) -> String {
    if v.attachments.is_empty() {
        return "-".into();
    }
    v.attachments
        .iter()
        .map(|a| if a.node_name.is_empty() { a.node_id.to_string() } else { a.node_name.clone() })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn volumes_text(volumes: &[pb::Volume]) -> String {
    if volumes.is_empty() {
        return "no volumes (create one: volctl volume create NAME --size 1Gi)\n".into();
    }
    let mut t =
        Table::new(&["NAME", "ID", "KIND", "SIZE", "USED", "REPLICAS", "STATE", "LEADER", "ATTACHED", "SNAPSHOTS"]);
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            v.id.clone(),
            volume_kind(v.kind()).into(),
            human_size(v.size_bytes),
            human_size(v.used_bytes),
            healthy_replicas(v),
            state_with_progress(v),
            dash(&leader_name(v)),
            attached_to(v),
            v.snapshot_count.to_string(),
        ]);
    }
    t.render()
}

fn replica_progress(r: &pb::Replica) -> String {
    if r.state() != pb::ReplicaState::Rebuilding {
        return "-".into();
    }
    if r.rebuild_bytes_total == 0 {
        return "starting".into();
    }
    format!(
        "{}% ({} of {})",
        percent(r.rebuild_bytes_done, r.rebuild_bytes_total),
        human_size(r.rebuild_bytes_done),
        human_size(r.rebuild_bytes_total)
    )
}

pub fn volume_text(v: &pb::Volume) -> String {
    let leader = match (v.leader_node_id, leader_name(v)) {
        (0, _) => "none".to_string(),
        (id, name) if name.is_empty() => id.to_string(),
        (id, name) => format!("{name} ({id})"),
    };
    let params = if v.parameters.is_empty() {
        "-".to_string()
    } else {
        sorted(&v.parameters).iter().map(|(k, val)| format!("{k}={val}")).collect::<Vec<_>>().join(", ")
    };
    let mut pairs = vec![
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("kind", volume_kind(v.kind()).into()),
        ("size", format!("{} ({} bytes)", human_size(v.size_bytes), v.size_bytes)),
        ("used", human_size(v.used_bytes)),
        ("state", state_with_progress(v)),
        ("snapshots", snapshots_summary(v)),
    ];
    if !v.source_snapshot_id.is_empty() {
        pairs.push(("source", format!("snapshot {} of volume {}", v.source_snapshot_id, v.source_volume_id)));
        pairs.push(("restore", restore_text(v)));
    }
    pairs.extend([
        (
            "replicas",
            format!("{} healthy of {} wanted", healthy_replicas(v).split('/').next().unwrap_or("0"), v.replica_count),
        ),
        ("leader", leader),
        ("nbd", dash(&v.nbd_uri)),
        ("parameters", params),
        ("fence generation", v.fence_generation.to_string()),
        ("crc repairs", v.crc_repairs.to_string()),
        ("created", utc_time(v.created_at_unix_ms)),
    ]);
    if v.kind() == pb::VolumeKind::File {
        pairs.push(("inodes", format!("{} of {}", v.file_inodes, v.file_max_inodes)));
    }
    let mut out = key_values(&pairs);
    if !v.replicas.is_empty() {
        let mut t = Table::new(&["NODE", "ID", "ROLE", "STATE", "REBUILD", "APPLIED", "MATCHED"]);
        for r in &v.replicas {
            t.row(vec![
                dash(&r.node_name),
                r.node_id.to_string(),
                replica_role(r.role()).into(),
                replica_state(r.state()).into(),
                replica_progress(r),
                r.applied_index.to_string(),
                r.matched_index.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if !v.attachments.is_empty() {
        let mut t = Table::new(&["ATTACHED TO", "NODE ID", "MODE", "RO", "GENERATION", "DEVICE", "STATE", "SINCE"]);
        for a in &v.attachments {
            t.row(vec![
                dash(&a.node_name),
                a.node_id.to_string(),
                access_mode(a.mode()).into(),
                yes_no(a.readonly),
                a.generation.to_string(),
                dash(&a.device),
                dash(&a.state),
                utc_time(a.attached_at_unix_ms),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub fn attach_text(a: &pb::AttachResponse) -> String {
    key_values(&[
        ("device", a.device.clone()),
        ("frontend", dash(&a.frontend)),
        ("volume", a.volume_id.clone()),
        ("generation", a.generation.to_string()),
        ("size", human_size(a.size_bytes)),
    ])
}

pub fn local_text(l: &pb::ListAttachmentsResponse) -> String {
    if l.attachments.is_empty() && l.mounts.is_empty() {
        return "nothing attached or mounted on this node\n".into();
    }
    let mut out = String::new();
    if !l.attachments.is_empty() {
        let mut t = Table::new(&[
            "VOLUME",
            "ID",
            "DEVICE",
            "FRONTEND",
            "SIZE",
            "RO",
            "GENERATION",
            "RECONNECTS",
            "IO-ERRORS",
            "STATE",
            "HEALTH",
        ]);
        for a in &l.attachments {
            t.row(vec![
                dash(&a.volume_name),
                a.volume_id.clone(),
                dash(&a.device),
                dash(&a.frontend),
                human_size(a.size_bytes),
                yes_no(a.readonly),
                a.generation.to_string(),
                if a.reconnects == 0 {
                    "0".into()
                } else {
                    format!("{} (last pause {}ms)", a.reconnects, a.last_pause_ms)
                },
                a.io_errors.to_string(),
                dash(&a.state),
                if a.healthy { "ok".into() } else { format!("unhealthy: {}", dash(&a.reason)) },
            ]);
        }
        out.push_str(&t.render());
    }
    if !l.mounts.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let mut t = Table::new(&["VOLUME", "ID", "MOUNTED AT", "RO", "HEALTH"]);
        for m in &l.mounts {
            t.row(vec![
                dash(&m.volume_name),
                m.volume_id.clone(),
                m.target.clone(),
                yes_no(m.readonly),
                if m.healthy { "ok".into() } else { format!("unhealthy: {}", dash(&m.reason)) },
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: u64, role: pb::ReplicaRole, state: pb::ReplicaState, done: u64, total: u64) -> pb::Replica {
        pb::Replica {
            node_id: id,
            node_name: format!("node-{id}"),
            role: role as i32,
            state: state as i32,
            rebuild_bytes_done: done,
            rebuild_bytes_total: total,
            applied_index: 40 + id,
            matched_index: 40,
        }
    }

    pub fn rebuilding_volume() -> pb::Volume {
        pb::Volume {
            id: "3f0e8a9c-1111-4222-8333-944455556666".into(),
            name: "pvc-data".into(),
            size_bytes: 3 << 30,
            kind: pb::VolumeKind::Block as i32,
            replica_count: 3,
            state: pb::VolumeState::Rebuilding as i32,
            replicas: vec![
                replica(1, pb::ReplicaRole::Leader, pb::ReplicaState::Healthy, 0, 0),
                replica(2, pb::ReplicaRole::Follower, pb::ReplicaState::Healthy, 0, 0),
                replica(4, pb::ReplicaRole::Learner, pb::ReplicaState::Rebuilding, 1 << 30, 4 << 30),
            ],
            nbd_uri: "nbd://127.0.0.2:10809/3f0e8a9c-1111-4222-8333-944455556666".into(),
            parameters: [("fsType".to_string(), "xfs".to_string())].into(),
            attachments: vec![pb::Attachment {
                volume_id: "3f0e8a9c-1111-4222-8333-944455556666".into(),
                node_id: 2,
                node_name: "node-2".into(),
                mode: pb::AccessMode::SingleNodeWriter as i32,
                readonly: false,
                generation: 7,
                attached_at_unix_ms: 1_000,
                device: "/dev/loop3".into(),
                frontend: "fuse-loop".into(),
                state: "attached".into(),
            }],
            created_at_unix_ms: 951_782_400_000,
            leader_node_id: 1,
            fence_generation: 7,
            used_bytes: 1 << 29,
            crc_repairs: 2,
            ..Default::default()
        }
    }

    #[test]
    fn volume_json_uses_names_not_numbers() {
        let v = serde_json::to_value(volume_view(&rebuilding_volume())).unwrap();
        assert_eq!(v["id"], "3f0e8a9c-1111-4222-8333-944455556666");
        assert_eq!(v["name"], "pvc-data");
        assert_eq!(v["size_bytes"], 3u64 << 30);
        assert_eq!(v["state"], "rebuilding");
        assert_eq!(v["kind"], "block");
        assert_eq!(v["leader_node_id"], 1);
        assert_eq!(v["leader_node_name"], "node-1");
        assert_eq!(v["used_bytes"], 1u64 << 29);
        assert_eq!(v["crc_repairs"], 2);
        assert_eq!(v["nbd_uri"], "nbd://127.0.0.2:10809/3f0e8a9c-1111-4222-8333-944455556666");
        assert_eq!(v["parameters"]["fsType"], "xfs");
        let r = &v["replicas"];
        assert_eq!(r.as_array().unwrap().len(), 3);
        assert_eq!(r[0]["role"], "leader");
        assert_eq!(r[0]["state"], "healthy");
        assert_eq!(r[2]["node_id"], 4);
        assert_eq!(r[2]["node_name"], "node-4");
        assert_eq!(r[2]["role"], "learner");
        assert_eq!(r[2]["state"], "rebuilding");
        assert_eq!(r[2]["rebuild_bytes_done"], 1u64 << 30);
        assert_eq!(r[2]["rebuild_bytes_total"], 4u64 << 30);
        assert_eq!(r[2]["applied_index"], 44);
        let a = &v["attachments"][0];
        assert_eq!(a["mode"], "single-node-writer");
        assert_eq!(a["device"], "/dev/loop3");
        assert_eq!(a["generation"], 7);
    }

    #[test]
    fn every_enum_value_has_a_lowercase_name() {
        for s in [
            pb::VolumeState::Creating,
            pb::VolumeState::Healthy,
            pb::VolumeState::Degraded,
            pb::VolumeState::Unavailable,
        ] {
            assert_eq!(volume_state(s), volume_state(s).to_lowercase());
        }
        assert_eq!(replica_role(pb::ReplicaRole::Candidate), "candidate");
        assert_eq!(replica_role(pb::ReplicaRole::Unspecified), "unknown");
        assert_eq!(replica_state(pb::ReplicaState::Lagging), "lagging");
        assert_eq!(replica_state(pb::ReplicaState::Unreachable), "unreachable");
        assert_eq!(replica_state(pb::ReplicaState::Removing), "removing");
        assert_eq!(node_state(pb::NodeState::Suspect), "suspect");
        assert_eq!(volume_kind(pb::VolumeKind::Unspecified), "block");
        // A value newer than this volctl reads as unknown, not as a number.
        let mut v = rebuilding_volume();
        v.state = 99;
        assert_eq!(volume_view(&v).state, "unknown");
    }

    #[test]
    fn volume_table_shows_sizes_and_rebuild_progress() {
        let text = volume_text(&rebuilding_volume());
        assert!(text.contains("size:              3 GiB (3221225472 bytes)"), "{text}");
        assert!(text.contains("state:             rebuilding 25%"), "{text}");
        assert!(text.contains("leader:            node-1 (1)"), "{text}");
        assert!(text.contains("created:           2000-02-29 00:00:00 UTC"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("NODE")).unwrap();
        assert_eq!(lines[header], "NODE    ID  ROLE      STATE       REBUILD               APPLIED  MATCHED");
        assert_eq!(lines[header + 3], "node-4  4   learner   rebuilding  25% (1 GiB of 4 GiB)  44       40");
        assert!(text.contains("node-2       2        single-node-writer  no  7           /dev/loop3"), "{text}");
    }

    #[test]
    fn volume_list_table() {
        let mut healthy = rebuilding_volume();
        healthy.name = "b".into();
        healthy.id = "id-b".into();
        healthy.state = pb::VolumeState::Healthy as i32;
        healthy.replicas[2].state = pb::ReplicaState::Healthy as i32;
        healthy.attachments.clear();
        healthy.size_bytes = 512 << 20;
        let text = volumes_text(&[rebuilding_volume(), healthy]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0]
            .starts_with("NAME      ID                                    KIND   SIZE     USED     REPLICAS  STATE"));
        assert!(lines[1].contains("3 GiB    512 MiB  2/3       rebuilding 25%  node-1  node-2"), "{text}");
        assert!(lines[2].contains("512 MiB  512 MiB  3/3       healthy         node-1  -"), "{text}");
        assert!(volumes_text(&[]).contains("volctl volume create"));
    }

    #[test]
    fn restore_progress_snapshots_and_retained_volumes() {
        let mut v = rebuilding_volume();
        v.state = pb::VolumeState::Creating as i32;
        v.source_snapshot_id = "snap-1".into();
        v.source_volume_id = "vol-0".into();
        v.restore_bytes_done = 1 << 20;
        v.restore_bytes_total = 4 << 20;
        v.snapshot_count = 2;
        v.snapshot_bytes = 8 << 20;
        let text = volume_text(&v);
        assert!(text.contains("state:             restoring 25%\n"), "{text}");
        assert!(text.contains("source:            snapshot snap-1 of volume vol-0\n"), "{text}");
        assert!(text.contains("restore:           25% (1 MiB of 4 MiB copied)\n"), "{text}");
        assert!(text.contains("snapshots:         2 (8 MiB held only by snapshots)\n"), "{text}");
        let j = serde_json::to_value(volume_view(&v)).unwrap();
        assert_eq!(j["restore_bytes_done"], 1u64 << 20);
        assert_eq!(j["source_snapshot_id"], "snap-1");
        assert_eq!(j["snapshot_count"], 2);
        assert!(j.get("snapshots").is_none(), "only `volume get` adds the chain");
        v.state = pb::VolumeState::Healthy as i32;
        v.restore_bytes_done = v.restore_bytes_total;
        v.reclaimed_bytes = 1 << 20;
        v.sweep_pending = true;
        let text = volume_text(&v);
        assert!(text.contains("restore:           done (4 MiB copied)\n"), "{text}");
        assert!(text.contains("1 MiB reclaimed after deletions, reclaiming now)"), "{text}");
        v.retained = true;
        v.state = pb::VolumeState::Deleting as i32;
        v.snapshot_count = 1;
        assert!(volumes_text(&[v]).contains("deleted, kept for 1 snapshot "));
    }

    #[test]
    fn node_table_and_json() {
        let n = pb::Node {
            node_id: 7,
            name: "node-7".into(),
            api_addr: "127.0.0.8:7400".into(),
            nbd_addr: "127.0.0.8:10809".into(),
            labels: [("zone".to_string(), "b".to_string()), ("rack".to_string(), "r1".to_string())].into(),
            capacity_bytes: 100 << 30,
            free_bytes: 97 << 30,
            state: pb::NodeState::Up as i32,
            catalog_voter: true,
            last_heartbeat_ms_ago: 250,
            replicas: 3,
            crc_repairs: 0,
            max_volumes: 64,
        };
        let text = nodes_text(std::slice::from_ref(&n));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "node-7  7   up     yes    127.0.0.8:7400  127.0.0.8:10809  100 GiB   97 GiB  3         0            250ms ago  rack=r1,zone=b"
        );
        let j = serde_json::to_value(vec![node_view(&n)]).unwrap();
        assert_eq!(j[0]["name"], "node-7");
        assert_eq!(j[0]["state"], "up");
        assert_eq!(j[0]["labels"]["zone"], "b");
    }

    #[test]
    fn cluster_status_text_and_json() {
        let c = pb::ClusterStatusResponse {
            cluster_id: "c1".into(),
            catalog_leader_id: 2,
            catalog_voters: vec![1, 2, 3],
            catalog_learners: vec![],
            catalog_term: 4,
            catalog_applied_index: 99,
            nodes_total: 3,
            nodes_up: 2,
            volumes_total: 5,
            volumes_healthy: 4,
            volumes_degraded: 1,
            volumes_rebuilding: 0,
            answered_by: 3,
            ready: true,
        };
        let t = cluster_text(&c);
        assert!(t.contains("ready:             yes\n"), "{t}");
        assert!(t.contains("catalog voters:    1, 2, 3\n"), "{t}");
        assert!(t.contains("catalog learners:  -\n"), "{t}");
        assert!(t.contains("nodes:             2 up of 3\n"), "{t}");
        let j = serde_json::to_value(cluster_view(&c)).unwrap();
        assert_eq!(j["ready"], true);
        assert_eq!(j["catalog_voters"], serde_json::json!([1, 2, 3]));
    }

    #[test]
    fn attach_json_has_the_device() {
        let a = pb::AttachResponse {
            volume_id: "v".into(),
            device: "/dev/loop4".into(),
            frontend: "fuse-loop".into(),
            generation: 3,
            size_bytes: 1 << 30,
        };
        let j = serde_json::to_value(attach_view(&a)).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"volume_id": "v", "device": "/dev/loop4", "frontend": "fuse-loop", "generation": 3, "size_bytes": 1u64 << 30})
        );
        assert!(attach_text(&a).starts_with("device:      /dev/loop4\n"));
        let l = pb::ListAttachmentsResponse {
            attachments: vec![pb::LocalAttachment {
                volume_id: "v".into(),
                volume_name: "data".into(),
                device: "/dev/loop4".into(),
                frontend: "fuse-loop".into(),
                generation: 3,
                healthy: false,
                reason: "leader unreachable".into(),
                state: "reconnecting".into(),
                readonly: false,
                size_bytes: 1 << 30,
                reconnects: 2,
                last_pause_ms: 350,
                ..Default::default()
            }],
            mounts: vec![],
        };
        let t = local_text(&l);
        assert!(t.contains("unhealthy: leader unreachable"), "{t}");
        assert!(t.contains("2 (last pause 350ms)"), "{t}");
        let j = serde_json::to_value(local_view(&l)).unwrap();
        assert_eq!(j["attachments"][0]["state"], "reconnecting");
        assert_eq!(j["attachments"][0]["reconnects"], 2);
        assert_eq!(j["mounts"], serde_json::json!([]));
    }
}
