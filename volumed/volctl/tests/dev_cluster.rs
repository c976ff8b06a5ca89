//! volctl against a real 3-node cluster started by `volctl dev up`: the
//! volume life cycle with JSON checks, error codes and messages from the
//! real daemon, node-local attach/detach, idempotent and restarting
//! `dev up`, and a `dev down` that leaves no process, mount, loop device or
//! state directory behind.
//!
//! Needs the volumed binary: $VOLUMED_BIN or `volumed` next to volctl.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Cluster {
    dev: DevDir,
    env: Vec<(&'static str, String)>,
}

impl Cluster {
    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    fn volctl(&self, args: &[&str]) -> Run {
        run(args, &self.env())
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        self.volctl(&a).ok().json()
    }

    /// Polls `volume get` until `pred` holds.
    fn wait_volume(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.json(&["volume", "get", name]);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "volume {name} never became {what}: {v:#}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn start(nodes: &str) -> (Cluster, Value) {
    let dev = DevDir::new();
    let bin = volumed_bin();
    let ip = first_ip();
    let st = dev.path_str();
    let r = run_with(
        &[
            "dev",
            "up",
            "--nodes",
            nodes,
            "--state-dir",
            &st,
            "--volumed-bin",
            bin.to_str().unwrap(),
            "--first-ip",
            &ip,
            "--node-down-grace",
            "30s",
            "--timeout",
            "180s",
            "-o",
            "json",
        ],
        &[],
        Duration::from_secs(240),
    );
    let r = r.ok();
    let out = r.json();
    let env = dev.env();
    (Cluster { dev, env }, out)
}

#[test]
fn three_node_dev_cluster_life_cycle() {
    let (c, up) = start("3");
    let st = c.dev.path_str();

    // ---- dev up wrote cluster.json, and printed the same.
    let file = c.dev.cluster_json();
    assert_eq!(up, file);
    let nodes = file["volumed"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let canonical = c.dev.path().canonicalize().unwrap();
    assert_eq!(file["state_dir"], canonical.to_str().unwrap());
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["node_name"], format!("node-{}", i + 1));
        assert!(n["api"].as_str().unwrap().starts_with("http://127."), "{n}");
        assert!(n["api"].as_str().unwrap().ends_with(":7400"), "{n}");
        assert!(n["nbd"].as_str().unwrap().ends_with(":10809"), "{n}");
        assert!(is_running(n["pid"].as_u64().unwrap()), "{n}");
        let args: Vec<&str> = n["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.contains(&"--join") && args.contains(&"--log-format"), "{args:?}");
        assert!(std::path::Path::new(n["log"].as_str().unwrap()).exists());
        assert!(n["env"]["PATH"].is_string());
        assert!(!n["env"].as_object().unwrap().keys().any(|k| k.to_lowercase().contains("proxy")));
    }
    let pids: Vec<u64> = nodes.iter().map(|n| n["pid"].as_u64().unwrap()).collect();

    // ---- cluster and nodes, the endpoint found through cluster.json.
    let status = c.json(&["cluster", "status"]);
    assert_eq!(status["ready"], true, "{status:#}");
    assert_eq!(status["nodes_up"], 3, "{status:#}");
    assert_ne!(status["catalog_leader_id"], 0);
    // The exact command of the node GC job.
    let list = c.volctl(&["--output", "json", "node", "list"]).ok().json();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-1", "node-2", "node-3"]);
    assert!(list.as_array().unwrap().iter().all(|n| n["state"] == "up"), "{list:#}");
    let table = c.volctl(&["node", "list"]).ok().stdout;
    assert!(table.starts_with("NAME "), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let table = c.volctl(&["cluster", "status"]).ok().stdout;
    assert!(table.contains("ready:") && table.contains("yes"), "{table}");

    // ---- create, get by name and id, list.
    let v = c.json(&["volume", "create", "vol-a", "--size", "64Mi", "--param", "fsType=xfs"]);
    assert_eq!(v["name"], "vol-a");
    assert_eq!(v["size_bytes"], 64u64 << 20);
    assert_eq!(v["kind"], "block");
    assert_eq!(v["parameters"]["fsType"], "xfs");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 3, "{v:#}");
    let id = v["id"].as_str().unwrap().to_string();
    // Right after creation the followers may still report as learners.
    let v = c.wait_volume("vol-a", "healthy with a leader and two followers", |v| {
        v["state"] == "healthy"
            && v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| ["leader", "follower"].contains(&r["role"].as_str().unwrap()))
    });
    let replicas = v["replicas"].as_array().unwrap();
    let roles: Vec<&str> = replicas.iter().map(|r| r["role"].as_str().unwrap()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1, "{v:#}");
    for r in replicas {
        assert_eq!(r["state"], "healthy", "{v:#}");
        assert!(["leader", "follower"].contains(&r["role"].as_str().unwrap()), "{v:#}");
        assert!(r["node_name"].as_str().unwrap().starts_with("node-"), "{v:#}");
        for k in ["node_id", "rebuild_bytes_done", "rebuild_bytes_total", "applied_index"] {
            assert!(r[k].is_u64(), "{k}: {v:#}");
        }
    }
    assert_ne!(v["leader_node_id"], 0);
    for k in ["used_bytes", "crc_repairs"] {
        assert!(v[k].is_u64(), "{k}: {v:#}");
    }
    assert!(v["attachments"].is_array());
    let nbd_uri = v["nbd_uri"].as_str().unwrap().to_string();
    assert!(nbd_uri.starts_with("nbd://127.") && nbd_uri.ends_with(&id), "{nbd_uri}");
    assert_eq!(c.json(&["volume", "get", &id])["name"], "vol-a");
    // The printed NBD URI works with a standard client.
    let info = std::process::Command::new("nbdinfo").args(["--size", &nbd_uri]).env_clear().output().unwrap();
    assert!(info.status.success(), "nbdinfo {nbd_uri}: {}", String::from_utf8_lossy(&info.stderr));
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), (64u64 << 20).to_string());

    let list = c.json(&["volume", "list"]);
    assert!(list.as_array().unwrap().iter().any(|v| v["id"] == id.as_str()), "{list:#}");
    let table = c.volctl(&["volume", "list"]).ok().stdout;
    let row = table.lines().find(|l| l.starts_with("vol-a ")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("64 MiB") && row.contains("3/3") && row.contains("healthy"), "{table}");
    let table = c.volctl(&["volume", "get", "vol-a"]).ok().stdout;
    assert!(table.contains("64 MiB (67108864 bytes)") && table.contains("leader"), "{table}");

    // ---- scrub: every block of every replica checked, nothing to repair.
    let scrub = c.json(&["volume", "scrub", "vol-a"]);
    assert_eq!(scrub["blocks_repaired"], 0, "{scrub:#}");
    assert_eq!(scrub["blocks_unrepairable"], 0, "{scrub:#}");
    assert!(scrub["blocks_checked"].is_u64(), "{scrub:#}");
    let r = c.volctl(&["volume", "scrub", &id]).ok();
    assert!(r.stdout.contains("0 unrepairable"), "{}", r.describe());

    // ---- resize.
    c.volctl(&["volume", "resize", "vol-a", "--size", "128Mi"]).ok();
    assert_eq!(c.json(&["volume", "get", "vol-a"])["size_bytes"], 128u64 << 20);

    // ---- bad input: right exit code, a message that says what to do.
    c.volctl(&["volume", "create", "bad", "--size", "0"]).fails(2, &["greater than 0"]);
    c.volctl(&["volume", "create", "bad", "--size", "lots"]).fails(2, &["not a size"]);
    c.volctl(&["volume", "get", "no-such-volume"])
        .fails(1, &["volume no-such-volume not found (see `volctl volume list`)"]);
    c.volctl(&["volume", "resize", "no-such-volume", "--size", "1Gi"]).fails(1, &["volume no-such-volume not found"]);
    c.volctl(&["volume", "delete", "no-such-volume"]).fails(1, &["volume no-such-volume not found"]);
    c.volctl(&["volume", "create", "nine", "--size", "1Mi", "--replicas", "9"]).fails(1, &["invalid request", "9"]);
    c.volctl(&["volume", "create", "four", "--size", "1Mi", "--replicas", "4"])
        .fails(1, &["not enough nodes or space", "volctl node list"]);
    c.volctl(&["volume", "create", "vol-a", "--size", "1Gi"]).fails(1, &["already exists", "volctl volume get vol-a"]);
    c.volctl(&["node", "remove", "node-9"]).fails(1, &["node node-9 not found (see `volctl node list`)"]);
    let names: Vec<String> =
        c.json(&["volume", "list"]).as_array().unwrap().iter().map(|v| v["name"].to_string()).collect();
    assert_eq!(names, ["\"vol-a\""], "failed creates left volumes behind");

    // ---- node-local attach through node-1's socket (found via cluster.json).
    let a = c.json(&["volume", "attach", "vol-a"]);
    let device = a["device"].as_str().unwrap().to_string();
    assert!(device.starts_with("/dev/"), "{a:#}");
    assert_eq!(a["volume_id"], id.as_str());
    assert!(a["generation"].as_u64().unwrap() > 0, "{a:#}");
    assert!(["fuse-loop", "kernel-nbd"].contains(&a["frontend"].as_str().unwrap()), "{a:#}");
    assert_eq!(c.json(&["volume", "attach", "vol-a"])["device"], device.as_str(), "attach is idempotent");
    let local = c.json(&["volume", "attachments"]);
    assert_eq!(local["attachments"][0]["device"], device.as_str(), "{local:#}");
    let v = c.json(&["volume", "get", "vol-a"]);
    assert_eq!(v["attachments"][0]["node_name"], "node-1", "{v:#}");
    let r = c.volctl(&["volume", "detach", "vol-a"]).ok();
    assert!(r.stdout.contains("detached"), "{}", r.describe());
    assert_eq!(c.json(&["volume", "attachments"])["attachments"], serde_json::json!([]));

    // ---- delete.
    c.volctl(&["volume", "delete", "vol-a"]).ok();
    c.volctl(&["volume", "get", "vol-a"]).fails(1, &["volume vol-a not found"]);

    // ---- dev up again: idempotent while everything runs.
    let r = c.volctl(&["dev", "up"]).ok();
    assert!(r.stdout.contains("already running"), "{}", r.describe());
    let again: Vec<u64> = c.dev.pids();
    assert_eq!(again, pids);

    // ---- a dead node is restarted from its recorded argv.
    let victim = pids[2];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_running(victim) {
        assert!(Instant::now() < deadline, "node-3 did not die");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = run_with(&["dev", "up", "--timeout", "180s"], &c.env(), Duration::from_secs(240)).ok();
    assert!(r.stdout.contains("restarted node-3"), "{}", r.describe());
    let after = c.dev.pids();
    assert_eq!(after[..2], pids[..2]);
    assert_ne!(after[2], victim);
    assert!(is_running(after[2]));
    let restarted: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", after[2]))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let recorded: Vec<String> =
        file["volumed"][2]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    assert_eq!(restarted, recorded);
    assert_eq!(c.json(&["cluster", "status"])["ready"], true);

    // ---- leave a volume attached: dev down must clean its device up too.
    c.json(&["volume", "create", "vol-b", "--size", "16Mi"]);
    let attached = c.json(&["volume", "attach", "vol-b"]);
    let device = attached["device"].as_str().unwrap().to_string();

    let r = run_with(&["dev", "down", "--state-dir", &st], &[], Duration::from_secs(120)).ok();
    assert!(r.stdout.contains(&format!("removed {}", canonical.display())), "{}", r.describe());
    for pid in &after {
        assert!(!is_running(*pid), "pid {pid} survived dev down");
    }
    assert!(mounts_under(&canonical).is_empty(), "{:?}", mounts_under(&canonical));
    assert!(loops_under(&canonical).is_empty(), "{device}: {:?}", loops_under(&canonical));
    assert!(!c.dev.path().exists());
}

/// Removes `victim` (a name or an id) from a 4-node cluster holding one
/// 3-replica volume, and waits for the replica to be re-created.
fn remove_and_re_replicate(c: &mut Cluster, victim: &str, victim_name: &str, on: &[String]) {
    let moving = u64::from(on.iter().any(|n| n == victim_name));
    let out = c.json(&["node", "remove", victim]);
    assert_eq!(out["name"], victim_name);
    assert_eq!(out["replicas_moving"], moving, "{out:#}");
    // From now on ask a member: the removed process still runs (dev down
    // stops it) but is no part of the cluster any more.
    let survivor = c.dev.cluster_json()["volumed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_name"] != victim_name)
        .map(|n| n["api"].as_str().unwrap().to_string())
        .unwrap();
    c.env.push(("VOLUMED_ENDPOINT", survivor));
    let nodes = c.json(&["node", "list"]);
    let state = nodes.as_array().unwrap().iter().find(|n| n["name"] == victim_name).map(|n| n["state"].clone());
    assert!(state.is_none() || state == Some(Value::from("removed")), "{nodes:#}");
    let v = c.wait_volume("r1", "re-replicated on the fourth node", |v| {
        let replicas = v["replicas"].as_array().unwrap();
        v["state"] == "healthy"
            && replicas.iter().all(|r| r["node_name"] != victim_name)
            && replicas.iter().filter(|r| r["state"] == "healthy").count() == 3
    });
    let fourth =
        v["replicas"].as_array().unwrap().iter().any(|r| !on.contains(&r["node_name"].as_str().unwrap().to_string()));
    assert_eq!(fourth, moving == 1, "{v:#}");
}

fn four_nodes_one_volume() -> (Cluster, Value) {
    let (c, _) = start("4");
    c.json(&["volume", "create", "r1", "--size", "8Mi", "--replicas", "3"]);
    let v = c.wait_volume("r1", "healthy", |v| {
        v["state"] == "healthy"
            && v["replicas"].as_array().unwrap().iter().all(|r| r["role"] == "leader" || r["role"] == "follower")
    });
    (c, v)
}

fn replica_nodes(v: &Value) -> Vec<String> {
    v["replicas"].as_array().unwrap().iter().map(|r| r["node_name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn node_remove_by_name_moves_a_followers_replica() {
    let (mut c, v) = four_nodes_one_volume();
    let on = replica_nodes(&v);
    let follower = v["replicas"].as_array().unwrap().iter().find(|r| r["role"] == "follower").unwrap();
    let name = follower["node_name"].as_str().unwrap().to_string();
    remove_and_re_replicate(&mut c, &name, &name, &on);
}

#[test]
fn node_remove_by_id_of_the_catalog_leader() {
    let (mut c, v) = four_nodes_one_volume();
    let on = replica_nodes(&v);
    let status = c.json(&["cluster", "status"]);
    let leader = status["catalog_leader_id"].as_u64().unwrap();
    let nodes = c.json(&["node", "list"]);
    let name = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == leader)
        .map(|n| n["name"].as_str().unwrap().to_string())
        .unwrap();
    remove_and_re_replicate(&mut c, &leader.to_string(), &name, &on);
    let status = c.json(&["cluster", "status"]);
    assert_ne!(status["catalog_leader_id"], leader, "{status:#}");
    assert_eq!(status["ready"], true, "{status:#}");
}
