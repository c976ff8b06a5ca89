//! Snapshots and group snapshots as JSON (for scripts) and tables (for
//! people). A volume's snapshots in the order they were cut (log index)
//! are its chain: each one reads the volume as it was at that point.

use serde::Serialize;
use volumed_proto::volumed::v1 as pb;

use crate::table::{key_values, Table};
use crate::units::{human_size, utc_time};

use super::{dash, yes_no};

#[derive(Debug, Serialize)]
pub struct SnapshotView {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    /// Empty once the source volume was deleted.
    pub source_volume_name: String,
    pub created_at_unix_ms: i64,
    pub ready_to_use: bool,
    /// The smallest volume it restores into (the source's size at the cut).
    pub restore_size_bytes: u64,
    /// Data the snapshot reads.
    pub total_bytes: u64,
    /// Data only this snapshot holds: what deleting it frees.
    pub exclusive_bytes: u64,
    pub log_index: u64,
    pub group_snapshot_id: String,
    /// Volumes still copying from it.
    pub restoring_volumes: Vec<String>,
}

pub fn snapshot_view(s: &pb::Snapshot) -> SnapshotView {
    SnapshotView {
        id: s.id.clone(),
        name: s.name.clone(),
        source_volume_id: s.source_volume_id.clone(),
        source_volume_name: s.source_volume_name.clone(),
        created_at_unix_ms: s.created_at_unix_ms,
        ready_to_use: s.ready_to_use,
        restore_size_bytes: s.restore_size_bytes,
        total_bytes: s.total_bytes,
        exclusive_bytes: s.exclusive_bytes,
        log_index: s.log_index,
        group_snapshot_id: s.group_snapshot_id.clone(),
        restoring_volumes: s.restoring_volumes.clone(),
    }
}

#[derive(Debug, Serialize)]
pub struct GroupSnapshotView {
    pub id: String,
    pub name: String,
    pub created_at_unix_ms: i64,
    pub ready_to_use: bool,
    pub snapshots: Vec<SnapshotView>,
}

pub fn group_view(g: &pb::GroupSnapshot) -> GroupSnapshotView {
    GroupSnapshotView {
        id: g.id.clone(),
        name: g.name.clone(),
        created_at_unix_ms: g.created_at_unix_ms,
        ready_to_use: g.ready_to_use,
        snapshots: g.snapshots.iter().map(snapshot_view).collect(),
    }
}

/// Source volume name, or its id (marked deleted) once it is gone.
fn source(s: &pb::Snapshot) -> String {
    if s.source_volume_name.is_empty() {
        format!("{} (deleted)", s.source_volume_id)
    } else {
        s.source_volume_name.clone()
    }
}

fn ready(s: &pb::Snapshot) -> String {
    if s.ready_to_use {
        "yes".into()
    } else {
        "no (being cut)".into()
    }
}

/// Sorted for people: by source volume, then in the order they were cut.
pub fn sort_snapshots(snaps: &mut [pb::Snapshot]) {
    snaps.sort_by(|a, b| source(a).cmp(&source(b)).then(a.log_index.cmp(&b.log_index)).then(a.name.cmp(&b.name)));
}

pub fn snapshots_text(snaps: &[pb::Snapshot]) -> String {
    if snaps.is_empty() {
        return "no snapshots (take one: volctl snapshot create NAME --volume VOLUME)\n".into();
    }
    let mut t =
        Table::new(&["NAME", "ID", "VOLUME", "READY", "SIZE", "DATA", "EXCLUSIVE", "LOG-INDEX", "CREATED", "GROUP"]);
    for s in snaps {
        t.row(vec![
            s.name.clone(),
            s.id.clone(),
            source(s),
            yes_no(s.ready_to_use),
            human_size(s.restore_size_bytes),
            human_size(s.total_bytes),
            human_size(s.exclusive_bytes),
            s.log_index.to_string(),
            utc_time(s.created_at_unix_ms),
            dash(&s.group_snapshot_id),
        ]);
    }
    t.render()
}

pub fn snapshot_text(s: &pb::Snapshot) -> String {
    let restoring = if s.restoring_volumes.is_empty() {
        "-".to_string()
    } else {
        format!("{} (its space stays held until they are filled)", s.restoring_volumes.join(", "))
    };
    key_values(&[
        ("name", s.name.clone()),
        ("id", s.id.clone()),
        ("volume", format!("{} ({})", source(s), s.source_volume_id)),
        ("ready", ready(s)),
        ("created", utc_time(s.created_at_unix_ms)),
        ("log index", s.log_index.to_string()),
        ("restore size", format!("{} ({} bytes)", human_size(s.restore_size_bytes), s.restore_size_bytes)),
        ("data", human_size(s.total_bytes)),
        ("exclusive", format!("{} (freed by deleting it)", human_size(s.exclusive_bytes))),
        ("group", dash(&s.group_snapshot_id)),
        ("restoring into", restoring),
    ])
}

/// The chain under `volctl volume get`: oldest first.
pub fn chain_text(snaps: &[pb::Snapshot]) -> String {
    let mut sorted = snaps.to_vec();
    sorted.sort_by_key(|s| s.log_index);
    let mut t = Table::new(&["SNAPSHOT", "ID", "LOG-INDEX", "CREATED", "DATA", "EXCLUSIVE", "READY", "GROUP"]);
    for s in &sorted {
        t.row(vec![
            s.name.clone(),
            s.id.clone(),
            s.log_index.to_string(),
            utc_time(s.created_at_unix_ms),
            human_size(s.total_bytes),
            human_size(s.exclusive_bytes),
            yes_no(s.ready_to_use),
            dash(&s.group_snapshot_id),
        ]);
    }
    t.render()
}

pub fn group_text(g: &pb::GroupSnapshot) -> String {
    let mut out = key_values(&[
        ("name", g.name.clone()),
        ("id", g.id.clone()),
        ("ready", yes_no(g.ready_to_use)),
        ("created", utc_time(g.created_at_unix_ms)),
        ("volumes", g.snapshots.len().to_string()),
    ]);
    if !g.snapshots.is_empty() {
        let mut t = Table::new(&["SNAPSHOT", "ID", "VOLUME", "LOG-INDEX", "DATA", "READY"]);
        for s in &g.snapshots {
            t.row(vec![
                s.name.clone(),
                s.id.clone(),
                source(s),
                s.log_index.to_string(),
                human_size(s.total_bytes),
                yes_no(s.ready_to_use),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, volume: &str, index: u64) -> pb::Snapshot {
        pb::Snapshot {
            id: format!("id-{name}"),
            name: name.into(),
            source_volume_id: format!("vid-{volume}"),
            source_volume_name: volume.into(),
            created_at_unix_ms: 951_782_400_000,
            ready_to_use: true,
            restore_size_bytes: 1 << 30,
            total_bytes: 3 << 20,
            exclusive_bytes: 1 << 20,
            log_index: index,
            group_snapshot_id: String::new(),
            restoring_volumes: vec![],
        }
    }

    #[test]
    fn json_has_names_sizes_and_group() {
        let mut s = snap("s1", "db", 42);
        s.group_snapshot_id = "g1".into();
        let j = serde_json::to_value(snapshot_view(&s)).unwrap();
        assert_eq!(j["name"], "s1");
        assert_eq!(j["source_volume_name"], "db");
        assert_eq!(j["restore_size_bytes"], 1u64 << 30);
        assert_eq!(j["exclusive_bytes"], 1u64 << 20);
        assert_eq!(j["log_index"], 42);
        assert_eq!(j["group_snapshot_id"], "g1");
        assert_eq!(j["restoring_volumes"], serde_json::json!([]));
        let g = pb::GroupSnapshot {
            id: "g1".into(),
            name: "nightly".into(),
            snapshots: vec![s],
            created_at_unix_ms: 1,
            ready_to_use: true,
        };
        let j = serde_json::to_value(group_view(&g)).unwrap();
        assert_eq!(j["snapshots"][0]["name"], "s1");
        assert_eq!(j["ready_to_use"], true);
    }

    #[test]
    fn tables_sort_by_volume_then_cut_and_mark_deleted_sources() {
        let mut gone = snap("old", "", 3);
        gone.source_volume_id = "vid-x".into();
        let mut list = vec![snap("b2", "b", 9), snap("b1", "b", 5), snap("a1", "a", 7), gone];
        sort_snapshots(&mut list);
        let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a1", "b1", "b2", "old"]);
        let text = snapshots_text(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME  ID      VOLUME           READY"), "{text}");
        assert!(lines[1].starts_with("a1    id-a1   a                yes"), "{text}");
        assert!(lines[1].contains("1 GiB  3 MiB  1 MiB      7          2000-02-29 00:00:00 UTC  -"), "{text}");
        assert!(lines[4].contains("vid-x (deleted)"), "{text}");
        assert!(snapshots_text(&[]).contains("volctl snapshot create"));
    }

    #[test]
    fn one_snapshot_and_a_chain() {
        let mut s = snap("s1", "db", 42);
        s.restoring_volumes = vec!["r1".into()];
        let t = snapshot_text(&s);
        assert!(t.contains("volume:          db (vid-db)\n"), "{t}");
        assert!(t.contains("restore size:    1 GiB (1073741824 bytes)\n"), "{t}");
        assert!(t.contains("restoring into:  r1 (its space"), "{t}");
        let chain = chain_text(&[snap("later", "db", 50), snap("first", "db", 10)]);
        let lines: Vec<&str> = chain.lines().collect();
        assert!(lines[1].starts_with("first"), "{chain}");
        assert!(lines[2].starts_with("later"), "{chain}");
    }
}
