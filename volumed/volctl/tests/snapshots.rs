//! `volctl snapshot ...` and `volctl volume create --from-*` against a real
//! 3-node cluster (`volctl dev up --no-csi`): data checked byte for byte
//! through node-local attachments, JSON and table output, the snapshot
//! chain and restore progress in `volume get`, group snapshots, deletion
//! rules, and error messages that say what to do.
//!
//! Needs the volumed binary ($VOLUMED_BIN or `volumed` next to volctl) and
//! root (attachments are loop devices).

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Cluster {
    dev: DevDir,
    env: Vec<(&'static str, String)>,
}

impl Cluster {
    fn volctl(&self, args: &[&str]) -> Run {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run(args, &env)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        self.volctl(&a).ok().json()
    }

    fn attach(&self, volume: &str) -> String {
        let a = self.json(&["volume", "attach", volume]);
        a["device"].as_str().unwrap().to_string()
    }

    /// Polls `what` until `pred` holds.
    fn wait(&self, args: &[&str], what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.json(args);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{args:?} never became {what}: {v:#}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

const OFFSETS: [u64; 3] = [0, 5 << 20, 15 << 20];

fn pattern(tag: u8, offset: u64) -> Vec<u8> {
    (0..(1usize << 20)).map(|i| (i as u64 ^ (offset >> 12)).wrapping_mul(31).wrapping_add(tag as u64) as u8).collect()
}

fn write_pattern(device: &str, tag: u8) {
    let mut f = std::fs::OpenOptions::new().write(true).open(device).unwrap();
    for off in OFFSETS {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&pattern(tag, off)).unwrap();
    }
    f.sync_all().unwrap();
}

#[track_caller]
fn assert_pattern(device: &str, tag: u8, what: &str) {
    let mut f = std::fs::File::open(device).unwrap();
    for off in OFFSETS {
        let mut back = vec![0u8; 1 << 20];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern(tag, off), "{what}: bytes at {off} are not pattern {tag}");
    }
}

fn start() -> Cluster {
    let dev = DevDir::new();
    let bin = volumed_bin();
    let ip = first_ip();
    let st = dev.path_str();
    run_with(
        &[
            "dev",
            "up",
            "--nodes",
            "3",
            "--no-csi",
            "--state-dir",
            &st,
            "--volumed-bin",
            bin.to_str().unwrap(),
            "--first-ip",
            &ip,
            "--timeout",
            "180s",
        ],
        &[],
        Duration::from_secs(240),
    )
    .ok();
    let env = dev.env();
    Cluster { dev, env }
}

#[test]
fn snapshot_restore_clone_group_and_deletion() {
    let c = start();
    assert!(c.dev.path().join("cluster.json").exists());

    // ---- src: pattern 1, snapshot s1, pattern 2.
    c.json(&["volume", "create", "src", "--size", "20Mi"]);
    let src_dev = c.attach("src");
    write_pattern(&src_dev, 1);
    let s1 = c.json(&["snapshot", "create", "s1", "--volume", "src"]);
    assert_eq!(s1["name"], "s1", "{s1:#}");
    assert_eq!(s1["ready_to_use"], true, "{s1:#}");
    assert_eq!(s1["source_volume_name"], "src");
    assert_eq!(s1["restore_size_bytes"], 20u64 << 20);
    assert!(s1["total_bytes"].as_u64().unwrap() >= 3 << 20, "{s1:#}");
    assert!(s1["log_index"].as_u64().unwrap() > 0);
    let s1_id = s1["id"].as_str().unwrap().to_string();
    assert_eq!(c.json(&["snapshot", "create", "s1", "--volume", "src"])["id"], s1_id.as_str(), "idempotent");
    write_pattern(&src_dev, 2);

    // ---- restore (waits for the copy): pattern 1.
    let r1 = c.json(&["volume", "create", "r1", "--from-snapshot", "s1"]);
    assert_eq!(r1["size_bytes"], 20u64 << 20, "the snapshot's size: {r1:#}");
    assert_eq!(r1["source_snapshot_id"], s1_id.as_str());
    assert_ne!(r1["state"], "creating", "{r1:#}");
    assert_eq!(r1["restore_bytes_done"], r1["restore_bytes_total"], "{r1:#}");
    let r1_dev = c.attach("r1");
    assert_pattern(&r1_dev, 1, "restore");
    assert_pattern(&src_dev, 2, "source");

    // ---- clone without waiting: progress in `volume get`, then pattern 2.
    let c1 = c.json(&["volume", "create", "c1", "--from-volume", "src", "--no-wait", "--size", "24Mi"]);
    assert_eq!(c1["size_bytes"], 24u64 << 20);
    assert!(c1["restore_bytes_total"].as_u64().unwrap() >= 3 << 20, "{c1:#}");
    let c1 = c.wait(&["volume", "get", "c1"], "filled", |v| v["state"] != "creating");
    assert_eq!(c1["restore_bytes_done"], c1["restore_bytes_total"], "{c1:#}");
    assert_eq!(c1["source_volume_id"], r1["source_volume_id"], "both came from src");
    let text = c.volctl(&["volume", "get", "c1"]).ok().stdout;
    assert!(text.contains("restore:") && text.contains("done ("), "{text}");
    assert!(text.contains("source:            snapshot "), "{text}");
    let c1_dev = c.attach("c1");
    assert_pattern(&c1_dev, 2, "clone");

    // ---- the chain: listed, in `volume get`, and in tables.
    let s2 = c.json(&["snapshot", "create", "s2", "--volume", "src"]);
    let chain = c.json(&["volume", "get", "src"]);
    let names: Vec<&str> = chain["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2"], "oldest first: {chain:#}");
    assert_eq!(chain["snapshot_count"], 2);
    let text = c.volctl(&["volume", "get", "src"]).ok().stdout;
    assert!(text.contains("SNAPSHOT") && text.contains("LOG-INDEX"), "{text}");
    assert!(text.contains("snapshots:         2 ("), "{text}");
    let listed = c.json(&["snapshot", "list", "--volume", "src"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");
    let all = c.json(&["snapshot", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all:#}");
    let table = c.volctl(&["snapshot", "list"]).ok().stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("s1 "), "{table}");
    let one = c.volctl(&["snapshot", "get", "s1"]).ok().stdout;
    assert!(one.contains("restore size:") && one.contains(&s1_id), "{one}");
    let list = c.volctl(&["volume", "list"]).ok().stdout;
    assert!(list.lines().next().unwrap().ends_with("SNAPSHOTS"), "{list}");

    // ---- errors that say what to do.
    c.volctl(&["snapshot", "create", "s1", "--volume", "r1"])
        .fails(1, &["snapshot s1 already exists for another volume", "volctl snapshot get s1"]);
    c.volctl(&["snapshot", "create", "s9", "--volume", "nope"]).fails(1, &["volume nope not found"]);
    c.volctl(&["snapshot", "get", "nope"]).fails(1, &["snapshot nope not found (see `volctl snapshot list`)"]);
    c.volctl(&["snapshot", "delete", "nope"]).fails(1, &["snapshot nope not found"]);
    c.volctl(&["snapshot", "list", "--volume", "nope"]).fails(1, &["volume nope not found"]);
    c.volctl(&["volume", "create", "x", "--from-snapshot", "nope"]).fails(1, &["snapshot nope not found"]);
    c.volctl(&["volume", "create", "x", "--from-volume", "nope"]).fails(1, &["volume nope not found"]);
    c.volctl(&["volume", "create", "x", "--from-snapshot", "s1", "--size", "4Mi"])
        .fails(1, &["too small", "leave --size out"]);
    c.volctl(&["volume", "create", "r1", "--from-snapshot", "s2"])
        .fails(1, &["volume r1 already exists", "volctl volume get r1"]);
    c.volctl(&["snapshot", "create", "bad/name", "--volume", "src"]).fails(1, &["invalid request", "'/'"]);
    let names: Vec<String> = c
        .json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "failed creates left volumes behind: {names:?}");

    // ---- a group snapshot of three volumes.
    let g = c.json(&["snapshot", "group", "create", "g1", "--volume", "src", "--volume", "r1", "--volume", "c1"]);
    assert_eq!(g["ready_to_use"], true, "{g:#}");
    let members = g["snapshots"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let gid = g["id"].as_str().unwrap();
    assert!(members.iter().all(|m| m["group_snapshot_id"] == gid), "{g:#}");
    assert_eq!(c.json(&["snapshot", "group", "get", "g1"])["id"], gid);
    let member = members[0]["name"].as_str().unwrap().to_string();
    c.volctl(&["snapshot", "delete", &member]).fails(1, &["delete the group snapshot"]);
    c.volctl(&["snapshot", "group", "create", "g1", "--volume", "src"])
        .fails(1, &["group snapshot g1 already exists", "volctl snapshot group get g1"]);
    c.volctl(&["snapshot", "group", "create", "g2", "--volume", "src", "--volume", "nope"])
        .fails(1, &["volume nope not found"]);
    let text = c.volctl(&["snapshot", "group", "get", "g1"]).ok().stdout;
    assert!(text.contains("volumes:  3"), "{text}");
    let r = c.volctl(&["snapshot", "group", "delete", "g1"]).ok();
    assert!(r.stdout.contains("member snapshots deleted"), "{}", r.describe());
    c.volctl(&["snapshot", "group", "get", "g1"]).fails(1, &["group snapshot g1 not found"]);
    c.volctl(&["snapshot", "group", "delete", "g1"]).fails(1, &["group snapshot g1 not found"]);

    // ---- deletion rules: a volume with snapshots is kept hidden for them.
    c.volctl(&["snapshot", "delete", "s1"]).ok();
    let src_id = chain["id"].as_str().unwrap().to_string();
    c.volctl(&["volume", "detach", "src"]).ok();
    c.volctl(&["volume", "delete", "src"]).ok();
    c.volctl(&["volume", "get", "src"]).fails(1, &["volume src not found"]);
    let visible: Vec<Value> = c.json(&["volume", "list"]).as_array().unwrap().clone();
    assert!(visible.iter().all(|v| v["id"] != src_id.as_str()));
    let kept = c.json(&["volume", "list", "--all"]);
    let src = kept.as_array().unwrap().iter().find(|v| v["id"] == src_id.as_str()).expect("kept for s2").clone();
    assert_eq!(src["retained"], true, "{src:#}");
    let table = c.volctl(&["volume", "list", "--all"]).ok().stdout;
    assert!(table.contains("deleted, kept for 1 snapshot"), "{table}");
    let s2_listed = c.json(&["snapshot", "list", "--volume", &src_id]);
    assert_eq!(s2_listed[0]["id"], s2["id"], "{s2_listed:#}");
    assert_eq!(s2_listed[0]["source_volume_name"], "", "its volume is gone: {s2_listed:#}");
    let r2 = c.json(&["volume", "create", "r2", "--from-snapshot", "s2"]);
    let r2_dev = c.attach(r2["name"].as_str().unwrap());
    assert_pattern(&r2_dev, 2, "restore of a deleted volume's snapshot");
    c.volctl(&["snapshot", "delete", "s2"]).ok();
    c.wait(&["volume", "list", "--all"], "without src", |l| {
        l.as_array().unwrap().iter().all(|v| v["id"] != src_id.as_str())
    });
    assert_pattern(&r2_dev, 2, "restore after its snapshot and source are gone");
    assert_pattern(&r1_dev, 1, "first restore, unchanged");
    for v in ["r1", "c1", "r2"] {
        c.volctl(&["volume", "detach", v]).ok();
    }
}
