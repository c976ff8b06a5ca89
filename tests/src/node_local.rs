//! The node-local API of a test cluster's volumed (`NodeLocal` on
//! `<run_dir>/volumed.sock`), and what the attach suites need around it:
//! a cleanup guard for mounts and loop devices, file trees with known
//! hashes, and checks that nothing of a device is left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rand::{RngCore, SeedableRng};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::node_local_client::NodeLocalClient;

use crate::cluster::Cluster;
use crate::tools::try_run;

pub type Local = NodeLocalClient<Channel>;

/// A NodeLocal client over a unix socket (connects lazily on first use).
pub async fn connect(socket: &Path) -> Result<Local, tonic::transport::Error> {
    let path = socket.to_path_buf();
    let ch = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(120))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(NodeLocalClient::new(ch))
}

impl Cluster {
    /// Path of node `i`'s node-local socket.
    pub fn local_socket(&self, i: usize) -> PathBuf {
        self.nodes[i].run_dir.join("volumed.sock")
    }

    /// A NodeLocal client of node `i`, waiting (up to 30 s) for its socket.
    pub async fn local(&self, i: usize) -> Local {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = connect(&self.local_socket(i)).await {
                if c.node_info(pb::NodeInfoRequest {}).await.is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "node {i}'s node-local API does not answer\n{}", self.logs_tail(30));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Attaches `volume` on node `i` (RWO unless `mode` says otherwise).
    pub async fn attach(
        &self,
        i: usize,
        volume: &str,
        mode: pb::AccessMode,
        force: bool,
    ) -> Result<pb::AttachResponse, tonic::Status> {
        let mut c = self.local(i).await;
        c.attach(pb::AttachRequest {
            volume: volume.into(),
            mode: mode as i32,
            readonly: false,
            force,
            frontend: pb::Frontend::Auto as i32,
        })
        .await
        .map(|r| r.into_inner())
    }

    pub async fn detach(&self, i: usize, volume: &str) -> Result<bool, tonic::Status> {
        let mut c = self.local(i).await;
        c.detach(pb::DetachRequest { volume: volume.into() }).await.map(|r| r.into_inner().existed)
    }

    pub async fn attachments(&self, i: usize) -> Vec<pb::LocalAttachment> {
        let mut c = self.local(i).await;
        c.list_attachments(pb::ListAttachmentsRequest {}).await.expect("list attachments").into_inner().attachments
    }

    /// Waits until node `i` reports `volume` in a state `pred` accepts.
    pub async fn wait_attachment(
        &self,
        i: usize,
        volume: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&pb::LocalAttachment) -> bool,
    ) -> pb::LocalAttachment {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let list = self.attachments(i).await;
            if let Some(a) = list.iter().find(|a| a.volume_id == volume || a.volume_name == volume) {
                if pred(a) {
                    return a.clone();
                }
                last = Some(a.clone());
            }
            assert!(
                Instant::now() < deadline,
                "attachment of {volume} on node {i}: {what} not reached in {timeout:?}; last: {last:#?}\n{}",
                self.logs_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Undoes, on drop (also when a test fails), the mounts a test made and
/// the loop devices volumed bound for it — only those whose backing file
/// lies below the cluster's directory, so nothing of other work on the
/// machine is touched.
pub struct Cleanup {
    root: PathBuf,
    mounts: Mutex<Vec<PathBuf>>,
}

impl Cleanup {
    pub fn new(cluster: &Cluster) -> Cleanup {
        Cleanup { root: cluster.path().to_path_buf(), mounts: Mutex::new(Vec::new()) }
    }

    /// Mounts `dev` at `dir` (created) and records it for cleanup.
    pub fn mount(&self, dev: &str, dir: &Path, opts: &[&str]) {
        std::fs::create_dir_all(dir).expect("mount point");
        let mut args: Vec<&str> = Vec::new();
        if !opts.is_empty() {
            args.push("-o");
        }
        let joined = opts.join(",");
        if !opts.is_empty() {
            args.push(&joined);
        }
        let d = dir.to_str().expect("utf-8 path");
        args.extend([dev, d]);
        crate::tools::run("mount", &args);
        self.mounts.lock().unwrap_or_else(|p| p.into_inner()).push(dir.to_path_buf());
    }

    pub fn umount(&self, dir: &Path) {
        crate::tools::run("umount", &[dir.to_str().expect("utf-8 path")]);
        self.mounts.lock().unwrap_or_else(|p| p.into_inner()).retain(|m| m != dir);
    }

    /// Loop devices bound to files below the cluster directory.
    pub fn our_loops(&self) -> Vec<(PathBuf, PathBuf)> {
        loops_below(&self.root)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mounts: Vec<PathBuf> = self.mounts.lock().unwrap_or_else(|p| p.into_inner()).drain(..).rev().collect();
        for m in mounts {
            let p = m.display().to_string();
            if !try_run("umount", &[&p]).status.success() {
                let _ = try_run("umount", &["-l", &p]);
            }
        }
        for (dev, _) in loops_below(&self.root) {
            let _ = try_run("losetup", &["-d", &dev.display().to_string()]);
        }
    }
}

/// `(device, backing file)` of every loop device whose backing file is
/// below `root`.
pub fn loops_below(root: &Path) -> Vec<(PathBuf, PathBuf)> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else { return out };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else { continue };
        let backing = PathBuf::from(backing.trim().trim_end_matches(" (deleted)"));
        if backing.starts_with(&root) {
            out.push((PathBuf::from(format!("/dev/{name}")), backing));
        }
    }
    out
}

/// Mount points (from /proc/self/mountinfo) below `root`.
pub fn mounts_below(root: &Path) -> Vec<String> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    crate::tools::mounts_below(&root)
}

/// Names of the threads of process `pid`.
pub fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// Asserts that nothing of node `i`'s devices is left: no FUSE mount below
/// its run directory, no loop device bound to a file there (also checked
/// with `losetup -a`), no FUSE session thread in volumed.
pub fn assert_no_devices_left(cluster: &Cluster, i: usize) {
    let run = &cluster.nodes[i].run_dir;
    let mounts = mounts_below(run);
    assert!(mounts.is_empty(), "FUSE mounts left below {}: {mounts:?}", run.display());
    let loops = loops_below(run);
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
    let losetup = String::from_utf8_lossy(&crate::tools::run("losetup", &["-a"]).stdout).into_owned();
    let run_s = run.canonicalize().unwrap_or_else(|_| run.clone()).display().to_string();
    assert!(!losetup.contains(&run_s), "losetup -a still lists a device of {run_s}:\n{losetup}");
    if let Some(pid) = cluster.nodes[i].pid() {
        let fuse: Vec<String> = thread_names(pid)
            .into_iter()
            .filter(|t| t.starts_with("volumed-fuse") || t.starts_with("fuser-"))
            .collect();
        assert!(fuse.is_empty(), "FUSE session threads left in volumed: {fuse:?}");
    }
    let fuse_dir = run.join("fuse");
    let left: Vec<_> =
        std::fs::read_dir(&fuse_dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "mount point directories left in {}: {left:?}", fuse_dir.display());
}

/// A tree of files with random content: relative path → CRC32 and length.
pub type Tree = BTreeMap<String, (u32, u64)>;

/// Writes `files` files (sizes from 0 to `max_len`) in nested directories
/// below `dir` and returns their hashes.
pub fn write_tree(dir: &Path, files: usize, max_len: usize, seed: u64) -> Tree {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Tree::new();
    for n in 0..files {
        let rel = format!("d{}/e{}/f{n}.bin", n % 7, n % 3);
        let len = if n == 0 { 0 } else { (rng.next_u64() as usize) % max_len };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &data).expect("write file");
        out.insert(rel, (crc32fast::hash(&data), len as u64));
    }
    out
}

/// Hashes the files of `tree` below `dir` and compares.
pub fn verify_tree(dir: &Path, tree: &Tree) {
    for (rel, (crc, len)) in tree {
        let data = std::fs::read(dir.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        assert_eq!(data.len() as u64, *len, "{rel}: length differs");
        assert_eq!(crc32fast::hash(&data), *crc, "{rel}: content differs");
    }
}

/// Drops the page cache so reads come from the device.
pub fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
