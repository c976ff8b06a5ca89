//! A volumed cluster of real processes for tests.
//!
//! Each cluster gets its own loopback addresses (`127.A.B.n`, unique per test
//! process and per cluster), so tests run in parallel without port clashes.
//! Nodes can be killed (SIGKILL), stopped (SIGTERM), frozen (SIGSTOP — the
//! way to partition a node without touching the network) and restarted
//! with exactly the same arguments. Dropping the cluster kills every
//! process it started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::Channel;
use volumed_nbd::client::{ClientOptions, NbdClient, StaticEndpoints};
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::admin_client::AdminClient;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// Serialises the cluster tests of one test binary: each cluster is several
/// processes with sub-second Raft timers, and two of them side by side on
/// a 2-core machine only measure the scheduler. Take it first thing in a
/// test and keep it to the end; a panicking test releases it (poisoning is
/// ignored). Waiting blocks the calling thread, which is what a test that
/// has nothing else to do wants: every `#[tokio::test]` has its own runtime.
pub fn serial() -> SerialGuard {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SerialGuard(LOCK.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Held while a cluster test runs (see [`serial`]). Holding it across
/// `.await`s is the point: it is never contended within one runtime.
pub struct SerialGuard(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

/// Path of a binary built from this workspace (`volumed`, `volctl`, ...).
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found at {}: build the workspace binaries first (`cargo build --bins`) or set {var}",
        name,
        p.display()
    );
    p
}

/// Clears proxy variables: the environment of this machine sets them and
/// nothing in a test must go through a proxy.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for v in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"]
    {
        cmd.env_remove(v);
    }
    cmd
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub bootstrap_expect: usize,
    pub catalog_voters: usize,
    /// `--node-down-grace` (tests use seconds).
    pub down_grace: String,
    /// Zone label per node, round robin (empty: no zone labels).
    pub zones: Vec<String>,
    /// Capacity per node (`--capacity`).
    pub capacity: Option<String>,
    pub extra_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            bootstrap_expect: 3,
            catalog_voters: 3,
            down_grace: "5m".into(),
            zones: Vec::new(),
            capacity: Some("100Gi".into()),
            extra_args: Vec::new(),
        }
    }
}

pub struct NodeProc {
    pub index: usize,
    pub name: String,
    pub ip: String,
    pub api: String,
    pub nbd: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    child: Option<Child>,
    paused: bool,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.api)
    }
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd.parse().expect("nbd address")
    }
    /// `nbd://host:port/<export>` on this node.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.nbd, export)
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    bin: PathBuf,
    /// Joined seed list, for nodes added later.
    seeds: String,
    opts: ClusterOptions,
    prefix: String,
}

fn address_prefix() -> String {
    let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    // 127.A.B.x with A from the process id and B a per-process counter.
    format!("127.{}.{}", 1 + pid % 250, (pid / 250 % 50) * 5 + n % 5 + 1)
}

impl Cluster {
    /// Starts the cluster and waits until it is ready with every node up.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new().prefix("volumed-test-").tempdir().expect("tempdir");
        let bin = workspace_bin("volumed");
        let prefix = address_prefix();
        let seeds: Vec<String> = (0..opts.nodes).map(|i| format!("{prefix}.{}:7400", i + 2)).collect();
        let mut c = Cluster { dir, nodes: Vec::new(), bin, seeds: seeds.join(","), opts: opts.clone(), prefix };
        for i in 0..opts.nodes {
            c.add_node_proc(i);
        }
        for i in 0..opts.nodes {
            c.spawn(i);
        }
        c.wait_ready(opts.nodes, Duration::from_secs(90)).await;
        c
    }

    fn add_node_proc(&mut self, i: usize) {
        let ip = format!("{}.{}", self.prefix, i + 2);
        let name = format!("node-{}", i + 1);
        let node_dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let data_dir = node_dir.join("data");
        let run_dir = node_dir.join("run");
        let mut args = vec![
            "--node-name".to_string(),
            name.clone(),
            "--listen".into(),
            format!("{ip}:7400"),
            "--nbd-listen".into(),
            format!("{ip}:10809"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--run-dir".into(),
            run_dir.display().to_string(),
            "--join".into(),
            self.seeds.clone(),
            "--bootstrap-expect".into(),
            self.opts.bootstrap_expect.to_string(),
            "--catalog-voters".into(),
            self.opts.catalog_voters.to_string(),
            "--node-down-grace".into(),
            self.opts.down_grace.clone(),
            "--log-format".into(),
            "json".into(),
        ];
        if let Some(c) = &self.opts.capacity {
            args.push("--capacity".into());
            args.push(c.clone());
        }
        if !self.opts.zones.is_empty() {
            args.push("--label".into());
            args.push(format!("zone={}", self.opts.zones[i % self.opts.zones.len()]));
        }
        args.extend(self.opts.extra_args.iter().cloned());
        self.nodes.push(NodeProc {
            index: i,
            name,
            api: format!("{ip}:7400"),
            nbd: format!("{ip}:10809"),
            ip,
            log: node_dir.join("volumed.log"),
            data_dir,
            run_dir,
            args,
            child: None,
            paused: false,
        });
    }

    fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {i} already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).expect("log file");
        let log2 = log.try_clone().expect("log file");
        let mut cmd = Command::new(&self.bin);
        clean_env(&mut cmd)
            .args(&n.args)
            .env("VOLUMED_LOG", std::env::var("VOLUMED_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        n.child = Some(cmd.spawn().expect("spawn volumed"));
        n.paused = false;
    }

    /// Adds a node to a running cluster (it joins through the seeds).
    pub async fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        self.add_node_proc(i);
        self.spawn(i);
        i
    }

    pub fn node(&self, i: usize) -> &NodeProc {
        &self.nodes[i]
    }

    pub fn signal(&mut self, i: usize, sig: Signal) {
        if let Some(pid) = self.nodes[i].pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL: the process dies at once, no cleanup.
    pub fn kill(&mut self, i: usize) {
        if self.nodes[i].paused {
            self.signal(i, Signal::SIGCONT);
        }
        self.signal(i, Signal::SIGKILL);
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        if self.nodes[i].paused {
            self.signal(i, Signal::SIGCONT);
        }
        self.signal(i, Signal::SIGTERM);
        let mut child = self.nodes[i].child.take()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP: the node stops answering but keeps its sockets (a partition).
    pub fn pause(&mut self, i: usize) {
        self.signal(i, Signal::SIGSTOP);
        self.nodes[i].paused = true;
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, Signal::SIGCONT);
        self.nodes[i].paused = false;
    }

    /// Starts a stopped or killed node again with the same arguments.
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].running() {
            self.kill(i);
        }
        self.spawn(i);
    }

    pub fn running(&self) -> Vec<usize> {
        self.nodes.iter().filter(|n| n.running() && !n.paused).map(|n| n.index).collect()
    }

    pub async fn admin_of(&self, i: usize) -> Result<AdminClient<Channel>, tonic::transport::Error> {
        let ch = tonic::transport::Endpoint::from_shared(self.nodes[i].endpoint())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .connect()
            .await?;
        Ok(AdminClient::new(ch).max_decoding_message_size(64 << 20))
    }

    /// An admin client of any running node.
    pub async fn admin(&self) -> AdminClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in self.running() {
                if let Ok(c) = self.admin_of(i).await {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "no volumed answers\n{}", self.logs_tail(30));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the catalog is ready and `nodes` nodes are up.
    pub async fn wait_ready(&self, nodes: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            for i in self.running() {
                let Ok(mut c) = self.admin_of(i).await else { continue };
                match c.cluster_status(pb::ClusterStatusRequest {}).await {
                    Ok(s) if s.get_ref().ready => {
                        if let Ok(l) = c.list_nodes(pb::ListNodesRequest {}).await {
                            let up = l.get_ref().nodes.iter().filter(|n| n.state == pb::NodeState::Up as i32).count();
                            if up >= nodes {
                                return;
                            }
                            last = format!("{up} of {nodes} nodes up");
                        }
                    }
                    Ok(s) => last = format!("not ready: {:?}", s.get_ref()),
                    Err(e) => last = e.to_string(),
                }
                break;
            }
            assert!(Instant::now() < deadline, "cluster not ready after {timeout:?}: {last}\n{}", self.logs_tail(40));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn create_volume(&self, name: &str, size: u64, replicas: u32) -> pb::Volume {
        let mut c = self.admin().await;
        match c
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                replica_count: replicas,
                ..Default::default()
            })
            .await
        {
            Ok(v) => v.into_inner(),
            Err(e) => panic!("create volume {name}: {e}\n{}", self.logs_tail(40)),
        }
    }

    pub async fn get_volume(&self, key: &str) -> pb::Volume {
        let mut c = self.admin().await;
        c.get_volume(pb::GetVolumeRequest { id_or_name: key.into() }).await.expect("get volume").into_inner()
    }

    /// Waits until `pred` holds for the volume (or panics with its state).
    pub async fn wait_volume(
        &self,
        key: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&pb::Volume) -> bool,
    ) -> pb::Volume {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let mut c = self.admin().await;
            if let Ok(v) = c.get_volume(pb::GetVolumeRequest { id_or_name: key.into() }).await {
                let v = v.into_inner();
                if pred(&v) {
                    return v;
                }
                last = Some(v);
            }
            assert!(
                Instant::now() < deadline,
                "volume {key}: {what} not reached in {timeout:?}; last state: {last:#?}\n{}",
                self.logs_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Index of the node with this Raft id.
    pub async fn index_of(&self, node_id: u64) -> usize {
        let mut c = self.admin().await;
        let nodes = c.list_nodes(pb::ListNodesRequest {}).await.expect("list nodes").into_inner().nodes;
        let name = nodes.iter().find(|n| n.node_id == node_id).map(|n| n.name.clone()).expect("node id known");
        self.nodes.iter().position(|n| n.name == name).expect("node of this cluster")
    }

    pub async fn leader_index(&self, volume: &str) -> usize {
        let v = self.wait_volume(volume, Duration::from_secs(30), "a leader", |v| v.leader_node_id != 0).await;
        self.index_of(v.leader_node_id).await
    }

    pub async fn catalog_leader_index(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = self.admin().await;
            if let Ok(s) = c.cluster_status(pb::ClusterStatusRequest {}).await {
                let l = s.get_ref().catalog_leader_id;
                if l != 0 {
                    return self.index_of(l).await;
                }
            }
            assert!(Instant::now() < deadline, "no catalog leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the catalog leader has a heartbeat of node `i` sent
    /// after `since` (so volume reports it answers with are that new too).
    pub async fn wait_heard_from(&self, i: usize, since: Instant, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let name = self.nodes[i].name.clone();
        let mut last = None;
        loop {
            let mut c = self.admin().await;
            if let Ok(r) = c.list_nodes(pb::ListNodesRequest {}).await {
                let n = r.into_inner().nodes.into_iter().find(|n| n.name == name);
                if let Some(n) = &n {
                    if Duration::from_millis(n.last_heartbeat_ms_ago) < since.elapsed()
                        && n.state == pb::NodeState::Up as i32
                    {
                        return;
                    }
                }
                last = n;
            }
            assert!(Instant::now() < deadline, "no heartbeat from {name} since {:?} ago: {last:?}", since.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Raft id of node `i` (from the catalog's node table).
    pub async fn node_id(&self, i: usize) -> u64 {
        let mut c = self.admin().await;
        let nodes = c.list_nodes(pb::ListNodesRequest {}).await.expect("list nodes").into_inner().nodes;
        nodes.iter().find(|n| n.name == self.nodes[i].name).map(|n| n.node_id).expect("node in catalog")
    }

    /// NBD endpoints: the nodes in `first` (in that order), then every
    /// other node of the cluster. A dead node refuses at once, so the list
    /// may name nodes that are down.
    pub fn nbd_endpoints(&self, first: &[usize]) -> StaticEndpoints {
        let mut order: Vec<usize> = first.to_vec();
        order.extend((0..self.nodes.len()).filter(|i| !first.contains(i)));
        StaticEndpoints(order.into_iter().map(|i| self.nodes[i].nbd_addr()).collect())
    }

    /// A reconnecting NBD client of `export` (a volume id), connected
    /// through the nodes in `first` first.
    pub async fn nbd_client(&self, export: &str, first: &[usize], opts: ClientOptions) -> Arc<NbdClient> {
        match NbdClient::connect(Arc::new(self.nbd_endpoints(first)), export.to_string(), opts).await {
            Ok(c) => c,
            Err(e) => panic!("NBD connect to {export}: {e}\n{}", self.logs_tail(30)),
        }
    }

    /// How many lines of node `i`'s log contain every one of `needles`.
    pub fn log_count(&self, i: usize, needles: &[&str]) -> usize {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        text.lines().filter(|l| needles.iter().all(|n| l.contains(n))).count()
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!("--- {} ({}) ---\n", n.name, n.log.display()));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_some() {
                self.kill(i);
            }
        }
        crate::tools::unmount_below(self.dir.path());
        if std::env::var_os("VOLUMED_KEEP_TEST_DIRS").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("keeping {}", p.display());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")));
        }
    }
}
