//! Snapshots in the catalog: records, names, group snapshots, restore
//! sources, and the deletion rules that keep every snapshot and clone
//! readable.
//!
//! A snapshot record exists before its volume group cuts it (`ready`
//! false): the name is taken first, so a retry finds the same id and the
//! volume group's cut is idempotent by that id. Deletion is two-phase: the
//! user's delete marks the record `deleting` (the name is free at once);
//! the snapshot reconciler releases the pin in the volume group — only once
//! no clone is still copying from it — and then forgets the record.
//!
//! A volume deleted while snapshots of it exist is *retained*: hidden (its
//! name is free, it cannot be attached or exported) but its group keeps
//! running, so the snapshots stay readable. Forgetting its last snapshot
//! removes it for good.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::state::{CatalogError, CatalogResponse, CatalogState};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: Uuid,
    pub name: String,
    pub source_volume: Uuid,
    pub created_at_ms: i64,
    /// Set once the volume group cut it.
    pub ready: bool,
    /// Log index of the cut in the source volume's group.
    pub index: u64,
    /// Size of the source volume at the cut: the smallest restore.
    pub size_bytes: u64,
    /// Bytes holding data at the cut.
    pub used_bytes: u64,
    /// The group snapshot it belongs to.
    pub group: Option<Uuid>,
    /// Taken implicitly to clone a live volume into this volume; deleted
    /// once the clone is filled.
    pub for_clone: Option<Uuid>,
    /// Deleted by the user; the volume group may still pin it.
    pub deleting: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSnapshotRecord {
    pub id: Uuid,
    pub name: String,
    pub created_at_ms: i64,
    /// Member snapshots, in the order of `volumes`.
    pub members: Vec<Uuid>,
    pub volumes: Vec<Uuid>,
    pub ready: bool,
    pub deleting: bool,
}

/// Where a restored or cloned volume's data comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeSource {
    pub snapshot: Uuid,
    pub volume: Uuid,
    /// Log index of the snapshot in `volume`'s group.
    pub index: u64,
    /// Source volume size at the snapshot.
    pub size_bytes: u64,
    pub used_bytes: u64,
    /// A clone of a live volume (through an implicit snapshot).
    pub implicit: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotCommand {
    /// Takes the name (idempotent for the same source).
    Create { id: Uuid, name: String, source: Uuid, group: Option<Uuid>, for_clone: Option<Uuid>, now_ms: i64 },
    /// The volume group cut it.
    Cut { id: Uuid, index: u64, size_bytes: u64, used_bytes: u64, created_at_ms: i64 },
    /// The user's delete: frees the name; the pin goes later.
    Delete { id: Uuid },
    /// The volume group released it: drop the record (and a retained
    /// volume with no snapshots left).
    Forget { id: Uuid },
    /// Takes a group name and its member snapshots' names (idempotent for
    /// the same volumes).
    CreateGroup { id: Uuid, name: String, volumes: Vec<Uuid>, members: Vec<Uuid>, now_ms: i64 },
    /// Every member was cut.
    GroupCut { id: Uuid },
    /// Deletes the group and its members.
    DeleteGroup { id: Uuid },
}

fn err(e: CatalogError) -> CatalogResponse {
    CatalogResponse::Error(e)
}

impl CatalogState {
    pub fn snapshot_by_id_or_name(&self, key: &str) -> Option<&SnapshotRecord> {
        let by_id = Uuid::parse_str(key).ok().and_then(|id| self.snapshots.get(&id));
        by_id.or_else(|| self.snapshot_names.get(key).and_then(|id| self.snapshots.get(id))).filter(|s| !s.deleting)
    }

    pub fn group_snapshot_by_id_or_name(&self, key: &str) -> Option<&GroupSnapshotRecord> {
        let by_id = Uuid::parse_str(key).ok().and_then(|id| self.group_snapshots.get(&id));
        by_id
            .or_else(|| self.group_snapshot_names.get(key).and_then(|id| self.group_snapshots.get(id)))
            .filter(|g| !g.deleting)
    }

    /// Volumes still copying from snapshot `id`.
    pub fn hydrating_from(&self, id: Uuid) -> Vec<Uuid> {
        self.volumes
            .values()
            .filter(|v| !v.hydrated && v.source.as_ref().is_some_and(|s| s.snapshot == id))
            .map(|v| v.id)
            .collect()
    }

    pub fn apply_snapshot(&mut self, cmd: SnapshotCommand) -> CatalogResponse {
        use CatalogResponse as R;
        match cmd {
            SnapshotCommand::Create { id, name, source, group, for_clone, now_ms } => {
                if let Some(existing) = self.snapshot_names.get(&name).and_then(|i| self.snapshots.get(i)) {
                    if existing.source_volume == source {
                        return R::Snapshot(Box::new(existing.clone()));
                    }
                    return err(CatalogError::AlreadyExists(format!(
                        "snapshot {name} already exists for another volume ({})",
                        existing.source_volume
                    )));
                }
                if let Err(e) = self.check_snapshot_source(source) {
                    return err(e);
                }
                if self.snapshots.contains_key(&id) {
                    return err(CatalogError::AlreadyExists(format!("snapshot id {id} already exists")));
                }
                let rec = SnapshotRecord {
                    id,
                    name: name.clone(),
                    source_volume: source,
                    created_at_ms: now_ms,
                    ready: false,
                    index: 0,
                    size_bytes: 0,
                    used_bytes: 0,
                    group,
                    for_clone,
                    deleting: false,
                };
                self.snapshot_names.insert(name, id);
                self.snapshots.insert(id, rec.clone());
                R::Snapshot(Box::new(rec))
            }
            SnapshotCommand::Cut { id, index, size_bytes, used_bytes, created_at_ms } => {
                let Some(s) = self.snapshots.get_mut(&id) else {
                    return err(CatalogError::NotFound(format!("snapshot {id} not found")));
                };
                if !s.ready {
                    s.ready = true;
                    s.index = index;
                    s.size_bytes = size_bytes;
                    s.used_bytes = used_bytes;
                    s.created_at_ms = created_at_ms;
                }
                R::Snapshot(Box::new(s.clone()))
            }
            SnapshotCommand::Delete { id } => {
                let Some(s) = self.snapshots.get(&id) else { return R::Existed(false) };
                if s.deleting {
                    return R::Existed(false);
                }
                if let Some(g) = s.group.and_then(|g| self.group_snapshots.get(&g)).filter(|g| !g.deleting) {
                    return err(CatalogError::FailedPrecondition(format!(
                        "snapshot {} belongs to group snapshot {} ({}); delete the group snapshot",
                        s.name, g.name, g.id
                    )));
                }
                self.mark_deleting(id);
                R::Existed(true)
            }
            SnapshotCommand::Forget { id } => {
                let Some(s) = self.snapshots.remove(&id) else { return R::Existed(false) };
                if self.snapshot_names.get(&s.name) == Some(&id) {
                    self.snapshot_names.remove(&s.name);
                }
                if let Some(gid) = s.group {
                    let empty = self.group_snapshots.get_mut(&gid).map(|g| {
                        g.members.retain(|m| *m != id);
                        g.members.is_empty()
                    });
                    if empty == Some(true) {
                        if let Some(g) = self.group_snapshots.remove(&gid) {
                            if self.group_snapshot_names.get(&g.name) == Some(&gid) {
                                self.group_snapshot_names.remove(&g.name);
                            }
                        }
                    }
                }
                let still_used = self.snapshots.values().any(|o| o.source_volume == s.source_volume);
                if !still_used && self.volumes.get(&s.source_volume).is_some_and(|v| v.retained) {
                    self.volumes.remove(&s.source_volume);
                }
                R::Existed(true)
            }
            SnapshotCommand::CreateGroup { id, name, volumes, members, now_ms } => {
                if let Some(existing) = self.group_snapshot_names.get(&name).and_then(|g| self.group_snapshots.get(g)) {
                    let mut a = existing.volumes.clone();
                    let mut b = volumes.clone();
                    a.sort();
                    b.sort();
                    if a == b {
                        return R::GroupSnapshot(Box::new(existing.clone()));
                    }
                    return err(CatalogError::AlreadyExists(format!(
                        "group snapshot {name} already exists for another set of volumes"
                    )));
                }
                if volumes.is_empty() || volumes.len() != members.len() {
                    return err(CatalogError::InvalidArgument("a group snapshot needs one member per volume".into()));
                }
                for v in &volumes {
                    if let Err(e) = self.check_snapshot_source(*v) {
                        return err(e);
                    }
                }
                if self.group_snapshots.contains_key(&id) || members.iter().any(|m| self.snapshots.contains_key(m)) {
                    return err(CatalogError::AlreadyExists(format!("group snapshot id {id} already exists")));
                }
                for (v, m) in volumes.iter().zip(&members) {
                    let vname = self.volumes.get(v).map(|r| r.name.clone()).unwrap_or_default();
                    // Member names contain '/', which user names cannot:
                    // they never clash with a user's snapshot.
                    let mname = format!("{name}/{vname}");
                    self.snapshot_names.insert(mname.clone(), *m);
                    self.snapshots.insert(
                        *m,
                        SnapshotRecord {
                            id: *m,
                            name: mname,
                            source_volume: *v,
                            created_at_ms: now_ms,
                            ready: false,
                            index: 0,
                            size_bytes: 0,
                            used_bytes: 0,
                            group: Some(id),
                            for_clone: None,
                            deleting: false,
                        },
                    );
                }
                let rec = GroupSnapshotRecord {
                    id,
                    name: name.clone(),
                    created_at_ms: now_ms,
                    members,
                    volumes,
                    ready: false,
                    deleting: false,
                };
                self.group_snapshot_names.insert(name, id);
                self.group_snapshots.insert(id, rec.clone());
                R::GroupSnapshot(Box::new(rec))
            }
            SnapshotCommand::GroupCut { id } => {
                let Some(g) = self.group_snapshots.get(&id) else {
                    return err(CatalogError::NotFound(format!("group snapshot {id} not found")));
                };
                if !g.members.iter().all(|m| self.snapshots.get(m).is_some_and(|s| s.ready && !s.deleting)) {
                    return err(CatalogError::FailedPrecondition(format!(
                        "group snapshot {} has members that were not cut",
                        g.name
                    )));
                }
                let Some(g) = self.group_snapshots.get_mut(&id) else { return R::Existed(false) };
                g.ready = true;
                R::GroupSnapshot(Box::new(g.clone()))
            }
            SnapshotCommand::DeleteGroup { id } => {
                let Some(g) = self.group_snapshots.get_mut(&id) else { return R::Existed(false) };
                if g.deleting {
                    return R::Existed(false);
                }
                g.deleting = true;
                let (name, members) = (g.name.clone(), g.members.clone());
                if self.group_snapshot_names.get(&name) == Some(&id) {
                    self.group_snapshot_names.remove(&name);
                }
                for m in members {
                    self.mark_deleting(m);
                }
                R::Existed(true)
            }
        }
    }

    fn mark_deleting(&mut self, id: Uuid) {
        let Some(s) = self.snapshots.get_mut(&id) else { return };
        s.deleting = true;
        let name = s.name.clone();
        if self.snapshot_names.get(&name) == Some(&id) {
            self.snapshot_names.remove(&name);
        }
    }

    fn check_snapshot_source(&self, source: Uuid) -> Result<(), CatalogError> {
        let Some(v) = self.volumes.get(&source).filter(|v| !v.retained) else {
            return Err(CatalogError::NotFound(format!("volume {source} not found")));
        };
        if !v.hydrated {
            return Err(CatalogError::FailedPrecondition(format!(
                "volume {} is still being restored from a snapshot; snapshot it once it is ready",
                v.name
            )));
        }
        Ok(())
    }

    /// Checks a restore/clone source for a new volume of `size_bytes`.
    pub fn check_volume_source(
        &self,
        source: &VolumeSource,
        size_bytes: u64,
        kind: super::state::VolumeKind,
    ) -> Result<(), CatalogError> {
        let snap = self
            .snapshots
            .get(&source.snapshot)
            .filter(|s| !s.deleting)
            .ok_or_else(|| CatalogError::NotFound(format!("snapshot {} not found", source.snapshot)))?;
        if !snap.ready {
            return Err(CatalogError::Unavailable(format!("snapshot {} is not cut yet; retry", snap.name)));
        }
        if snap.source_volume != source.volume || snap.index != source.index {
            return Err(CatalogError::InvalidArgument(format!("snapshot {} does not match its source", snap.name)));
        }
        // The copy is the source's blocks as they are: a file tree cannot
        // become a block device, nor the reverse.
        if let Some(src) = self.volumes.get(&snap.source_volume).filter(|v| v.kind != kind) {
            let name = |k| if k == super::state::VolumeKind::File { "file" } else { "block" };
            return Err(CatalogError::InvalidArgument(format!(
                "snapshot {} is of a {} volume; the new volume must be kind={} too, not kind={}",
                snap.name,
                name(src.kind),
                name(src.kind),
                name(kind)
            )));
        }
        if size_bytes < snap.size_bytes {
            return Err(CatalogError::OutOfRange(format!(
                "the new volume ({size_bytes} bytes) is smaller than its source ({} bytes); ask for at least that",
                snap.size_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::{CatalogCommand, VolumeKind, VolumeSpec};
    use super::*;

    fn state_with_volume() -> (CatalogState, Uuid) {
        let mut s = CatalogState::default();
        let nodes = (1..=3)
            .map(|id| super::super::state::NodeRecord {
                id,
                name: format!("n{id}"),
                api_addr: String::new(),
                nbd_addr: String::new(),
                labels: Default::default(),
                capacity_bytes: 1 << 40,
                max_volumes: 0,
                removed: false,
                down: false,
                joined_at_ms: 0,
            })
            .collect();
        s.apply(CatalogCommand::Bootstrap { cluster_id: Uuid::new_v4(), nodes });
        let id = Uuid::new_v4();
        let spec = VolumeSpec {
            name: "vol".into(),
            size_bytes: 1 << 30,
            kind: VolumeKind::Block,
            replica_count: 3,
            parameters: Default::default(),
            constraints: Default::default(),
            source: None,
        };
        s.apply(CatalogCommand::CreateVolume { id, spec, placement: vec![1, 2, 3], now_ms: 0 });
        (s, id)
    }

    fn create(s: &mut CatalogState, name: &str, source: Uuid) -> CatalogResponse {
        s.apply(CatalogCommand::Snapshot(SnapshotCommand::Create {
            id: Uuid::new_v4(),
            name: name.into(),
            source,
            group: None,
            for_clone: None,
            now_ms: 1,
        }))
    }

    #[test]
    fn names_are_idempotent_per_source() {
        let (mut s, vol) = state_with_volume();
        let CatalogResponse::Snapshot(a) = create(&mut s, "s1", vol) else { panic!() };
        let CatalogResponse::Snapshot(b) = create(&mut s, "s1", vol) else { panic!() };
        assert_eq!(a.id, b.id);
        let r = create(&mut s, "s1", Uuid::new_v4());
        assert!(matches!(r, CatalogResponse::Error(CatalogError::AlreadyExists(_))), "{r:?}");
        let r = create(&mut s, "s2", Uuid::new_v4());
        assert!(matches!(r, CatalogResponse::Error(CatalogError::NotFound(_))), "{r:?}");
    }

    #[test]
    fn deleting_the_source_volume_retains_it_until_its_last_snapshot_goes() {
        let (mut s, vol) = state_with_volume();
        let CatalogResponse::Snapshot(a) = create(&mut s, "s1", vol) else { panic!() };
        assert_eq!(s.apply(CatalogCommand::DeleteVolume { id: vol }), CatalogResponse::Existed(true));
        assert!(s.volumes[&vol].retained, "kept for its snapshot");
        assert!(s.volume_by_id_or_name("vol").is_none(), "hidden, name free");
        // A new volume may take the name.
        assert!(!s.names.contains_key("vol"));
        assert_eq!(
            s.apply(CatalogCommand::Snapshot(SnapshotCommand::Delete { id: a.id })),
            CatalogResponse::Existed(true)
        );
        assert!(s.volumes.contains_key(&vol), "still pinned until the group released it");
        assert!(s.snapshot_by_id_or_name("s1").is_none());
        s.apply(CatalogCommand::Snapshot(SnapshotCommand::Forget { id: a.id }));
        assert!(!s.volumes.contains_key(&vol), "dropped with its last snapshot");
    }

    #[test]
    fn restores_need_a_cut_snapshot_and_enough_size() {
        let (mut s, vol) = state_with_volume();
        let CatalogResponse::Snapshot(a) = create(&mut s, "s1", vol) else { panic!() };
        let src = VolumeSource { snapshot: a.id, volume: vol, index: 0, size_bytes: 0, used_bytes: 0, implicit: false };
        assert!(matches!(s.check_volume_source(&src, 1 << 30, VolumeKind::Block), Err(CatalogError::Unavailable(_))));
        s.apply(CatalogCommand::Snapshot(SnapshotCommand::Cut {
            id: a.id,
            index: 7,
            size_bytes: 1 << 30,
            used_bytes: 4096,
            created_at_ms: 2,
        }));
        let src = VolumeSource { index: 7, ..src };
        assert!(matches!(s.check_volume_source(&src, 1 << 29, VolumeKind::Block), Err(CatalogError::OutOfRange(_))));
        assert!(s.check_volume_source(&src, 2 << 30, VolumeKind::Block).is_ok());
        assert!(matches!(
            s.check_volume_source(&src, 2 << 30, VolumeKind::File),
            Err(CatalogError::InvalidArgument(_))
        ));
    }

    #[test]
    fn group_members_are_deleted_with_their_group_only() {
        let (mut s, vol) = state_with_volume();
        let (gid, m) = (Uuid::new_v4(), Uuid::new_v4());
        let r = s.apply(CatalogCommand::Snapshot(SnapshotCommand::CreateGroup {
            id: gid,
            name: "g".into(),
            volumes: vec![vol],
            members: vec![m],
            now_ms: 1,
        }));
        assert!(matches!(r, CatalogResponse::GroupSnapshot(_)), "{r:?}");
        let r = s.apply(CatalogCommand::Snapshot(SnapshotCommand::Delete { id: m }));
        assert!(matches!(r, CatalogResponse::Error(CatalogError::FailedPrecondition(_))), "{r:?}");
        assert_eq!(
            s.apply(CatalogCommand::Snapshot(SnapshotCommand::DeleteGroup { id: gid })),
            CatalogResponse::Existed(true)
        );
        assert!(s.snapshots[&m].deleting);
        s.apply(CatalogCommand::Snapshot(SnapshotCommand::Forget { id: m }));
        assert!(s.group_snapshots.is_empty() && s.snapshots.is_empty());
    }
}
