//! The `volumed` executable as an operator and the DaemonSet start it:
//! flags and their environment variables, bad configuration refused with
//! the flag named and exit code 2, and a single-node daemon that stops
//! cleanly on SIGTERM and comes back from its data dir with nothing lost.
//!
//! Being an integration test of this package also makes a workspace
//! `cargo test` build the `volumed` binary, which the suites of the other
//! crates (volctl, CSI, volumed-tests) start beside their own executables.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vd::admin_client::AdminClient;
use volumed_proto::volumed::v1 as vd;

const BIN: &str = env!("CARGO_BIN_EXE_volumed");
const PROXY_VARS: [&str; 8] =
    ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"];

/// A `volumed` command with none of the caller's VOLUMED_* or proxy
/// variables, so each test sees only what it sets.
fn volumed() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("VOLUMED_") {
            c.env_remove(&k);
        }
    }
    for v in PROXY_VARS {
        c.env_remove(v);
    }
    c
}

fn output(c: &mut Command) -> (Option<i32>, String, String) {
    let Output { status, stdout, stderr } = c.output().expect("run volumed");
    (status.code(), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

#[test]
fn check_config_resolves_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels");
    std::fs::write(&labels, "# from the node object\ntopology.kubernetes.io/zone=zone-b\nrack=r7\n").unwrap();
    let (code, stdout, stderr) = output(
        volumed()
            .args(["--check-config", "--listen", "0.0.0.0:7400", "--label", "disk=ssd"])
            .env("VOLUMED_NODE_NAME", "worker-3")
            .env("VOLUMED_ADVERTISE", "10.1.2.3:7400")
            .env("VOLUMED_CAPACITY", "20Gi")
            .env("VOLUMED_NODE_DOWN_GRACE", "90s")
            .env("VOLUMED_LABELS_FILE", &labels),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let c: serde_json::Value = serde_json::from_str(&stdout).expect("--check-config prints JSON");
    assert_eq!(c["node_name"], "worker-3");
    assert_eq!(c["advertise"], "10.1.2.3:7400");
    // NBD is advertised on the API host when it listens on a wildcard.
    assert_eq!(c["nbd_advertise"], "10.1.2.3:10809");
    assert_eq!(c["capacity_bytes"], 20u64 << 30);
    assert_eq!(c["node_down_grace"], 90.0);
    assert_eq!(c["labels"]["disk"], "ssd");
    assert_eq!(c["labels"]["topology.kubernetes.io/zone"], "zone-b");
    assert_eq!(c["labels"]["rack"], "r7");
    assert_eq!(c["local_socket"], "/run/volumed/volumed.sock");
    // The id is a stable function of the name: the same name twice gives it.
    let (_, again, _) =
        output(volumed().args(["--check-config", "--node-name", "worker-3", "--listen", "127.0.0.1:1"]));
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(c["node_id"], again["node_id"]);
    assert!(c["node_id"].as_u64().unwrap() > 0);
}

#[test]
fn bad_configuration_names_the_flag_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-labels");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--node-name", "n", "--listen", "0.0.0.0:7400"], "--advertise"),
        (&["--node-name", "n", "--listen", "127.0.0.1:1", "--catalog-voters", "4"], "--catalog-voters"),
        (&["--node-name", "n", "--listen", "127.0.0.1:1", "--capacity", "12Qi"], "--capacity"),
        (&["--node-name", "n", "--listen", "127.0.0.1:1", "--label", "=x"], "--label"),
        (&["--node-name", "n", "--listen", "127.0.0.1:1", "--labels-file", missing], "no-such-labels"),
        (&["--node-name", "n", "--listen", "127.0.0.1:1", "--node-id", "0"], "--node-id"),
        (&["--node-name", "n", "--listen", "127.0.0.1:1", "--frontend", "iscsi"], "--frontend"),
    ];
    for (args, named) in cases {
        let (code, stdout, stderr) = output(volumed().arg("--check-config").args(args));
        assert_eq!(code, Some(2), "{args:?} must be refused: {stdout}{stderr}");
        assert!(stderr.contains(named), "{args:?}: the error must name {named}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: nothing on stdout when refused: {stdout}");
    }
    let (code, _, stderr) = output(volumed().args(["--check-config", "--listen", "127.0.0.1:1"]));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--node-name"), "{stderr}");
}

/// One single-voter node on its own loopback address.
struct Node {
    child: Child,
    api: String,
}

impl Node {
    fn start(data: &Path, run: &Path) -> Node {
        let ip = "127.0.77.1";
        let api = format!("{ip}:17400");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).unwrap();
        let child = volumed()
            .args(["--node-name", "solo", "--listen", &api, "--nbd-listen", &format!("{ip}:17809")])
            .args(["--bootstrap-expect", "1", "--catalog-voters", "1", "--frontend", "fuse-loop"])
            .arg("--data-dir")
            .arg(data)
            .arg("--run-dir")
            .arg(run)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start volumed");
        Node { child, api: format!("http://{api}") }
    }

    async fn admin(&mut self) -> AdminClient<tonic::transport::Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("volumed exited during start: {status}");
            }
            if let Ok(mut c) = AdminClient::connect(self.api.clone()).await {
                if let Ok(s) = c.cluster_status(vd::ClusterStatusRequest::default()).await {
                    // Serving means a catalog leader and this node registered
                    // in it (placement needs the node).
                    if s.get_ref().catalog_leader_id != 0 && s.get_ref().nodes_up >= 1 {
                        return c;
                    }
                }
            }
            assert!(Instant::now() < deadline, "volumed at {} not serving within 30 s", self.api);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit status within the 10 s a DaemonSet gives.
    fn terminate(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("volumed did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_restart_keeps_the_catalog() {
    for v in PROXY_VARS {
        std::env::remove_var(v);
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let log = data.with_extension("log");
    let keep_log = |what: &str| format!("{what}; volumed log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());

    let mut node = Node::start(&data, &run);
    let mut admin = node.admin().await;
    let made = admin
        .create_volume(vd::CreateVolumeRequest {
            name: "pvc-kept".into(),
            size_bytes: 64 << 20,
            replica_count: 1,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{}", keep_log(&format!("create: {e}"))))
        .into_inner();
    let status = node.terminate();
    assert!(status.success(), "{}", keep_log(&format!("SIGTERM must end volumed with 0, got {status}")));
    assert!(!run.join("volumed.sock").exists(), "the node-local socket is removed at stop");

    // Same flags, same data dir: the node, its catalog and the volume are back.
    let mut node = Node::start(&data, &run);
    let mut admin = node.admin().await;
    let got = admin
        .get_volume(vd::GetVolumeRequest { id_or_name: "pvc-kept".into() })
        .await
        .unwrap_or_else(|e| panic!("{}", keep_log(&format!("volume lost across restart: {e}"))))
        .into_inner();
    assert_eq!(got.id, made.id);
    assert_eq!(got.size_bytes, 64 << 20);
    let nodes = admin.list_nodes(vd::ListNodesRequest::default()).await.unwrap().into_inner();
    assert_eq!(nodes.nodes.len(), 1, "restart must not register the node twice: {:?}", nodes.nodes);
    assert!(node.terminate().success(), "{}", keep_log("second SIGTERM"));
}
