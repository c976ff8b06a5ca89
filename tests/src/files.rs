//! File volumes in test clusters: create one, mount it on a node through
//! NodeLocal, and small helpers the file suites share.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use volumed_proto::volumed::v1 as pb;

use crate::cluster::Cluster;

/// The kernel may cache names and attributes this long (volumed's TTL).
pub const ATTR_TTL: Duration = Duration::from_millis(1100);

impl Cluster {
    pub async fn create_file_volume(&self, name: &str, size: u64, replicas: u32) -> pb::Volume {
        let mut c = self.admin().await;
        match c
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                replica_count: replicas,
                kind: pb::VolumeKind::File as i32,
                ..Default::default()
            })
            .await
        {
            Ok(v) => v.into_inner(),
            Err(e) => panic!("create file volume {name}: {e}\n{}", self.logs_tail(40)),
        }
    }

    /// Mounts `volume` on node `i` at `target` (read-write, RWX).
    pub async fn mount(&self, i: usize, volume: &str, target: &Path) -> Result<pb::MountResponse, tonic::Status> {
        let mut c = self.local(i).await;
        c.mount(pb::MountRequest {
            volume: volume.into(),
            target: target.display().to_string(),
            readonly: false,
            mode: pb::AccessMode::MultiNodeMultiWriter as i32,
            options: Vec::new(),
        })
        .await
        .map(|r| r.into_inner())
    }

    pub async fn unmount(&self, i: usize, target: &Path) -> Result<bool, tonic::Status> {
        let mut c = self.local(i).await;
        c.unmount(pb::UnmountRequest { target: target.display().to_string() }).await.map(|r| r.into_inner().existed)
    }

    pub async fn local_mounts(&self, i: usize) -> Vec<pb::LocalMount> {
        let mut c = self.local(i).await;
        c.list_attachments(pb::ListAttachmentsRequest {}).await.expect("list attachments").into_inner().mounts
    }

    /// Waits until node `i` reports a healthy mount at `target`.
    pub async fn wait_mount_healthy(&self, i: usize, target: &Path, timeout: Duration) -> pb::LocalMount {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.local_mounts(i).await.into_iter().find(|m| Path::new(&m.target) == target);
            if let Some(m) = &found {
                if m.healthy {
                    return m.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "mount {} on node {i} not healthy: {found:?}\n{}",
                target.display(),
                self.logs_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A directory for mount points below the cluster's directory (the
/// cluster's drop unmounts everything below it, also on test failure).
pub fn mount_dir(cluster: &Cluster, name: &str) -> PathBuf {
    let p = cluster.path().join("mnt").join(name);
    std::fs::create_dir_all(&p).expect("mount dir");
    p
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn get_xattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let n = std::ffi::CString::new(name).expect("name");
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(cpath(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `ls -lAR --time-style=full-iso` of `dir`, with `dir` itself cut out.
pub fn ls_l(dir: &Path) -> String {
    let out = crate::tools::run("ls", &["-lAnR", "--time-style=+%s.%N", dir.to_str().expect("utf-8")]);
    String::from_utf8_lossy(&out.stdout).replace(&dir.display().to_string(), "<root>")
}

/// sha256sum of every regular file below `dir`, sorted by path.
pub fn sha_tree(dir: &Path) -> String {
    let script = "cd \"$1\" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum";
    let out = crate::tools::run("sh", &["-c", script, "sh", dir.to_str().expect("utf-8")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
