//! Shared driver of the cluster suites: CSI clients for the controller and
//! every node of a [`ClusterUnderTest`], request builders, and a guard that
//! unpublishes, unstages and deletes what a test created even when it
//! fails.
//!
//! The tests of one binary share a `volctl dev up` cluster (3 volumed
//! nodes, the controller plugin, a node plugin per node), started by the
//! first test and torn down with `volctl dev down` when the binary exits;
//! they take turns on it, each with volume names of its own and a guard
//! that removes what it made. Setting
//! `VOLUMED_CLUSTER_STATE` to the state directory of a running cluster runs
//! the suites against that one instead. Node tests mount filesystems: run
//! as root. `cargo build --workspace --bins` first: the suites start the
//! workspace's volctl, volumed and plugins.

#![allow(dead_code)]

mod dev;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tonic::transport::Channel;
use tonic::{Code, Status};
use volumed_csi::harness::{ClusterJson, ClusterUnderTest, NodeUnderTest, STATE_DIR_ENV};
use volumed_csi::proto::controller_client::ControllerClient;
use volumed_csi::proto::group_controller_client::GroupControllerClient;
use volumed_csi::proto::identity_client::IdentityClient;
use volumed_csi::proto::node_client::NodeClient;
use volumed_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use volumed_csi::proto::{self as csi, VolumeCapability};
use volumed_csi::serve::{self, Endpoint};

pub use volumed_csi::access::Mode;

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// The cluster one test runs against.
pub struct TestCluster {
    pub json: ClusterJson,
    /// The shared dev cluster's state dir (None for `$VOLUMED_CLUSTER_STATE`).
    dev_dir: Option<PathBuf>,
    _serial: MutexGuard<'static, ()>,
}

impl TestCluster {
    /// The state directory (`cluster.json`, logs).
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.dev_dir.clone().or_else(|| std::env::var_os(STATE_DIR_ENV).map(PathBuf::from))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A failed test: the plugins' and nodes' own words about it.
        if std::thread::panicking() {
            if let Some(dir) = &self.dev_dir {
                dev::print_log_tails(dir);
            }
        }
    }
}

/// The binary's dev cluster, started by the first test that needs one.
static SHARED: Mutex<Option<dev::DevCluster>> = Mutex::new(None);

/// Statics are never dropped: libtest ends the binary through exit() both
/// when tests pass and when they fail, which runs this.
extern "C" fn stop_shared_cluster() {
    let cluster = SHARED.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(cluster);
}

impl ClusterUnderTest for TestCluster {
    fn controller_endpoint(&self) -> Endpoint {
        self.json.controller_endpoint()
    }
    fn node_endpoints(&self) -> Vec<NodeUnderTest> {
        self.json.node_endpoints()
    }
    fn volumed_api_endpoints(&self) -> Vec<String> {
        self.json.volumed_api_endpoints()
    }
}

/// `$VOLUMED_CLUSTER_STATE`'s cluster, else the binary's shared dev
/// cluster. Tests of one binary take turns: a cluster is several processes
/// with sub-second timers, and two tests at once on a small machine measure
/// the scheduler.
pub fn cluster() -> TestCluster {
    static SERIAL: Mutex<()> = Mutex::new(());
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        std::env::remove_var(v);
    }
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    match ClusterJson::from_env() {
        Some(Ok(json)) => TestCluster { json, dev_dir: None, _serial: serial },
        Some(Err(e)) => panic!("{STATE_DIR_ENV}: {e}"),
        None => {
            let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
            if shared.is_none() {
                *shared = Some(dev::DevCluster::start());
                // SAFETY: registers a plain function with no arguments.
                unsafe { libc::atexit(stop_shared_cluster) };
            }
            let dir = shared.as_ref().map(|d| d.state_dir().to_path_buf()).unwrap_or_default();
            drop(shared);
            let json = ClusterJson::load(&dir).unwrap_or_else(|e| panic!("cluster.json of the dev cluster: {e}"));
            TestCluster { json, dev_dir: Some(dir), _serial: serial }
        }
    }
}

pub struct Node {
    pub info: NodeUnderTest,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
}

impl Node {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.info.kubelet_dir.join(rel)
    }

    pub fn p(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }
}

#[derive(Default)]
struct Created {
    volumes: Vec<String>,
    /// (node index, volume, path) of staged/published paths.
    published: Vec<(usize, String, String)>,
    staged: Vec<(usize, String, String)>,
    attached: Vec<(String, String)>,
}

pub struct Csi {
    pub ctrl: ControllerClient<Channel>,
    pub identity: IdentityClient<Channel>,
    pub nodes: Vec<Node>,
    created: Arc<Mutex<Created>>,
    prefix: String,
    /// For the cleanup in Drop, which needs channels of its own runtime.
    controller_endpoint: Endpoint,
    /// Last: torn down after Drop cleaned up.
    pub cluster: TestCluster,
}

impl Csi {
    /// NodeGetVolumeStats of `id` published at `path` (relative to the
    /// node's kubelet dir) on node `node`.
    pub async fn stats(&self, node: usize, id: &str, path: &str) -> csi::NodeGetVolumeStatsResponse {
        self.nodes[node]
            .node
            .clone()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: self.nodes[node].p(path),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub fn connect(cluster: TestCluster) -> Csi {
        let ch = serve::channel(&cluster.controller_endpoint());
        let nodes = cluster
            .node_endpoints()
            .into_iter()
            .map(|n| {
                let ch = serve::channel(&n.endpoint);
                Node { info: n, node: NodeClient::new(ch.clone()), identity: IdentityClient::new(ch) }
            })
            .collect();
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Csi {
            ctrl: ControllerClient::new(ch.clone()),
            identity: IdentityClient::new(ch),
            nodes,
            created: Arc::new(Mutex::new(Created::default())),
            prefix: format!("csi-suite-{nanos:x}"),
            controller_endpoint: cluster.controller_endpoint(),
            cluster,
        }
    }

    /// A GroupController client on the controller's socket.
    pub fn group(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(serve::channel(&self.controller_endpoint))
    }

    /// A volume name unique to this run.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    pub async fn create(
        &self,
        name: &str,
        size: i64,
        params: &[(&str, &str)],
        caps: Vec<VolumeCapability>,
    ) -> Result<csi::Volume, Status> {
        let r = self.ctrl.clone().create_volume(create_req(name, Some((size, 0)), params, caps)).await?.into_inner();
        let v = r.volume.ok_or_else(|| Status::internal("CreateVolume returned no volume"))?;
        self.created.lock().unwrap().volumes.push(v.volume_id.clone());
        Ok(v)
    }

    pub fn track(&self, volume_id: &str) {
        self.created.lock().unwrap().volumes.push(volume_id.to_string());
    }

    pub async fn controller_publish(
        &self,
        volume_id: &str,
        node: usize,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<HashMap<String, String>, Status> {
        let r = self
            .ctrl
            .clone()
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume_id.into(),
                node_id: self.nodes[node].info.node_id.clone(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await?
            .into_inner();
        self.created.lock().unwrap().attached.push((volume_id.to_string(), self.nodes[node].info.node_id.clone()));
        Ok(r.publish_context)
    }

    pub async fn controller_unpublish(&self, volume_id: &str, node: usize) -> Result<(), Status> {
        self.ctrl
            .clone()
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                node_id: self.nodes[node].info.node_id.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn stage(
        &self,
        node: usize,
        vol: &csi::Volume,
        staging: &str,
        cap: VolumeCapability,
        publish_context: HashMap<String, String>,
    ) -> Result<(), Status> {
        let n = &self.nodes[node];
        self.created.lock().unwrap().staged.push((node, vol.volume_id.clone(), n.p(staging)));
        n.node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                publish_context,
                staging_target_path: n.p(staging),
                volume_capability: Some(cap),
                secrets: HashMap::new(),
                volume_context: vol.volume_context.clone(),
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&self, node: usize, volume_id: &str, staging: &str) -> Result<(), Status> {
        let n = &self.nodes[node];
        n.node
            .clone()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: n.p(staging),
            })
            .await
            .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn publish(
        &self,
        node: usize,
        vol: &csi::Volume,
        staging: &str,
        target: &str,
        cap: VolumeCapability,
        readonly: bool,
        publish_context: HashMap<String, String>,
    ) -> Result<(), Status> {
        let n = &self.nodes[node];
        self.created.lock().unwrap().published.push((node, vol.volume_id.clone(), n.p(target)));
        n.node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                publish_context,
                staging_target_path: n.p(staging),
                target_path: n.p(target),
                volume_capability: Some(cap),
                readonly,
                secrets: HashMap::new(),
                volume_context: vol.volume_context.clone(),
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&self, node: usize, volume_id: &str, target: &str) -> Result<(), Status> {
        let n = &self.nodes[node];
        n.node
            .clone()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: n.p(target),
            })
            .await
            .map(drop)
    }

    pub async fn delete(&self, volume_id: &str) -> Result<(), Status> {
        self.ctrl
            .clone()
            .delete_volume(csi::DeleteVolumeRequest { volume_id: volume_id.into(), ..Default::default() })
            .await
            .map(drop)
    }

    async fn cleanup_async(nodes: Vec<Endpoint>, ctrl: Endpoint, created: Created) {
        // Channels made here, on this runtime: the test's channels run their
        // connection tasks on the test runtime, which is blocked in Drop.
        let nodes: Vec<NodeClient<Channel>> = nodes.iter().map(|e| NodeClient::new(serve::channel(e))).collect();
        let mut ctrl = ControllerClient::new(serve::channel(&ctrl));
        for (i, vol, path) in created.published.iter().rev() {
            let _ = nodes[*i]
                .clone()
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: vol.clone(),
                    target_path: path.clone(),
                })
                .await;
        }
        for (i, vol, path) in created.staged.iter().rev() {
            let _ = nodes[*i]
                .clone()
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: vol.clone(),
                    staging_target_path: path.clone(),
                })
                .await;
        }
        for (vol, node) in &created.attached {
            let _ = ctrl
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: vol.clone(),
                    node_id: node.clone(),
                    ..Default::default()
                })
                .await;
        }
        for vol in &created.volumes {
            let _ = ctrl.delete_volume(csi::DeleteVolumeRequest { volume_id: vol.clone(), ..Default::default() }).await;
        }
    }
}

impl Drop for Csi {
    /// Best-effort cleanup on a fresh runtime (Drop cannot await, and the
    /// test's runtime may be the one unwinding).
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        let nodes: Vec<Endpoint> = self.nodes.iter().map(|n| n.info.endpoint.clone()).collect();
        let ctrl = self.controller_endpoint.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                // Bounded: a wedged plugin must not hang the suite.
                rt.block_on(async {
                    let work = Csi::cleanup_async(nodes, ctrl, created);
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(120), work).await;
                });
            }
        })
        .join();
    }
}

pub fn create_req(
    name: &str,
    range: Option<(i64, i64)>,
    params: &[(&str, &str)],
    caps: Vec<VolumeCapability>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range.map(|(r, l)| csi::CapacityRange { required_bytes: r, limit_bytes: l }),
        volume_capabilities: caps,
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

pub fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn ext4() -> VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

#[track_caller]
pub fn code<T: std::fmt::Debug>(r: Result<T, Status>, c: Code) -> String {
    match r {
        Ok(v) => panic!("expected {c:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), c, "{}", s.message());
            s.message().to_string()
        }
    }
}

pub const MISSING_VOLUME: &str = "0b7f6c1e-3f2a-4c1d-9e8f-0000deadbeef";
