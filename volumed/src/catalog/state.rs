//! The catalog's replicated state and its commands. `apply` is
//! deterministic: every catalog replica reaches the same state from the same
//! log. Decisions that need knowledge outside the log (which nodes answer
//! heartbeats right now, where replicas fit) are made by the leader before
//! proposing and arrive here as command fields (e.g. `placement`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::snapshots::{GroupSnapshotRecord, SnapshotCommand, SnapshotRecord, VolumeSource};
use crate::storage::log_store::NodeId;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CatalogState {
    pub cluster_id: Option<Uuid>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub volumes: BTreeMap<Uuid, VolumeRecord>,
    pub names: BTreeMap<String, Uuid>,
    pub snapshots: BTreeMap<Uuid, SnapshotRecord>,
    /// Names of snapshots that are not being deleted.
    pub snapshot_names: BTreeMap<String, Uuid>,
    pub group_snapshots: BTreeMap<Uuid, GroupSnapshotRecord>,
    pub group_snapshot_names: BTreeMap<String, Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    pub nbd_addr: String,
    pub labels: Labels,
    pub capacity_bytes: u64,
    pub max_volumes: u32,
    /// Removed by the operator: holds no replicas, never chosen again.
    pub removed: bool,
    /// Unreachable for longer than the grace period: its replicas are being
    /// re-created elsewhere. Cleared when it comes back.
    pub down: bool,
    pub joined_at_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum VolumeKind {
    #[default]
    Block,
    File,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    pub fn writes(&self, readonly: bool) -> bool {
        !readonly && !matches!(self, AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly)
    }
    /// Whether a writer with this mode excludes every other writer node.
    pub fn exclusive_writer(&self) -> bool {
        matches!(self, AccessMode::SingleNodeWriter | AccessMode::MultiNodeSingleWriter)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlacementConstraints {
    /// Each replica's node must match one of these (all pairs), if any.
    pub requisite: Vec<Labels>,
    /// Preferred topologies, in order of preference.
    pub preferred: Vec<Labels>,
    /// Hard requirement: every replica in a distinct zone.
    pub spread_zones: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachmentRecord {
    pub node: NodeId,
    pub mode: AccessMode,
    pub readonly: bool,
    pub generation: u64,
    pub attached_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebuildRecord {
    pub replaced: NodeId,
    pub by: NodeId,
    pub started_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: Uuid,
    pub name: String,
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub replica_count: u32,
    pub parameters: BTreeMap<String, String>,
    pub constraints: PlacementConstraints,
    /// Nodes that should hold a replica (the volume group converges to it).
    pub placement: Vec<NodeId>,
    pub rebuilds: Vec<RebuildRecord>,
    pub created_at_ms: i64,
    /// Last generation handed to an attachment.
    pub generation: u64,
    /// Writes carrying a generation below this are rejected (fencing).
    pub fence_floor: u64,
    pub attachments: Vec<AttachmentRecord>,
    /// Restored or cloned from this snapshot.
    pub source: Option<VolumeSource>,
    /// False while the copy from `source` runs (no I/O, no publish).
    pub hydrated: bool,
    /// Deleted by the user while snapshots of it exist: hidden, but its
    /// group is kept until the last of them is deleted.
    pub retained: bool,
}

impl VolumeRecord {
    /// Whether a writer attachment exists, so that writes without a
    /// generation (admin NBD connections) must be refused.
    pub fn exclusive(&self) -> bool {
        self.attachments.iter().any(|a| a.mode.writes(a.readonly))
    }
}

/// What a caller asks for when creating a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    pub kind: VolumeKind,
    pub replica_count: u32,
    pub parameters: BTreeMap<String, String>,
    pub constraints: PlacementConstraints,
    /// Restore or clone source.
    pub source: Option<VolumeSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CatalogCommand {
    Bootstrap {
        cluster_id: Uuid,
        nodes: Vec<NodeRecord>,
    },
    /// A node joined, or restarted with new addresses, labels or capacity.
    UpsertNode(NodeRecord),
    SetNodeDown {
        node: NodeId,
        down: bool,
    },
    RemoveNode {
        node: NodeId,
    },
    CreateVolume {
        id: Uuid,
        spec: VolumeSpec,
        placement: Vec<NodeId>,
        now_ms: i64,
    },
    DeleteVolume {
        id: Uuid,
    },
    ResizeVolume {
        id: Uuid,
        size_bytes: u64,
    },
    ModifyVolume {
        id: Uuid,
        parameters: BTreeMap<String, String>,
    },
    Publish {
        id: Uuid,
        node: NodeId,
        mode: AccessMode,
        readonly: bool,
        force: bool,
        now_ms: i64,
    },
    Unpublish {
        id: Uuid,
        node: Option<NodeId>,
    },
    ReplaceReplica {
        id: Uuid,
        old: NodeId,
        new: NodeId,
        now_ms: i64,
    },
    /// The replacement replica caught up and is a voter.
    FinishRebuild {
        id: Uuid,
        node: NodeId,
    },
    /// Snapshots and group snapshots (see `snapshots`).
    Snapshot(SnapshotCommand),
    /// A restored or cloned volume holds all its data.
    FinishHydration {
        id: Uuid,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// Not possible yet; a retry may succeed.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum CatalogResponse {
    Ok,
    /// Whether the thing existed before the command (delete, unpublish).
    Existed(bool),
    Volume(Box<VolumeRecord>),
    /// The attachment and whether it was created by this command.
    Attachment {
        attachment: AttachmentRecord,
        created: bool,
    },
    Snapshot(Box<SnapshotRecord>),
    GroupSnapshot(Box<GroupSnapshotRecord>),
    Error(CatalogError),
}

pub const MIN_VOLUME_SIZE: u64 = 1 << 20;
pub const MAX_REPLICAS: u32 = 5;

impl CatalogState {
    /// A volume users can see (not one retained for its snapshots).
    pub fn volume_by_id_or_name(&self, key: &str) -> Option<&VolumeRecord> {
        if let Ok(id) = Uuid::parse_str(key) {
            if let Some(v) = self.volumes.get(&id).filter(|v| !v.retained) {
                return Some(v);
            }
        }
        self.names.get(key).and_then(|id| self.volumes.get(id)).filter(|v| !v.retained)
    }

    /// Bytes of replicas placed on each node (what placement calls "used").
    pub fn provisioned_by_node(&self) -> BTreeMap<NodeId, u64> {
        let mut out = BTreeMap::new();
        for v in self.volumes.values() {
            for n in &v.placement {
                *out.entry(*n).or_insert(0) += v.size_bytes;
            }
        }
        out
    }

    pub fn apply(&mut self, cmd: CatalogCommand) -> CatalogResponse {
        use CatalogResponse as R;
        match cmd {
            CatalogCommand::Bootstrap { cluster_id, nodes } => {
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(cluster_id);
                }
                for n in nodes {
                    self.nodes.entry(n.id).or_insert(n);
                }
                R::Ok
            }
            CatalogCommand::UpsertNode(mut rec) => {
                if let Some(old) = self.nodes.get(&rec.id) {
                    if old.removed {
                        return R::Error(CatalogError::FailedPrecondition(format!(
                            "node {} ({}) was removed from the cluster; wipe its data directory to join again",
                            rec.id, old.name
                        )));
                    }
                    rec.removed = false;
                    rec.down = old.down;
                    rec.joined_at_ms = old.joined_at_ms;
                }
                if let Some(other) = self.nodes.values().find(|n| n.name == rec.name && n.id != rec.id && !n.removed) {
                    return R::Error(CatalogError::AlreadyExists(format!(
                        "node name {} is already used by node {}",
                        rec.name, other.id
                    )));
                }
                self.nodes.insert(rec.id, rec);
                R::Ok
            }
            CatalogCommand::SetNodeDown { node, down } => match self.nodes.get_mut(&node) {
                Some(n) => {
                    n.down = down;
                    R::Ok
                }
                None => R::Error(CatalogError::NotFound(format!("node {node} not found"))),
            },
            CatalogCommand::RemoveNode { node } => match self.nodes.get_mut(&node) {
                Some(n) => {
                    let existed = !n.removed;
                    n.removed = true;
                    for v in self.volumes.values_mut() {
                        v.attachments.retain(|a| a.node != node);
                    }
                    R::Existed(existed)
                }
                None => R::Error(CatalogError::NotFound(format!("node {node} not found"))),
            },
            CatalogCommand::CreateVolume { id, spec, placement, now_ms } => {
                self.create_volume(id, spec, placement, now_ms)
            }
            CatalogCommand::DeleteVolume { id } => {
                let Some(v) = self.volumes.get(&id).filter(|v| !v.retained) else { return R::Existed(false) };
                if let Some(a) = v.attachments.first() {
                    return R::Error(CatalogError::FailedPrecondition(format!(
                        "volume {} is published to node {}; unpublish it first",
                        v.name, a.node
                    )));
                }
                let name = v.name.clone();
                if self.names.get(&name) == Some(&id) {
                    self.names.remove(&name);
                }
                // Snapshots outlive their volume (as VolumeSnapshotContents
                // outlive PVs): keep the group while any exists.
                if self.snapshots.values().any(|s| s.source_volume == id) {
                    if let Some(v) = self.volumes.get_mut(&id) {
                        v.retained = true;
                    }
                } else {
                    self.volumes.remove(&id);
                }
                // A clone that is deleted before it was filled no longer
                // needs the implicit snapshot taken for it.
                let implicit: Vec<Uuid> =
                    self.snapshots.values().filter(|s| s.for_clone == Some(id) && !s.deleting).map(|s| s.id).collect();
                for s in implicit {
                    self.apply_snapshot(SnapshotCommand::Delete { id: s });
                }
                R::Existed(true)
            }
            CatalogCommand::ResizeVolume { id, size_bytes } => {
                let Some(v) = self.volumes.get_mut(&id) else {
                    return R::Error(CatalogError::NotFound(format!("volume {id} not found")));
                };
                if size_bytes < v.size_bytes {
                    return R::Error(CatalogError::InvalidArgument(format!(
                        "volume {} is {} bytes; shrinking to {} is not supported",
                        v.name, v.size_bytes, size_bytes
                    )));
                }
                v.size_bytes = size_bytes;
                R::Volume(Box::new(v.clone()))
            }
            CatalogCommand::ModifyVolume { id, parameters } => {
                let Some(v) = self.volumes.get_mut(&id) else {
                    return R::Error(CatalogError::NotFound(format!("volume {id} not found")));
                };
                for (k, val) in parameters {
                    if val.is_empty() {
                        v.parameters.remove(&k);
                    } else {
                        v.parameters.insert(k, val);
                    }
                }
                R::Volume(Box::new(v.clone()))
            }
            CatalogCommand::Publish { id, node, mode, readonly, force, now_ms } => {
                self.publish(id, node, mode, readonly, force, now_ms)
            }
            CatalogCommand::Unpublish { id, node } => {
                let Some(v) = self.volumes.get_mut(&id) else { return R::Existed(false) };
                let before = v.attachments.len();
                match node {
                    Some(n) => v.attachments.retain(|a| a.node != n),
                    None => v.attachments.clear(),
                }
                R::Existed(v.attachments.len() != before)
            }
            CatalogCommand::ReplaceReplica { id, old, new, now_ms } => {
                let Some(v) = self.volumes.get_mut(&id) else {
                    return R::Error(CatalogError::NotFound(format!("volume {id} not found")));
                };
                if v.placement.contains(&new) {
                    return R::Error(CatalogError::FailedPrecondition(format!(
                        "node {new} already holds a replica of {}",
                        v.name
                    )));
                }
                let Some(slot) = v.placement.iter_mut().find(|n| **n == old) else {
                    return R::Error(CatalogError::FailedPrecondition(format!(
                        "node {old} holds no replica of {}",
                        v.name
                    )));
                };
                *slot = new;
                v.rebuilds.retain(|r| r.by != old);
                v.rebuilds.push(RebuildRecord { replaced: old, by: new, started_at_ms: now_ms });
                R::Volume(Box::new(v.clone()))
            }
            CatalogCommand::FinishRebuild { id, node } => {
                let Some(v) = self.volumes.get_mut(&id) else { return R::Existed(false) };
                let before = v.rebuilds.len();
                v.rebuilds.retain(|r| r.by != node);
                R::Existed(before != v.rebuilds.len())
            }
            CatalogCommand::Snapshot(cmd) => self.apply_snapshot(cmd),
            CatalogCommand::FinishHydration { id } => {
                let Some(v) = self.volumes.get_mut(&id) else { return R::Existed(false) };
                if v.hydrated {
                    return R::Existed(false);
                }
                v.hydrated = true;
                let implicit: Vec<Uuid> =
                    self.snapshots.values().filter(|s| s.for_clone == Some(id) && !s.deleting).map(|s| s.id).collect();
                for s in implicit {
                    self.apply_snapshot(SnapshotCommand::Delete { id: s });
                }
                R::Existed(true)
            }
        }
    }

    fn create_volume(&mut self, id: Uuid, spec: VolumeSpec, placement: Vec<NodeId>, now_ms: i64) -> CatalogResponse {
        use CatalogResponse as R;
        if let Some(existing) = self.names.get(&spec.name).and_then(|id| self.volumes.get(id)) {
            // A clone's implicit snapshot differs per attempt; its source
            // volume does not.
            let same_source = match (&existing.source, &spec.source) {
                (None, None) => true,
                (Some(a), Some(b)) if a.implicit && b.implicit => a.volume == b.volume,
                (Some(a), Some(b)) => !a.implicit && !b.implicit && a.snapshot == b.snapshot,
                _ => false,
            };
            if !same_source {
                return R::Error(CatalogError::AlreadyExists(format!(
                    "volume {} already exists with another content source",
                    spec.name
                )));
            }
            // Idempotent by name: a retry of the same request gets the same volume.
            if existing.size_bytes == spec.size_bytes
                && existing.kind == spec.kind
                && existing.replica_count == spec.replica_count
                && existing.parameters == spec.parameters
            {
                return R::Volume(Box::new(existing.clone()));
            }
            return R::Error(CatalogError::AlreadyExists(format!(
                "volume {} already exists with size {} bytes, {} replicas, kind {:?}; requested {} bytes, {} replicas, kind {:?}",
                spec.name,
                existing.size_bytes,
                existing.replica_count,
                existing.kind,
                spec.size_bytes,
                spec.replica_count,
                spec.kind
            )));
        }
        if self.volumes.contains_key(&id) {
            return R::Error(CatalogError::AlreadyExists(format!("volume id {id} already exists")));
        }
        if placement.len() != spec.replica_count as usize {
            return R::Error(CatalogError::InvalidArgument(format!(
                "placement has {} nodes for {} replicas",
                placement.len(),
                spec.replica_count
            )));
        }
        for n in &placement {
            match self.nodes.get(n) {
                Some(rec) if !rec.removed => {}
                _ => return R::Error(CatalogError::FailedPrecondition(format!("node {n} cannot hold replicas"))),
            }
        }
        if let Some(src) = &spec.source {
            if let Err(e) = self.check_volume_source(src, spec.size_bytes, spec.kind) {
                return R::Error(e);
            }
        }
        let rec = VolumeRecord {
            id,
            name: spec.name.clone(),
            size_bytes: spec.size_bytes,
            kind: spec.kind,
            replica_count: spec.replica_count,
            parameters: spec.parameters,
            constraints: spec.constraints,
            placement,
            rebuilds: Vec::new(),
            created_at_ms: now_ms,
            generation: 0,
            fence_floor: 0,
            attachments: Vec::new(),
            hydrated: spec.source.is_none(),
            source: spec.source,
            retained: false,
        };
        self.names.insert(spec.name, id);
        self.volumes.insert(id, rec.clone());
        R::Volume(Box::new(rec))
    }

    fn publish(
        &mut self,
        id: Uuid,
        node: NodeId,
        mode: AccessMode,
        readonly: bool,
        force: bool,
        now_ms: i64,
    ) -> CatalogResponse {
        use CatalogResponse as R;
        match self.nodes.get(&node) {
            Some(n) if !n.removed => {}
            _ => return R::Error(CatalogError::NotFound(format!("node {node} not found"))),
        }
        let max_volumes = self.nodes.get(&node).map(|n| n.max_volumes).unwrap_or(0);
        let attached_here =
            self.volumes.values().filter(|v| v.id != id && v.attachments.iter().any(|a| a.node == node)).count();
        let Some(v) = self.volumes.get_mut(&id).filter(|v| !v.retained) else {
            return R::Error(CatalogError::NotFound(format!("volume {id} not found")));
        };
        if !v.hydrated {
            return R::Error(CatalogError::Unavailable(format!(
                "volume {} is still being restored from its snapshot; retry when it is ready",
                v.name
            )));
        }
        if let Some(a) = v.attachments.iter().find(|a| a.node == node) {
            if a.mode == mode && a.readonly == readonly {
                return R::Attachment { attachment: a.clone(), created: false };
            }
            return R::Error(CatalogError::AlreadyExists(format!(
                "volume {} is already published to node {node} as {:?}{}; unpublish it first",
                v.name,
                a.mode,
                if a.readonly { " read-only" } else { "" }
            )));
        }
        if max_volumes > 0 && attached_here as u32 >= max_volumes {
            return R::Error(CatalogError::ResourceExhausted(format!(
                "node {node} already has {attached_here} volumes published (limit {max_volumes})"
            )));
        }
        let writes = mode.writes(readonly);
        let others_write: Vec<&AttachmentRecord> =
            v.attachments.iter().filter(|a| a.node != node && a.mode.writes(a.readonly)).collect();
        let single_node = matches!(mode, AccessMode::SingleNodeWriter | AccessMode::SingleNodeReaderOnly);
        let conflict = if single_node {
            v.attachments.first().map(|a| a.node)
        } else if writes && mode.exclusive_writer() {
            others_write.first().map(|a| a.node)
        } else if writes {
            others_write.iter().find(|a| a.mode.exclusive_writer()).map(|a| a.node)
        } else {
            v.attachments
                .iter()
                .find(|a| matches!(a.mode, AccessMode::SingleNodeWriter | AccessMode::SingleNodeReaderOnly))
                .map(|a| a.node)
        };
        let mut bump_floor = writes && mode.exclusive_writer();
        if let Some(other) = conflict {
            if !force {
                return R::Error(CatalogError::FailedPrecondition(format!(
                    "volume {} is published to node {other} and its access mode allows one node only; \
                     unpublish it there first (or force the move if that node is lost)",
                    v.name
                )));
            }
            // The forced move of Kubernetes after a node loss: the old node's
            // attachment goes and its writes are fenced from now on.
            v.attachments.retain(|a| a.node != other);
            bump_floor = true;
        }
        v.generation += 1;
        if bump_floor {
            v.fence_floor = v.generation;
        }
        let att = AttachmentRecord { node, mode, readonly, generation: v.generation, attached_at_ms: now_ms };
        v.attachments.push(att.clone());
        R::Attachment { attachment: att, created: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId) -> NodeRecord {
        NodeRecord {
            id,
            name: format!("n{id}"),
            api_addr: format!("127.0.0.{id}:7400"),
            nbd_addr: format!("127.0.0.{id}:10809"),
            labels: Labels::new(),
            capacity_bytes: 1 << 40,
            max_volumes: 2,
            removed: false,
            down: false,
            joined_at_ms: 0,
        }
    }

    fn state() -> CatalogState {
        let mut s = CatalogState::default();
        s.apply(CatalogCommand::Bootstrap { cluster_id: Uuid::new_v4(), nodes: (1..=4).map(node).collect() });
        s
    }

    fn spec(name: &str, size: u64) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size_bytes: size,
            kind: VolumeKind::Block,
            replica_count: 3,
            parameters: Default::default(),
            constraints: Default::default(),
            source: None,
        }
    }

    fn create(s: &mut CatalogState, name: &str, size: u64) -> CatalogResponse {
        s.apply(CatalogCommand::CreateVolume {
            id: Uuid::new_v4(),
            spec: spec(name, size),
            placement: vec![1, 2, 3],
            now_ms: 1,
        })
    }

    #[test]
    fn create_is_idempotent_by_name_and_rejects_incompatible_reuse() {
        let mut s = state();
        let CatalogResponse::Volume(a) = create(&mut s, "pv1", 1 << 30) else { panic!() };
        let CatalogResponse::Volume(b) = create(&mut s, "pv1", 1 << 30) else { panic!() };
        assert_eq!(a.id, b.id);
        assert!(matches!(create(&mut s, "pv1", 2 << 30), CatalogResponse::Error(CatalogError::AlreadyExists(_))));
        assert_eq!(s.volumes.len(), 1);
    }

    #[test]
    fn rwo_publish_conflicts_and_force_fences_the_old_node() {
        let mut s = state();
        let CatalogResponse::Volume(v) = create(&mut s, "pv", 1 << 30) else { panic!() };
        let publish = |s: &mut CatalogState, node, force| {
            s.apply(CatalogCommand::Publish {
                id: v.id,
                node,
                mode: AccessMode::SingleNodeWriter,
                readonly: false,
                force,
                now_ms: 2,
            })
        };
        let CatalogResponse::Attachment { attachment: a1, created: true } = publish(&mut s, 1, false) else { panic!() };
        // Idempotent on the same node.
        let CatalogResponse::Attachment { attachment: again, created: false } = publish(&mut s, 1, false) else {
            panic!()
        };
        assert_eq!(a1, again);
        assert!(matches!(publish(&mut s, 2, false), CatalogResponse::Error(CatalogError::FailedPrecondition(_))));
        let CatalogResponse::Attachment { attachment: a2, .. } = publish(&mut s, 2, true) else { panic!() };
        assert!(a2.generation > a1.generation);
        let rec = &s.volumes[&v.id];
        assert_eq!(rec.fence_floor, a2.generation, "old generation must be fenced");
        assert_eq!(rec.attachments.len(), 1);
        assert_eq!(rec.attachments[0].node, 2);
    }

    #[test]
    fn multi_writer_attachments_coexist_without_fencing_each_other() {
        let mut s = state();
        let CatalogResponse::Volume(v) = create(&mut s, "pv", 1 << 30) else { panic!() };
        for node in [1, 2] {
            let r = s.apply(CatalogCommand::Publish {
                id: v.id,
                node,
                mode: AccessMode::MultiNodeMultiWriter,
                readonly: false,
                force: false,
                now_ms: 0,
            });
            assert!(matches!(r, CatalogResponse::Attachment { .. }), "{r:?}");
        }
        let rec = &s.volumes[&v.id];
        assert_eq!(rec.fence_floor, 0);
        assert!(rec.attachments.iter().all(|a| a.generation >= rec.fence_floor));
    }

    #[test]
    fn node_volume_limit_is_enforced() {
        let mut s = state();
        for i in 0..3 {
            let CatalogResponse::Volume(v) = create(&mut s, &format!("pv{i}"), 1 << 30) else { panic!() };
            let r = s.apply(CatalogCommand::Publish {
                id: v.id,
                node: 4,
                mode: AccessMode::SingleNodeWriter,
                readonly: false,
                force: false,
                now_ms: 0,
            });
            if i < 2 {
                assert!(matches!(r, CatalogResponse::Attachment { .. }));
            } else {
                assert!(matches!(r, CatalogResponse::Error(CatalogError::ResourceExhausted(_))), "{r:?}");
            }
        }
    }

    #[test]
    fn delete_refuses_published_volume_and_is_idempotent() {
        let mut s = state();
        let CatalogResponse::Volume(v) = create(&mut s, "pv", 1 << 30) else { panic!() };
        s.apply(CatalogCommand::Publish {
            id: v.id,
            node: 1,
            mode: AccessMode::SingleNodeWriter,
            readonly: false,
            force: false,
            now_ms: 0,
        });
        assert!(matches!(
            s.apply(CatalogCommand::DeleteVolume { id: v.id }),
            CatalogResponse::Error(CatalogError::FailedPrecondition(_))
        ));
        s.apply(CatalogCommand::Unpublish { id: v.id, node: None });
        assert_eq!(s.apply(CatalogCommand::DeleteVolume { id: v.id }), CatalogResponse::Existed(true));
        assert_eq!(s.apply(CatalogCommand::DeleteVolume { id: v.id }), CatalogResponse::Existed(false));
        assert!(s.names.is_empty());
    }

    #[test]
    fn replace_replica_records_rebuild() {
        let mut s = state();
        let CatalogResponse::Volume(v) = create(&mut s, "pv", 1 << 30) else { panic!() };
        let r = s.apply(CatalogCommand::ReplaceReplica { id: v.id, old: 2, new: 4, now_ms: 5 });
        let CatalogResponse::Volume(after) = r else { panic!("{r:?}") };
        assert_eq!(after.placement, vec![1, 4, 3]);
        assert_eq!(after.rebuilds.len(), 1);
        s.apply(CatalogCommand::FinishRebuild { id: v.id, node: 4 });
        assert!(s.volumes[&v.id].rebuilds.is_empty());
    }
}
