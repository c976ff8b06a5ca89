//! Test bench for the node plugin on this machine's kernel: real loop
//! devices over sparse files, real mkfs/mount/bind, the real CSI Node and
//! Identity services over a real unix socket.
//!
//! Only the volumed daemon is stood in for: [`LoopVolumed`] implements the
//! node-local volumed contract (`LocalVolumed`: attach = a loop device over
//! the volume's backing file) because volumed itself is not runnable yet.
//! Everything the node plugin does to devices and mounts is real. Tests
//! need root (mounts, loop devices).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;
use tonic::{Code, Status};
use volumed_csi::proto::identity_client::IdentityClient;
use volumed_csi::proto::node_client::NodeClient;
use volumed_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use volumed_csi::proto::{self as csi, VolumeCapability};
use volumed_csi::serve::{self, Endpoint};
use volumed_csi_node::{mountinfo, LocalVolumed};
use volumed_proto::volumed::v1 as vd;

pub use volumed_csi::access::Mode;

pub const NODE_ID: u64 = 7;
pub const MIB: u64 = 1 << 20;

#[derive(Default)]
struct Vol {
    file: PathBuf,
    device: Option<PathBuf>,
    readonly: bool,
    healthy: bool,
    reason: String,
}

/// The node-local volumed stand-in: attach = `losetup` of the volume's
/// backing file (read-only when asked), detach = `losetup -d` of exactly
/// that device.
pub struct LoopVolumed {
    dir: PathBuf,
    vols: Mutex<HashMap<String, Vol>>,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopVolumed {
    pub fn new(dir: PathBuf) -> LoopVolumed {
        LoopVolumed {
            dir,
            vols: Mutex::new(HashMap::new()),
        }
    }

    /// A new volume: a sparse backing file of `size` bytes.
    pub fn add_volume(&self, id: &str, size: u64) -> PathBuf {
        let file = self.dir.join(format!("{id}.img"));
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(size).unwrap();
        self.vols.lock().unwrap().insert(
            id.to_string(),
            Vol {
                file: file.clone(),
                healthy: true,
                ..Default::default()
            },
        );
        file
    }

    pub fn backing_file(&self, id: &str) -> PathBuf {
        self.vols.lock().unwrap()[id].file.clone()
    }

    pub fn device(&self, id: &str) -> Option<PathBuf> {
        self.vols
            .lock()
            .unwrap()
            .get(id)
            .and_then(|v| v.device.clone())
    }

    pub fn set_health(&self, id: &str, healthy: bool, reason: &str) {
        let mut v = self.vols.lock().unwrap();
        let vol = v.get_mut(id).unwrap();
        vol.healthy = healthy;
        vol.reason = reason.to_string();
    }

    /// Grows the backing file and tells the loop driver (what volumed does
    /// after ResizeVolume).
    pub fn grow(&self, id: &str, size: u64) {
        let (file, dev) = {
            let v = self.vols.lock().unwrap();
            (v[id].file.clone(), v[id].device.clone())
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(size)
            .unwrap();
        if let Some(d) = dev {
            run("losetup", &["-c", d.to_str().unwrap()]).unwrap();
        }
    }

    /// Releases every loop device this stand-in attached.
    pub fn detach_all(&self) {
        let mut v = self.vols.lock().unwrap();
        for vol in v.values_mut() {
            if let Some(d) = vol.device.take() {
                if let Err(e) = run("losetup", &["-d", d.to_str().unwrap()]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}

#[tonic::async_trait]
impl LocalVolumed for LoopVolumed {
    async fn node_info(&self) -> Result<vd::NodeInfoResponse, Status> {
        Ok(vd::NodeInfoResponse {
            node_id: NODE_ID,
            node_name: "bench".into(),
            labels: [
                (
                    "topology.kubernetes.io/zone".to_string(),
                    "zone-a".to_string(),
                ),
                ("kubernetes.io/hostname".to_string(), "bench".to_string()),
            ]
            .into(),
            max_volumes: 16,
            api_addr: String::new(),
        })
    }

    async fn attach(&self, req: vd::AttachRequest) -> Result<vd::AttachResponse, Status> {
        let mut v = self.vols.lock().unwrap();
        let vol = v
            .get_mut(&req.volume)
            .ok_or_else(|| Status::not_found(format!("no volume {}", req.volume)))?;
        if vol.device.is_none() {
            let file = vol.file.to_str().unwrap().to_string();
            let mut args = vec!["-f", "--show"];
            if req.readonly {
                args.push("-r");
            }
            args.push(&file);
            let dev = run("losetup", &args).map_err(Status::internal)?;
            vol.device = Some(PathBuf::from(dev));
            vol.readonly = req.readonly;
        }
        let size = std::fs::metadata(&vol.file).unwrap().len();
        Ok(vd::AttachResponse {
            volume_id: req.volume.clone(),
            device: vol.device.as_ref().unwrap().to_string_lossy().into_owned(),
            frontend: "loop-bench".into(),
            generation: 1,
            size_bytes: size,
        })
    }

    async fn detach(&self, volume: &str) -> Result<bool, Status> {
        let mut v = self.vols.lock().unwrap();
        let Some(vol) = v.get_mut(volume) else {
            return Ok(false);
        };
        match vol.device.take() {
            Some(d) => {
                run("losetup", &["-d", d.to_str().unwrap()]).map_err(Status::internal)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn list_attachments(&self) -> Result<vd::ListAttachmentsResponse, Status> {
        let v = self.vols.lock().unwrap();
        Ok(vd::ListAttachmentsResponse {
            attachments: v
                .iter()
                .filter_map(|(id, vol)| {
                    vol.device.as_ref().map(|d| vd::LocalAttachment {
                        volume_id: id.clone(),
                        volume_name: format!("pvc-{id}"),
                        device: d.to_string_lossy().into_owned(),
                        frontend: "loop-bench".into(),
                        generation: 1,
                        healthy: vol.healthy,
                        reason: vol.reason.clone(),
                        state: "attached".into(),
                        readonly: vol.readonly,
                        size_bytes: 0,
                    })
                })
                .collect(),
            mounts: Vec::new(),
        })
    }

    async fn device_health(&self, volume: &str) -> Result<vd::DeviceHealthResponse, Status> {
        let v = self.vols.lock().unwrap();
        let vol = v
            .get(volume)
            .ok_or_else(|| Status::not_found(volume.to_string()))?;
        Ok(vd::DeviceHealthResponse {
            attached: vol.device.is_some(),
            healthy: vol.healthy,
            reason: vol.reason.clone(),
        })
    }

    async fn mount(&self, _req: vd::MountRequest) -> Result<vd::MountResponse, Status> {
        Err(Status::unimplemented(
            "file volumes are not part of this bench",
        ))
    }

    async fn unmount(&self, _target: &Path) -> Result<bool, Status> {
        Ok(false)
    }
}

/// A node plugin served on a unix socket, with its kubelet dir, loop
/// devices and mounts cleaned up on drop (also when a test fails).
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub kubelet: PathBuf,
    pub volumed: Arc<LoopVolumed>,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount filesystems and attach loop devices: run them as root"
    );
}

impl Bench {
    pub async fn start() -> Bench {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let volumed = Arc::new(LoopVolumed::new(images));
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
            volumed_csi_node::serve_with(
                server_volumed,
                "csi.volumed.dev",
                server_kubelet,
                &server_endpoint,
                shutdown,
            )
            .await
            .unwrap();
        });
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let ch = serve::channel(&endpoint);
        Bench {
            dir,
            kubelet,
            volumed,
            node: NodeClient::new(ch.clone()),
            identity: IdentityClient::new(ch),
            shutdown: Some(tx),
        }
    }

    /// A path under the kubelet dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.kubelet.join(rel)
    }

    pub fn p(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    pub async fn stage(
        &self,
        id: &str,
        staging: &str,
        cap: VolumeCapability,
    ) -> Result<(), Status> {
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

    pub async fn stats(
        &self,
        id: &str,
        path: &str,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
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

    fn cleanup(&self) {
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
        self.volumed.detach_all();
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.cleanup();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
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

/// `blkid -p` UUID of a device or image.
pub fn fs_uuid(path: &Path) -> String {
    run(
        "blkid",
        &["-p", "-s", "UUID", "-o", "value", path.to_str().unwrap()],
    )
    .unwrap_or_default()
}

pub fn fs_type(path: &Path) -> String {
    run(
        "blkid",
        &["-p", "-s", "TYPE", "-o", "value", path.to_str().unwrap()],
    )
    .unwrap_or_default()
}

pub fn loop_of(file: &Path) -> Vec<String> {
    run("losetup", &["-j", file.to_str().unwrap()])
        .unwrap_or_default()
        .lines()
        .map(|s| s.to_string())
        .collect()
}
