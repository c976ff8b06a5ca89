//! `volctl dev up`: N volumed processes on 127.0.0.2, 127.0.0.3, … that
//! form one cluster, recorded in `<state-dir>/cluster.json`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use volumed_proto::volumed::v1 as pb;

use super::process::{self, clean_env, spawn_detached};
use super::{absolute, csi, note, STOP_GRACE};
use crate::cli::{Output, UpArgs, DEFAULT_STATE_DIR};
use crate::commands::Api;
use crate::error::CliError;
use crate::render::json;
use crate::state::{ClusterFile, VolumedEntry, FILE_NAME};
use crate::table::Table;

/// Label key volumed reads as a node's zone (the Kubernetes one).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `sun_path` is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
const LOG_TAIL_LINES: usize = 15;

/// What `dev up` passes to node `i` (1-based) of `n`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub n: u32,
    pub first_ip: Ipv4Addr,
    pub api_port: u16,
    pub nbd_port: u16,
    pub node_down_grace: String,
    pub zones: Vec<String>,
    pub state_dir: PathBuf,
    pub volumed_bin: PathBuf,
}

pub fn node_ip(first: Ipv4Addr, i: u32) -> Result<Ipv4Addr, CliError> {
    let ip = u32::from(first).checked_add(i - 1).map(Ipv4Addr::from);
    match ip {
        Some(ip) if ip.octets()[0] == 127 && ip != Ipv4Addr::new(127, 255, 255, 255) && !first.is_unspecified() => {
            Ok(ip)
        }
        _ => Err(CliError::Dev(format!(
            "--first-ip {first}: node {i} would not be on a loopback address; dev clusters listen on 127.0.0.0/8 only"
        ))),
    }
}

/// Catalog voters for an `n`-node dev cluster: 1 for one node, 5 from five
/// nodes on, else 3 (volumed runs fewer while the cluster is smaller).
pub fn catalog_voters(n: u32) -> u32 {
    match n {
        0 | 1 => 1,
        2..=4 => 3,
        _ => 5,
    }
}

impl Plan {
    pub fn entries(&self) -> Result<Vec<VolumedEntry>, CliError> {
        let mut apis = Vec::new();
        for i in 1..=self.n {
            apis.push(SocketAddr::from((node_ip(self.first_ip, i)?, self.api_port)).to_string());
        }
        let env = clean_env();
        let mut out = Vec::new();
        for i in 1..=self.n {
            let ip = node_ip(self.first_ip, i)?;
            let name = format!("node-{i}");
            let home = self.state_dir.join(&name);
            let data_dir = home.join("data");
            let run_dir = home.join("run");
            let local_socket = run_dir.join("volumed.sock");
            if local_socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(CliError::Dev(format!(
                    "--state-dir {} is too long for a unix socket path ({} is over {MAX_SOCKET_PATH} bytes); \
                     use a shorter one",
                    self.state_dir.display(),
                    local_socket.display()
                )));
            }
            let api = SocketAddr::from((ip, self.api_port)).to_string();
            let nbd = SocketAddr::from((ip, self.nbd_port)).to_string();
            let s = |p: &Path| p.to_string_lossy().into_owned();
            let mut args = vec![
                s(&self.volumed_bin),
                "--node-name".into(),
                name.clone(),
                "--node-id".into(),
                i.to_string(),
                "--listen".into(),
                api.clone(),
                "--nbd-listen".into(),
                nbd.clone(),
                "--data-dir".into(),
                s(&data_dir),
                "--run-dir".into(),
                s(&run_dir),
                "--local-socket".into(),
                s(&local_socket),
                "--join".into(),
                apis.join(","),
                "--bootstrap-expect".into(),
                self.n.min(3).to_string(),
                "--catalog-voters".into(),
                catalog_voters(self.n).to_string(),
                "--node-down-grace".into(),
                self.node_down_grace.clone(),
                "--log-format".into(),
                "json".into(),
            ];
            if !self.zones.is_empty() {
                let zone = &self.zones[(i as usize - 1) % self.zones.len()];
                args.push("--label".into());
                args.push(format!("{ZONE_LABEL}={zone}"));
            }
            out.push(VolumedEntry {
                node_id: i as u64,
                node_name: name,
                api: format!("http://{api}"),
                nbd,
                pid: 0,
                data_dir,
                run_dir,
                local_socket,
                log: home.join("volumed.log"),
                args,
                env: env.clone(),
                extra: Default::default(),
            });
        }
        Ok(out)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// --volumed-bin, else `volumed` next to this volctl, else on PATH.
pub fn find_volumed(given: Option<&Path>) -> Result<PathBuf, CliError> {
    find_binary(
        "volumed",
        given,
        "--volumed-bin",
        "build it with `cargo build -p volumed --bins` or pass --volumed-bin PATH",
    )
}

/// The program `name`: `given` (from `flag`), else next to this volctl,
/// else on PATH. `hint` says what to do when it is nowhere.
pub fn find_binary(name: &str, given: Option<&Path>, flag: &str, hint: &str) -> Result<PathBuf, CliError> {
    if let Some(p) = given {
        let p = absolute(p)?;
        if !is_executable(&p) {
            return Err(CliError::Dev(format!("{flag} {}: not an executable file", p.display())));
        }
        return Ok(p);
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name)));
    if let Some(b) = beside.as_ref().filter(|b| is_executable(b)) {
        return Ok(b.clone());
    }
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_absolute() && is_executable(p))
    {
        return Ok(p);
    }
    Err(CliError::Dev(format!(
        "cannot find the {name} binary (not next to volctl{} and not on PATH); {hint}",
        beside.and_then(|b| b.parent().map(|d| format!(" in {}", d.display()))).unwrap_or_default()
    )))
}

/// How long a busy address may take to come free. A node that just died
/// (SIGKILL, OOM) shows as a zombie before its last threads have closed its
/// listening sockets, so restarting it at once can find them still bound.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(3);

fn check_free(entries: &[&VolumedEntry]) -> Result<(), CliError> {
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    for e in entries {
        let api = e.api.trim_start_matches("http://");
        for addr in [api, e.nbd.as_str()] {
            let mut bound = TcpListener::bind(addr);
            while matches!(&bound, Err(err) if err.kind() == std::io::ErrorKind::AddrInUse) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
                bound = TcpListener::bind(addr);
            }
            if let Err(err) = bound {
                return Err(CliError::Dev(format!(
                    "{addr} ({}) cannot be used: {err}; another dev cluster? stop it with `volctl dev down \
                     --state-dir DIR`, or pass --first-ip (e.g. 127.0.1.2) / --api-port / --nbd-port",
                    e.node_name
                )));
            }
        }
    }
    Ok(())
}

/// A fresh cluster may only go into a new or empty directory (or one whose
/// cluster.json lists nothing): `dev down` deletes it afterwards.
fn check_fresh_dir(dir: &Path) -> Result<(), CliError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CliError::io(format!("read {}", dir.display()), e)),
    };
    let foreign: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != FILE_NAME && n != &format!(".{FILE_NAME}.tmp"))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    Err(CliError::Dev(format!(
        "{} is not empty and holds no dev cluster (no {FILE_NAME}); `volctl dev down` would delete it, so \
         choose a new or empty --state-dir",
        dir.display()
    )))
}

pub async fn up(args: &UpArgs, state_dir: &Path, output: Output) -> Result<String, CliError> {
    let dir = absolute(state_dir)?;
    if let Some(cluster) = ClusterFile::load(&dir)?.filter(|c| !c.volumed.is_empty()) {
        let dir = dir.canonicalize().map_err(|e| CliError::io(format!("resolve {}", dir.display()), e))?;
        return resume(args, &dir, cluster, output).await;
    }
    if args.zones.iter().any(|z| z.trim().is_empty()) {
        return Err(CliError::Dev("--zones: empty zone name".into()));
    }
    check_fresh_dir(&dir)?;
    let volumed_bin = find_volumed(args.volumed_bin.as_deref())?;
    std::fs::create_dir_all(&dir).map_err(|e| CliError::io(format!("create {}", dir.display()), e))?;
    let dir = dir.canonicalize().map_err(|e| CliError::io(format!("resolve {}", dir.display()), e))?;
    let plan = Plan {
        n: args.nodes.unwrap_or(3),
        first_ip: args.first_ip,
        api_port: args.api_port,
        nbd_port: args.nbd_port,
        node_down_grace: args.node_down_grace.clone(),
        zones: args.zones.iter().map(|z| z.trim().to_string()).collect(),
        state_dir: dir.clone(),
        volumed_bin,
    };
    let entries = plan.entries()?;
    check_free(&entries.iter().collect::<Vec<_>>())?;
    let extra = ClusterFile::load(&dir)?.map(|c| c.extra).unwrap_or_default();
    // A fresh cluster gets fresh plugins too (planned once volumed runs).
    let mut cluster = ClusterFile { volumed: entries, state_dir: dir.clone(), extra, ..Default::default() };
    for e in &cluster.volumed {
        for d in [&e.data_dir, &e.run_dir] {
            std::fs::create_dir_all(d).map_err(|err| CliError::io(format!("create {}", d.display()), err))?;
        }
    }
    // Recorded before anything starts, so `dev down` can always clean up.
    cluster.save(&dir)?;
    let all: Vec<usize> = (0..cluster.volumed.len()).collect();
    let children = start(&mut cluster, &all, &dir)?;
    let status = wait_or_stop(&cluster, children, args.timeout, &dir).await?;
    start_csi(args, &mut cluster, &dir).await?;
    Ok(summary(&cluster, &status, &dir, output, "started"))
}

/// The CSI plugins, unless --no-csi: whatever of them does not run is
/// started (all of them for a new cluster).
async fn start_csi(args: &UpArgs, cluster: &mut ClusterFile, dir: &Path) -> Result<Vec<String>, CliError> {
    if args.no_csi {
        return Ok(Vec::new());
    }
    let bins = || csi::find_bins(args.csi_controller_bin.as_deref(), args.csi_node_bin.as_deref());
    csi::ensure(cluster, dir, bins, args.timeout).await
}

/// Restarts what died of an existing cluster, from the recorded argv.
async fn resume(args: &UpArgs, dir: &Path, mut cluster: ClusterFile, output: Output) -> Result<String, CliError> {
    if let Some(n) = args.nodes.filter(|n| *n as usize != cluster.volumed.len()) {
        return Err(CliError::Dev(format!(
            "{} holds a {}-node dev cluster; run `volctl dev down` first to start one with {n} nodes, or use another \
             --state-dir",
            dir.display(),
            cluster.volumed.len()
        )));
    }
    let dead: Vec<usize> = (0..cluster.volumed.len())
        .filter(|i| {
            let e = &cluster.volumed[*i];
            !process::is_ours(e.pid, Some(&e.args), &[dir])
        })
        .collect();
    if dead.is_empty() {
        let status = wait_or_stop(&cluster, Vec::new(), args.timeout, dir).await?;
        let csi = start_csi(args, &mut cluster, dir).await?;
        let what = if csi.is_empty() { "already running".to_string() } else { format!("restarted {}", csi.join(", ")) };
        return Ok(summary(&cluster, &status, dir, output, &what));
    }
    check_free(&dead.iter().map(|i| &cluster.volumed[*i]).collect::<Vec<_>>())?;
    let names: Vec<String> = dead.iter().map(|i| cluster.volumed[*i].node_name.clone()).collect();
    let children = start(&mut cluster, &dead, dir)?;
    let status = wait_or_stop(&cluster, children, args.timeout, dir).await?;
    let mut names = names;
    names.extend(start_csi(args, &mut cluster, dir).await?);
    Ok(summary(&cluster, &status, dir, output, &format!("restarted {}", names.join(", "))))
}

/// A started node: its index in the cluster file and the process.
type Started = Vec<(usize, Child)>;

fn start(cluster: &mut ClusterFile, which: &[usize], dir: &Path) -> Result<Started, CliError> {
    let mut children: Started = Vec::new();
    for &i in which {
        let e = &mut cluster.volumed[i];
        if e.env.is_empty() {
            e.env = clean_env();
        }
        let spawned = spawn_detached(&e.args, &e.env, &e.log);
        let msg = match &spawned {
            Ok(child) => {
                e.pid = child.id();
                format!("started {} (pid {}) on {}, log {}", e.node_name, e.pid, e.api, e.log.display())
            }
            Err(err) => {
                e.pid = 0;
                let bin = e.args.first().map(String::as_str).unwrap_or("?");
                format!("cannot start {} ({bin}): {err}", e.node_name)
            }
        };
        let ok = spawned.is_ok();
        if let Ok(child) = spawned {
            children.push((i, child));
        }
        // Recorded at once: whatever happens next, `dev down` finds it.
        let saved = cluster.save(dir);
        if !ok || saved.is_err() {
            let mut procs: Vec<Child> = children.into_iter().map(|(_, c)| c).collect();
            process::stop_children(&mut procs, STOP_GRACE);
            saved?;
            return Err(CliError::Dev(msg));
        }
        note(&msg);
    }
    Ok(children)
}

/// Waits for the cluster to form; on failure stops what this call started
/// and shows the end of every node's log. On success the children are
/// left running: they outlive volctl.
async fn wait_or_stop(
    cluster: &ClusterFile,
    mut children: Started,
    timeout: Duration,
    dir: &Path,
) -> Result<pb::ClusterStatusResponse, CliError> {
    if !children.is_empty() {
        note(&format!("waiting up to {}s for the cluster to form…", timeout.as_secs()));
    }
    match wait_ready(cluster, &mut children, timeout).await {
        Ok(s) => Ok(s),
        Err(why) => {
            let mut procs: Vec<Child> = children.into_iter().map(|(_, c)| c).collect();
            process::stop_children(&mut procs, STOP_GRACE);
            for e in &cluster.volumed {
                note(&format!("--- last lines of {} ({}):", e.node_name, e.log.display()));
                note(process::log_tail(&e.log, LOG_TAIL_LINES).trim_end());
            }
            Err(CliError::Dev(format!(
                "the dev cluster did not become ready: {why}; the nodes' logs are in {} (tails above); \
                 `volctl dev up` tries again, `volctl dev down` cleans up",
                dir.display()
            )))
        }
    }
}

/// How far the cluster got, for the timeout message.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    NoAnswer(String),
    NotFormed(String),
    NodesMissing(String),
}

impl Progress {
    fn text(self) -> String {
        match self {
            Progress::NoAnswer(s) | Progress::NotFormed(s) | Progress::NodesMissing(s) => s,
        }
    }
}

async fn wait_ready(
    cluster: &ClusterFile,
    children: &mut Started,
    timeout: Duration,
) -> Result<pb::ClusterStatusResponse, String> {
    let deadline = Instant::now() + timeout;
    let want: Vec<&str> = cluster.volumed.iter().map(|e| e.node_name.as_str()).collect();
    let mut best = Progress::NoAnswer("no node answered".into());
    loop {
        for (i, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!("{} exited during startup ({status})", cluster.volumed[*i].node_name));
            }
        }
        match probe(cluster, &want).await {
            Ok(s) => return Ok(s),
            Err(p) => best = best.max(p),
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {}s: {}", timeout.as_secs(), best.text()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ready when some node says the catalog formed and lists every node up.
async fn probe(cluster: &ClusterFile, want: &[&str]) -> Result<pb::ClusterStatusResponse, Progress> {
    let mut best = Progress::NoAnswer("no node answered".into());
    for e in &cluster.volumed {
        let step = async {
            let mut api = Api::connect(&e.api).await.map_err(|err| Progress::NoAnswer(err.to_string()))?;
            let status = api.cluster_status().await.map_err(|err| Progress::NoAnswer(err.to_string()))?;
            if !status.ready {
                return Err(Progress::NotFormed(format!(
                    "{} answers but the catalog has not formed yet (leader: {})",
                    e.node_name, status.catalog_leader_id
                )));
            }
            let nodes = api.nodes().await.map_err(|err| Progress::NotFormed(err.to_string()))?;
            let up: Vec<&str> = nodes
                .iter()
                .filter(|n| n.state() == pb::NodeState::Up && want.contains(&n.name.as_str()))
                .map(|n| n.name.as_str())
                .collect();
            let missing: Vec<&str> = want.iter().copied().filter(|w| !up.contains(w)).collect();
            if missing.is_empty() {
                Ok(status)
            } else {
                Err(Progress::NodesMissing(format!(
                    "the catalog formed, {} of {} nodes are up (waiting for {})",
                    up.len(),
                    want.len(),
                    missing.join(", ")
                )))
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), step).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(p)) => best = best.max(p),
            Err(_) => best = best.max(Progress::NoAnswer(format!("{} did not answer within 5s", e.node_name))),
        }
    }
    Err(best)
}

fn summary(
    cluster: &ClusterFile,
    status: &pb::ClusterStatusResponse,
    dir: &Path,
    output: Output,
    what: &str,
) -> String {
    if output == Output::Json {
        return json(cluster);
    }
    let leader = cluster
        .volumed
        .iter()
        .find(|e| e.node_id == status.catalog_leader_id)
        .map(|e| e.node_name.clone())
        .unwrap_or_else(|| status.catalog_leader_id.to_string());
    let mut out = format!(
        "volumed dev cluster ({what}): {} nodes, catalog leader {leader}, state in {}\n\n",
        cluster.volumed.len(),
        dir.display()
    );
    let mut t = Table::new(&["NAME", "ID", "API", "NBD", "PID", "LOG"]);
    for e in &cluster.volumed {
        t.row(vec![
            e.node_name.clone(),
            e.node_id.to_string(),
            e.api.clone(),
            e.nbd.clone(),
            e.pid.to_string(),
            e.log.display().to_string(),
        ]);
    }
    out.push_str(&t.render());
    if let Some(endpoint) = &cluster.csi_controller {
        out.push_str(&format!("\nCSI plugins (driver csi.volumed.dev), controller at {endpoint}:\n\n"));
        let mut t = Table::new(&["PLUGIN", "NODE ID", "ENDPOINT", "KUBELET DIR", "PID", "LOG"]);
        if let Some(p) = &cluster.csi_controller_process {
            t.row(vec![
                csi::CONTROLLER_BIN.into(),
                "-".into(),
                p.endpoint.clone(),
                "-".into(),
                p.pid.to_string(),
                p.log.display().to_string(),
            ]);
        }
        for n in &cluster.csi_nodes {
            t.row(vec![
                format!("{} {}", csi::NODE_BIN, n.node_name),
                n.node_id.clone(),
                n.process.endpoint.clone(),
                n.kubelet_dir.display().to_string(),
                n.process.pid.to_string(),
                n.process.log.display().to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push_str("\nTry:\n");
    if dir != Path::new(DEFAULT_STATE_DIR) {
        out.push_str(&format!("  export VOLUMED_STATE_DIR={}\n", dir.display()));
    }
    let first = cluster.volumed.first().map(|e| e.api.as_str()).unwrap_or("http://127.0.0.2:7400");
    out.push_str(&format!(
        "  volctl volume create demo --size 1Gi          # volctl finds the cluster via {}\n\
         \x20 volctl volume get demo                        # or: volctl --endpoint {first} …\n\
         \x20 nbdcopy disk.img \"$(volctl volume get demo -o json | jq -r .nbd_uri)\"\n\
         \x20 volctl dev down\n",
        crate::state::path_in(dir).display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(n: u32, zones: &[&str]) -> Plan {
        Plan {
            n,
            first_ip: Ipv4Addr::new(127, 0, 0, 2),
            api_port: 7400,
            nbd_port: 10809,
            node_down_grace: "5m".into(),
            zones: zones.iter().map(|z| z.to_string()).collect(),
            state_dir: "/tmp/vd".into(),
            volumed_bin: "/opt/bin/volumed".into(),
        }
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == name).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn three_node_plan() {
        let e = plan(3, &[]).entries().unwrap();
        assert_eq!(e.len(), 3);
        let n2 = &e[1];
        assert_eq!(n2.node_name, "node-2");
        assert_eq!(n2.node_id, 2);
        assert_eq!(n2.api, "http://127.0.0.3:7400");
        assert_eq!(n2.nbd, "127.0.0.3:10809");
        assert_eq!(n2.data_dir, PathBuf::from("/tmp/vd/node-2/data"));
        assert_eq!(n2.local_socket, PathBuf::from("/tmp/vd/node-2/run/volumed.sock"));
        assert_eq!(n2.log, PathBuf::from("/tmp/vd/node-2/volumed.log"));
        assert_eq!(n2.args[0], "/opt/bin/volumed");
        assert_eq!(flag(&n2.args, "--listen"), ["127.0.0.3:7400"]);
        assert_eq!(flag(&n2.args, "--nbd-listen"), ["127.0.0.3:10809"]);
        assert_eq!(flag(&n2.args, "--join"), ["127.0.0.2:7400,127.0.0.3:7400,127.0.0.4:7400"]);
        assert_eq!(flag(&n2.args, "--bootstrap-expect"), ["3"]);
        assert_eq!(flag(&n2.args, "--catalog-voters"), ["3"]);
        assert_eq!(flag(&n2.args, "--node-down-grace"), ["5m"]);
        assert_eq!(flag(&n2.args, "--log-format"), ["json"]);
        assert_eq!(flag(&n2.args, "--run-dir"), ["/tmp/vd/node-2/run"]);
        assert!(flag(&n2.args, "--label").is_empty());
        assert!(n2.env.contains_key("PATH"));
        assert!(!n2.env.keys().any(|k| k.to_lowercase().contains("proxy")));
    }

    #[test]
    fn voters_bootstrap_and_zones_scale_with_the_cluster() {
        assert_eq!([1, 2, 3, 4, 5, 7].map(catalog_voters), [1, 3, 3, 3, 5, 5]);
        let e = plan(1, &[]).entries().unwrap();
        assert_eq!(flag(&e[0].args, "--bootstrap-expect"), ["1"]);
        assert_eq!(flag(&e[0].args, "--catalog-voters"), ["1"]);
        let e = plan(5, &["a", "b"]).entries().unwrap();
        assert_eq!(flag(&e[4].args, "--bootstrap-expect"), ["3"]);
        assert_eq!(flag(&e[4].args, "--catalog-voters"), ["5"]);
        let zones: Vec<&str> = e.iter().map(|n| flag(&n.args, "--label")[0]).collect();
        assert_eq!(
            zones,
            [
                "topology.kubernetes.io/zone=a",
                "topology.kubernetes.io/zone=b",
                "topology.kubernetes.io/zone=a",
                "topology.kubernetes.io/zone=b",
                "topology.kubernetes.io/zone=a"
            ]
        );
    }

    #[test]
    fn addresses_stay_on_loopback() {
        assert_eq!(node_ip(Ipv4Addr::new(127, 0, 0, 255), 2).unwrap(), Ipv4Addr::new(127, 0, 1, 0));
        assert!(node_ip(Ipv4Addr::new(127, 255, 255, 254), 2).is_err());
        assert!(node_ip(Ipv4Addr::new(10, 0, 0, 1), 1).unwrap_err().to_string().contains("127.0.0.0/8"));
        let mut p = plan(2, &[]);
        p.state_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        assert!(p.entries().unwrap_err().to_string().contains("too long for a unix socket"));
    }

    #[test]
    fn a_fresh_cluster_needs_an_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        check_fresh_dir(&dir.path().join("new")).unwrap();
        check_fresh_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{}").unwrap();
        check_fresh_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("thesis.tex"), "").unwrap();
        let e = check_fresh_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--state-dir"), "{e}");
    }

    #[test]
    fn busy_ports_are_reported_before_starting() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut e = plan(1, &[]).entries().unwrap().remove(0);
        e.api = format!("http://{}", l.local_addr().unwrap());
        e.nbd = "127.0.0.1:0".into();
        let err = check_free(&[&e]).unwrap_err().to_string();
        assert!(err.contains("cannot be used") && err.contains("--first-ip"), "{err}");
    }

    #[test]
    fn volumed_binary_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let e = find_volumed(Some(&dir.path().join("none"))).unwrap_err().to_string();
        assert!(e.contains("--volumed-bin") && e.contains("not an executable"), "{e}");
        let bin = dir.path().join("volumed");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_volumed(Some(&bin)).unwrap(), bin);
    }

    #[test]
    fn summary_lists_nodes_and_next_steps() {
        let mut e = plan(2, &[]).entries().unwrap();
        e[0].pid = 41;
        e[1].pid = 42;
        let c = ClusterFile { volumed: e, state_dir: "/tmp/vd".into(), ..Default::default() };
        let status = pb::ClusterStatusResponse { catalog_leader_id: 2, ready: true, ..Default::default() };
        let s = summary(&c, &status, Path::new("/tmp/vd"), Output::Table, "started");
        assert!(
            s.starts_with("volumed dev cluster (started): 2 nodes, catalog leader node-2, state in /tmp/vd\n"),
            "{s}"
        );
        assert!(
            s.contains("node-1  1   http://127.0.0.2:7400  127.0.0.2:10809  41   /tmp/vd/node-1/volumed.log"),
            "{s}"
        );
        assert!(s.contains("export VOLUMED_STATE_DIR=/tmp/vd"), "{s}");
        assert!(s.contains("volctl volume create demo --size 1Gi") && s.contains("nbdcopy"), "{s}");
        let j: serde_json::Value =
            serde_json::from_str(&summary(&c, &status, Path::new("/tmp/vd"), Output::Json, "")).unwrap();
        assert_eq!(j["volumed"][1]["pid"], 42);
    }
}
