//! The CSI plugins of the dev cluster: one `csi-controller` talking to every
//! volumed, and one `csi-node` per volumed node with that node's local
//! socket and a kubelet directory of its own. They are started detached like
//! the nodes, recorded in cluster.json, and ready once each answers Probe
//! (a node plugin also has to report its volumed's node id).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use volumed_proto::csi::v1 as csi;
use volumed_proto::csi::v1::identity_client::IdentityClient;
use volumed_proto::csi::v1::node_client::NodeClient;

use super::process::{self, clean_env, spawn_detached};
use super::up::{find_binary, MAX_SOCKET_PATH};
use super::{note, STOP_GRACE};
use crate::endpoint::unix_channel;
use crate::error::{chain, CliError};
use crate::state::{ClusterFile, CsiNodeEntry, CsiProcess};

pub const CONTROLLER_BIN: &str = "csi-controller";
pub const NODE_BIN: &str = "csi-node";
const LOG_TAIL_LINES: usize = 15;
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the plugin binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub controller: PathBuf,
    pub node: PathBuf,
}

/// --csi-*-bin (or CSI_CONTROLLER_BIN / CSI_NODE_BIN), else next to this
/// volctl, else on PATH.
pub fn find_bins(controller: Option<&Path>, node: Option<&Path>) -> Result<Bins, CliError> {
    let hint = "build them with `cargo build --workspace --bins`, pass --csi-controller-bin / --csi-node-bin \
                (CSI_CONTROLLER_BIN / CSI_NODE_BIN), or start volumed alone with --no-csi";
    Ok(Bins {
        controller: find_binary(CONTROLLER_BIN, controller, "--csi-controller-bin", hint)?,
        node: find_binary(NODE_BIN, node, "--csi-node-bin", hint)?,
    })
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn socket_endpoint(socket: &Path) -> Result<String, CliError> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(CliError::Dev(format!(
            "the state directory is too long for a unix socket path ({} is over {MAX_SOCKET_PATH} bytes); use a \
             shorter --state-dir",
            socket.display()
        )));
    }
    Ok(format!("unix://{}", socket.display()))
}

/// The socket path of a recorded `unix://` endpoint.
fn socket_of(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

/// Fills in the plugins of `cluster` (state dir `dir`): endpoints, logs,
/// full command lines. Nothing is started.
pub fn plan(cluster: &mut ClusterFile, dir: &Path, bins: &Bins) -> Result<(), CliError> {
    let env = clean_env();
    let apis: Vec<&str> = cluster.volumed.iter().map(|e| e.api.as_str()).collect();
    let csi_dir = dir.join("csi");
    let endpoint = socket_endpoint(&csi_dir.join("controller.sock"))?;
    let controller = CsiProcess {
        endpoint: endpoint.clone(),
        pid: 0,
        log: csi_dir.join("csi-controller.log"),
        args: vec![
            s(&bins.controller),
            "--endpoint".into(),
            endpoint.clone(),
            "--volumed".into(),
            apis.join(","),
            "--log-format".into(),
            "json".into(),
        ],
        env: env.clone(),
        extra: Default::default(),
    };
    let mut nodes = Vec::new();
    for e in &cluster.volumed {
        let home = dir.join(&e.node_name);
        let kubelet_dir = home.join("kubelet");
        let endpoint = socket_endpoint(&home.join("csi.sock"))?;
        nodes.push(CsiNodeEntry {
            node_id: e.node_id.to_string(),
            node_name: e.node_name.clone(),
            kubelet_dir: kubelet_dir.clone(),
            process: CsiProcess {
                endpoint: endpoint.clone(),
                pid: 0,
                log: home.join("csi-node.log"),
                args: vec![
                    s(&bins.node),
                    "--endpoint".into(),
                    endpoint,
                    "--volumed-socket".into(),
                    s(&e.local_socket),
                    "--kubelet-dir".into(),
                    s(&kubelet_dir),
                    "--log-format".into(),
                    "json".into(),
                ],
                env: env.clone(),
                extra: Default::default(),
            },
        });
    }
    cluster.csi_controller = Some(endpoint);
    cluster.csi_controller_process = Some(controller);
    cluster.csi_nodes = nodes;
    Ok(())
}

/// Which plugin: `None` the controller, `Some(i)` the node plugin of
/// `cluster.csi_nodes[i]`.
type Which = Option<usize>;

fn label(cluster: &ClusterFile, w: Which) -> String {
    match w {
        None => CONTROLLER_BIN.to_string(),
        Some(i) => format!("{NODE_BIN} of {}", cluster.csi_nodes[i].node_name),
    }
}

fn entry(cluster: &ClusterFile, w: Which) -> Option<&CsiProcess> {
    match w {
        None => cluster.csi_controller_process.as_ref(),
        Some(i) => cluster.csi_nodes.get(i).map(|n| &n.process),
    }
}

fn entry_mut(cluster: &mut ClusterFile, w: Which) -> Option<&mut CsiProcess> {
    match w {
        None => cluster.csi_controller_process.as_mut(),
        Some(i) => cluster.csi_nodes.get_mut(i).map(|n| &mut n.process),
    }
}

fn all(cluster: &ClusterFile) -> Vec<Which> {
    let mut v: Vec<Which> = Vec::new();
    if cluster.csi_controller_process.is_some() {
        v.push(None);
    }
    v.extend((0..cluster.csi_nodes.len()).map(Some));
    v
}

/// Starts every recorded plugin that does not run (planning them first
/// when the cluster has none yet; `bins` is only looked up then), and
/// waits until all of them answer. Returns the labels of what it started.
pub async fn ensure(
    cluster: &mut ClusterFile,
    dir: &Path,
    bins: impl FnOnce() -> Result<Bins, CliError>,
    timeout: Duration,
) -> Result<Vec<String>, CliError> {
    if cluster.csi_controller_process.is_none() || cluster.csi_nodes.len() != cluster.volumed.len() {
        plan(cluster, dir, &bins()?)?;
    }
    let dead: Vec<Which> = all(cluster)
        .into_iter()
        .filter(|w| entry(cluster, *w).is_some_and(|p| !process::is_ours(p.pid, Some(&p.args), &[dir])))
        .collect();
    for d in [dir.join("csi")].into_iter().chain(cluster.csi_nodes.iter().map(|n| n.kubelet_dir.clone())) {
        std::fs::create_dir_all(&d).map_err(|e| CliError::io(format!("create {}", d.display()), e))?;
    }
    // Recorded before anything starts, so `dev down` can always clean up.
    cluster.save(dir)?;
    let mut children: Vec<(Which, Child)> = Vec::new();
    for &w in &dead {
        let name = label(cluster, w);
        let Some(p) = entry_mut(cluster, w) else {
            continue;
        };
        if p.env.is_empty() {
            p.env = clean_env();
        }
        let spawned = spawn_detached(&p.args, &p.env, &p.log);
        p.pid = spawned.as_ref().map(Child::id).unwrap_or(0);
        let msg = match &spawned {
            Ok(_) => format!("started {name} (pid {}) on {}, log {}", p.pid, p.endpoint, p.log.display()),
            Err(e) => format!("cannot start {name} ({}): {e}", p.args.first().map(String::as_str).unwrap_or("?")),
        };
        let ok = spawned.is_ok();
        if let Ok(child) = spawned {
            children.push((w, child));
        }
        let saved = cluster.save(dir);
        if !ok || saved.is_err() {
            stop(children);
            saved?;
            return Err(CliError::Dev(msg));
        }
        note(&msg);
    }
    if let Err(why) = wait_ready(cluster, &mut children, timeout).await {
        stop(children);
        for w in all(cluster) {
            if let Some(p) = entry(cluster, w) {
                note(&format!("--- last lines of {} ({}):", label(cluster, w), p.log.display()));
                note(process::log_tail(&p.log, LOG_TAIL_LINES).trim_end());
            }
        }
        return Err(CliError::Dev(format!(
            "the CSI plugins did not become ready: {why}; their logs are in {} (tails above); `volctl dev up` \
             tries again, `volctl dev down` cleans up",
            dir.display()
        )));
    }
    Ok(dead.into_iter().map(|w| label(cluster, w)).collect())
}

fn stop(children: Vec<(Which, Child)>) {
    let mut procs: Vec<Child> = children.into_iter().map(|(_, c)| c).collect();
    process::stop_children(&mut procs, STOP_GRACE);
}

async fn wait_ready(cluster: &ClusterFile, children: &mut [(Which, Child)], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        for (w, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!("{} exited during startup ({status})", label(cluster, *w)));
            }
        }
        let mut waiting = Vec::new();
        for w in all(cluster) {
            let Some(p) = entry(cluster, w) else { continue };
            let node_id = w.map(|i| cluster.csi_nodes[i].node_id.as_str());
            let answer = tokio::time::timeout(PROBE_TIMEOUT, probe(&socket_of(&p.endpoint), node_id))
                .await
                .unwrap_or_else(|_| Err(format!("did not answer within {}s", PROBE_TIMEOUT.as_secs())));
            if let Err(e) = answer {
                waiting.push(format!("{}: {e}", label(cluster, w)));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {}s: {}", timeout.as_secs(), waiting.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Ready: Probe says so and, for a node plugin, NodeGetInfo names the
/// volumed node it was started for.
async fn probe(socket: &Path, node_id: Option<&str>) -> Result<(), String> {
    let channel =
        unix_channel(socket).await.map_err(|e| format!("cannot connect to {}: {}", socket.display(), chain(&e)))?;
    let ready = IdentityClient::new(channel.clone())
        .probe(csi::ProbeRequest {})
        .await
        .map_err(|s| format!("Probe failed: {}", s.message()))?
        .into_inner()
        .ready;
    if ready == Some(false) {
        return Err("Probe answers not ready (its volumed is not reachable yet)".into());
    }
    if let Some(want) = node_id {
        let info = NodeClient::new(channel)
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .map_err(|s| format!("NodeGetInfo failed: {}", s.message()))?
            .into_inner();
        if info.node_id != want {
            return Err(format!(
                "NodeGetInfo reports node {:?}, expected {want}: it talks to another node's volumed",
                info.node_id
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::entry as volumed_entry;

    fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == name).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn one_controller_and_a_node_plugin_per_node() {
        let mut c = ClusterFile {
            volumed: vec![volumed_entry(1, "http://127.0.0.2:7400"), volumed_entry(2, "http://127.0.0.3:7400")],
            state_dir: "/s".into(),
            ..Default::default()
        };
        let bins = Bins { controller: "/b/csi-controller".into(), node: "/b/csi-node".into() };
        plan(&mut c, Path::new("/s"), &bins).unwrap();
        assert_eq!(c.csi_controller.as_deref(), Some("unix:///s/csi/controller.sock"));
        let ctl = c.csi_controller_process.as_ref().unwrap();
        assert_eq!(ctl.args[0], "/b/csi-controller");
        assert_eq!(flag(&ctl.args, "--endpoint"), ["unix:///s/csi/controller.sock"]);
        assert_eq!(flag(&ctl.args, "--volumed"), ["http://127.0.0.2:7400,http://127.0.0.3:7400"]);
        assert_eq!(ctl.log, PathBuf::from("/s/csi/csi-controller.log"));
        assert_eq!(c.csi_nodes.len(), 2);
        let n2 = &c.csi_nodes[1];
        assert_eq!(n2.node_id, "2");
        assert_eq!(n2.kubelet_dir, PathBuf::from("/s/node-2/kubelet"));
        assert_eq!(n2.process.endpoint, "unix:///s/node-2/csi.sock");
        assert_eq!(flag(&n2.process.args, "--volumed-socket"), ["/s/node-2/run/volumed.sock"]);
        assert_eq!(flag(&n2.process.args, "--kubelet-dir"), ["/s/node-2/kubelet"]);
        assert!(!n2.process.env.keys().any(|k| k.to_lowercase().contains("proxy")));
        // Only started processes (a recorded pid) are listed.
        assert!(!c.processes().iter().any(|p| p.label == "csi-controller"));
        c.csi_controller_process.as_mut().unwrap().pid = 4242;
        let labels: Vec<String> = c.processes().into_iter().map(|p| p.label).collect();
        assert!(labels.contains(&"csi-controller".to_string()), "{labels:?}");
        assert_eq!(socket_of(&n2.process.endpoint), PathBuf::from("/s/node-2/csi.sock"));

        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        let e = plan(&mut c, &long, &bins).unwrap_err().to_string();
        assert!(e.contains("too long for a unix socket"), "{e}");
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let e = probe(&dir.path().join("none.sock"), None).await.unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
    }
}
