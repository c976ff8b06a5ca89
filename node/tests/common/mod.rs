//! Test bench for the node plugin against a real volumed: a cluster of real
//! `volumed` processes (the multi-process harness of `volumed-tests`),
//! volumes made through the Admin API, and the real CSI Node and Identity
//! services on a unix socket, talking to node 0's node-local socket through
//! the crate's own [`GrpcLocalVolumed`]. Attach goes through volumed's
//! FUSE+loop frontend; mkfs, mounts, bind mounts and statvfs are the
//! kernel's. Tests need root.
//!
//! Most tests share one single-node cluster per test binary (each with its
//! own volumes, kubelet directory and plugin instance), started by the first
//! test and stopped when the binary exits. A test that breaks its cluster on
//! purpose starts one of its own with [`Bench::start_alone`] and runs while
//! no other test does. Needs the `volumed` binary of this workspace beside
//! the test executable (`cargo build -p volumed --bin volumed`) or in
//! `$VOLUMED_BIN`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::Channel;
use tonic::{Code, Status};
use volumed_csi::proto::identity_client::IdentityClient;
use volumed_csi::proto::node_client::NodeClient;
use volumed_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use volumed_csi::proto::{self as csi, VolumeCapability};
use volumed_csi::serve::{self, Endpoint};
use volumed_csi_node::{mountinfo, GrpcLocalVolumed, LocalVolumed};
use volumed_nbd::client::ClientOptions;
use volumed_nbd::BlockDevice;
use volumed_proto::volumed::v1 as vd;
use volumed_tests::cluster::{Cluster, ClusterOptions};
use volumed_tests::node_local;

pub use volumed_csi::access::Mode;

pub const MIB: u64 = 1 << 20;
/// `--max-volumes` of the bench's volumed (NodeGetInfo reports it).
pub const MAX_VOLUMES: u32 = 16;
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";
pub const ZONE: &str = "zone-a";
/// A well-formed volume id no cluster knows.
pub const MISSING_VOLUME: &str = "0b7f6c1e-3f2a-4c1d-9e8f-0000deadbeef";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Flags of every bench volumed: FUSE+loop (what this machine has, and what
/// the tests look for), a known attach limit, one topology label and one
/// node-level label NodeGetInfo must leave out.
fn options(nodes: usize) -> ClusterOptions {
    let extra = [
        "--frontend",
        "fuse-loop",
        "--max-volumes",
        &MAX_VOLUMES.to_string(),
        "--label",
        &format!("{ZONE_KEY}={ZONE}"),
        "--label",
        "kubernetes.io/hostname=bench",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ClusterOptions {
        nodes,
        bootstrap_expect: nodes,
        catalog_voters: if nodes >= 3 { 3 } else { 1 },
        extra_args: extra,
        ..ClusterOptions::default()
    }
}

/// Tests on the shared cluster run side by side (read); one that brings
/// nodes down runs alone (write): a frozen cluster next to others on two
/// cores would make their timers, not the code, decide the outcome.
static TURNS: RwLock<()> = RwLock::new(());

enum Turn {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

static SHARED: Mutex<Option<Arc<Cluster>>> = Mutex::new(None);
static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The single-node cluster of this test binary, started on first use.
async fn shared_cluster() -> Arc<Cluster> {
    let _starting = STARTING.lock().await;
    if let Some(c) = lock(&SHARED).clone() {
        return c;
    }
    let c = Arc::new(Cluster::start(options(1)).await);
    *lock(&SHARED) = Some(c.clone());
    // Statics are never dropped: stop it when the test binary exits, which
    // libtest does through exit() both when tests pass and when they fail.
    // SAFETY: registers a plain function without captured state.
    unsafe { libc::atexit(stop_shared_cluster) };
    c
}

extern "C" fn stop_shared_cluster() {
    let taken = lock(&SHARED).take();
    if let Some(c) = taken {
        // A panic must not cross the C boundary.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| release(c)));
    }
}

/// Drops the cluster (SIGKILL of its processes, lazy unmounts below its
/// directory) and releases loop devices volumed left bound to files there
/// (a test that died holding a mount).
fn release(c: Arc<Cluster>) {
    let reaper = LoopReaper(Some(c.path().to_path_buf()));
    drop(c);
    drop(reaper);
}

/// Releases, on drop, loop devices still bound to files below a cluster's
/// directory. Dropped after the cluster (whose drop kills volumed and
/// lazily unmounts its FUSE mounts, but leaves the loops over them).
struct LoopReaper(Option<PathBuf>);

impl Drop for LoopReaper {
    fn drop(&mut self) {
        let Some(root) = &self.0 else { return };
        for (dev, _) in node_local::loops_below(root) {
            if let Err(e) = run("losetup", &["-d", &dev.display().to_string()]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount filesystems and attach loop devices: run them as root"
    );
}

/// The node plugin served on a unix socket, talking to the volumed of
/// `cluster.nodes[node]`. On drop (also when a test fails) it unmounts
/// everything below its kubelet dir, detaches its volumes and deletes them.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub kubelet: PathBuf,
    pub cluster: Arc<Cluster>,
    /// Index of the node the plugin runs on.
    pub node_index: usize,
    replicas: u32,
    /// The client the plugin uses (the crate's real implementation).
    pub volumed: Arc<GrpcLocalVolumed>,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    volumes: Mutex<Vec<String>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// After `cluster`: fields drop in order, and a cluster of the bench's
    /// own goes down with it.
    _reaper: LoopReaper,
    _turn: Turn,
}

impl Bench {
    /// A plugin on the shared single-node cluster (volumes: 1 replica).
    pub async fn start() -> Bench {
        require_root();
        let turn = Turn::Shared(TURNS.read().unwrap_or_else(|p| p.into_inner()));
        let cluster = shared_cluster().await;
        Bench::serve(cluster, 0, 1, turn).await
    }

    /// A plugin on node 0 of a fresh cluster of `nodes` nodes owned by this
    /// bench (volumes get one replica per node), while no other test runs.
    pub async fn start_alone(nodes: usize) -> Bench {
        require_root();
        let turn = Turn::Alone(TURNS.write().unwrap_or_else(|p| p.into_inner()));
        let cluster = Arc::new(Cluster::start(options(nodes)).await);
        Bench::serve(cluster, 0, nodes as u32, turn).await
    }

    async fn serve(cluster: Arc<Cluster>, node_index: usize, replicas: u32, turn: Turn) -> Bench {
        let dir = tempfile::Builder::new().prefix("csi-node-bench-").tempdir().unwrap();
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        // Waits until the node-local API answers.
        cluster.local(node_index).await;
        let volumed = Arc::new(GrpcLocalVolumed::new(&cluster.local_socket(node_index)));
        let sock = dir.path().join("csi.sock");
        let endpoint = Endpoint::Unix(sock.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server_volumed = volumed.clone();
        let server_kubelet = kubelet.clone();
        let server_endpoint = endpoint.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            volumed_csi_node::serve_with(server_volumed, "csi.volumed.dev", server_kubelet, &server_endpoint, shutdown)
                .await
                .unwrap();
        });
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ch = serve::channel(&endpoint);
        let own = matches!(turn, Turn::Alone(_));
        Bench {
            _reaper: LoopReaper(own.then(|| cluster.path().to_path_buf())),
            dir,
            kubelet,
            cluster,
            node_index,
            replicas,
            volumed,
            node: NodeClient::new(ch.clone()),
            identity: IdentityClient::new(ch),
            volumes: Mutex::new(Vec::new()),
            shutdown: Some(tx),
            _turn: turn,
        }
    }

    /// Creates a volume through the Admin API (deleted when the bench
    /// drops); returns its id, which is what CSI calls the volume.
    pub async fn create_volume(&self, name: &str, size: u64) -> String {
        let v = self.cluster.create_volume(name, size, self.replicas).await;
        lock(&self.volumes).push(v.id.clone());
        v.id
    }

    /// Admin ResizeVolume (what ControllerExpandVolume does).
    pub async fn resize(&self, id: &str, size: u64) {
        let mut admin = self.cluster.admin().await;
        if let Err(e) = admin.resize_volume(vd::ResizeVolumeRequest { id_or_name: id.into(), size_bytes: size }).await {
            panic!("resize {id} to {size}: {e}\n{}", self.cluster.logs_tail(30));
        }
    }

    /// This node's attachment of the volume, as its volumed lists it.
    pub async fn attachment(&self, id: &str) -> Option<vd::LocalAttachment> {
        let list = self.volumed.list_attachments().await.expect("list attachments");
        list.attachments.into_iter().find(|a| a.volume_id == id)
    }

    /// The device volumed attached the volume as.
    pub async fn device(&self, id: &str) -> Option<PathBuf> {
        self.attachment(id).await.map(|a| PathBuf::from(a.device))
    }

    /// Where volumed's FUSE+loop frontend keeps the volume's image file.
    pub fn fuse_dir(&self, id: &str) -> PathBuf {
        self.cluster.nodes[self.node_index].run_dir.join("fuse").join(id)
    }

    /// Nothing of the volume is left on the node: no attachment, no loop
    /// device over its FUSE image, no FUSE mount, no catalog attachment.
    pub async fn assert_detached(&self, id: &str) {
        assert_eq!(self.attachment(id).await, None, "volume {id} is still attached");
        let fuse = self.fuse_dir(id);
        let loops = node_local::loops_below(&fuse);
        assert!(loops.is_empty(), "loop devices of {id} left: {loops:?}");
        let mounts = node_local::mounts_below(&fuse);
        assert!(mounts.is_empty(), "FUSE mounts of {id} left: {mounts:?}");
        // Detach unpublishes at once; the node's report of the device it
        // had leaves GetVolume with the next heartbeat.
        self.cluster
            .wait_volume(id, Duration::from_secs(15), "no attachments in the catalog", |v| v.attachments.is_empty())
            .await;
    }

    /// Writes through an NBD connection of its own (an admin connection:
    /// allowed only while no writer has the volume attached).
    pub async fn write_volume(&self, id: &str, offset: u64, data: &[u8]) {
        let c = self.cluster.nbd_client(id, &[self.node_index], ClientOptions::default()).await;
        c.write(offset, bytes::Bytes::copy_from_slice(data), true).await.expect("NBD write");
        c.flush().await.expect("NBD flush");
        c.close().await;
    }

    /// Reads through an NBD connection of its own (what the volume holds,
    /// not what some page cache on this node holds).
    pub async fn read_volume(&self, id: &str, offset: u64, len: u32) -> Vec<u8> {
        let c = self.cluster.nbd_client(id, &[self.node_index], ClientOptions::default()).await;
        let data = c.read(offset, len).await.expect("NBD read");
        c.close().await;
        data.to_vec()
    }

    /// A path under the kubelet dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.kubelet.join(rel)
    }

    pub fn p(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    pub async fn stage(&self, id: &str, staging: &str, cap: VolumeCapability) -> Result<(), Status> {
        self.stage_ctx(id, staging, cap, HashMap::new()).await
    }

    pub async fn stage_ctx(
        &self,
        id: &str,
        staging: &str,
        cap: VolumeCapability,
        publish_context: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                publish_context,
                staging_target_path: self.p(staging),
                volume_capability: Some(cap),
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&self, id: &str, staging: &str) -> Result<(), Status> {
        self.node
            .clone()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: self.p(staging),
            })
            .await
            .map(drop)
    }

    pub async fn publish(
        &self,
        id: &str,
        staging: &str,
        target: &str,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), Status> {
        self.node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                publish_context: HashMap::new(),
                staging_target_path: self.p(staging),
                target_path: self.p(target),
                volume_capability: Some(cap),
                readonly,
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&self, id: &str, target: &str) -> Result<(), Status> {
        self.node
            .clone()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: self.p(target),
            })
            .await
            .map(drop)
    }

    pub async fn stats(&self, id: &str, path: &str) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        self.node
            .clone()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: self.p(path),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Everything mounted under the kubelet dir.
    pub fn mounts(&self) -> Vec<mountinfo::MountInfo> {
        let all = mountinfo::read().unwrap();
        mountinfo::under(&all, &self.kubelet).cloned().collect()
    }

    pub fn mount_at(&self, rel: &str) -> Option<mountinfo::MountInfo> {
        mountinfo::mount_at(&self.path(rel)).unwrap()
    }

    fn unmount_all(&self) {
        // Deepest mounts first; lazily as a last resort so a failed test
        // never leaves a mount behind for the next run.
        for _ in 0..32 {
            let mut ms = self.mounts();
            if ms.is_empty() {
                break;
            }
            ms.sort_by_key(|m| std::cmp::Reverse(m.mount_point.as_os_str().len()));
            for m in ms {
                if nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::empty()).is_err() {
                    let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

/// Detaches and deletes `volumes` (each step best effort), bounded in time.
async fn release_volumes(cluster: &Cluster, socket: &Path, volumes: &[String]) {
    let local = GrpcLocalVolumed::new(socket);
    for id in volumes {
        if let Err(s) = local.detach(id).await {
            eprintln!("cleanup: detaching {id}: {}", s.message());
        }
    }
    let mut admin = cluster.admin().await;
    for id in volumes {
        if let Err(s) = admin.delete_volume(vd::DeleteVolumeRequest { id_or_name: id.clone() }).await {
            eprintln!("cleanup: deleting {id}: {}", s.message());
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.unmount_all();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let volumes = std::mem::take(&mut *lock(&self.volumes));
        let cluster = self.cluster.clone();
        let socket = cluster.local_socket(self.node_index);
        // On a runtime of its own: Drop cannot await, and the test's
        // runtime may be the one unwinding.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let work = release_volumes(&cluster, &socket, &volumes);
                if tokio::time::timeout(Duration::from_secs(120), work).await.is_err() {
                    eprintln!("cleanup: releasing volumes {volumes:?} timed out");
                }
            });
        })
        .join();
    }
}

/// Volumed nodes stopped with SIGSTOP (alive, sockets open, answering
/// nothing: a partition) until this guard drops, also when a test fails.
pub struct Frozen {
    pids: Vec<i32>,
}

impl Frozen {
    pub fn nodes(cluster: &Cluster, nodes: &[usize]) -> Frozen {
        let pids: Vec<i32> = nodes.iter().map(|&i| cluster.nodes[i].pid().expect("node runs") as i32).collect();
        for &p in &pids {
            kill(Pid::from_raw(p), Signal::SIGSTOP).expect("SIGSTOP");
        }
        Frozen { pids }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &p in &self.pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
        }
    }
}

pub fn mount_cap(fs: &str, mode: Mode, flags: &[&str], group: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: group.into(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn ext4() -> VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter, &[], "")
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code) -> Status {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "message: {}", s.message());
            s
        }
    }
}

/// `blkid -p` UUID of a device.
pub fn fs_uuid(path: &Path) -> String {
    run("blkid", &["-p", "-s", "UUID", "-o", "value", path.to_str().unwrap()]).unwrap_or_default()
}

pub fn fs_type(path: &Path) -> String {
    run("blkid", &["-p", "-s", "TYPE", "-o", "value", path.to_str().unwrap()]).unwrap_or_default()
}

/// Size of a block device in bytes.
pub fn device_size(path: &Path) -> u64 {
    run("blockdev", &["--getsize64", path.to_str().unwrap()]).unwrap().parse().unwrap()
}

/// Device number of a device node.
pub fn rdev(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().rdev()
}
