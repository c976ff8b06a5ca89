//! Test support: a file-backed BlockDevice and cleanup guards.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use nix::fcntl::{fallocate, FallocateFlags};
use volumed_frontend::AttachedDevice;
use volumed_nbd::{BlockDevice, BlockError};

/// A BlockDevice over a sparse temp file, counting what it is asked to do.
pub struct FileDevice {
    file: Arc<File>,
    pub path: PathBuf,
    size: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    /// Largest write request seen.
    pub max_write: AtomicU64,
    /// When set, reads and writes fail with an I/O error.
    pub fail: AtomicBool,
}

impl FileDevice {
    pub fn create(dir: &Path, size: u64) -> Arc<Self> {
        let path = dir.join("volume.img");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(size).unwrap();
        Arc::new(FileDevice {
            file: Arc::new(file),
            path,
            size: AtomicU64::new(size),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            max_write: AtomicU64::new(0),
            fail: AtomicBool::new(false),
        })
    }

    pub fn grow(&self, new_size: u64) {
        self.file.set_len(new_size).unwrap();
        self.size.store(new_size, Ordering::SeqCst);
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size.load(Ordering::SeqCst) => Ok(()),
            _ => Err(BlockError::OutOfRange),
        }
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, BlockError>> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&file))
                .await
                .map_err(|e| BlockError::Io(e.to_string()))?
                .map_err(|e| BlockError::Io(e.to_string()))
        })
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BlockError::Io("injected read failure".into())) });
        }
        if let Err(e) = self.check(offset, len as u64) {
            return Box::pin(async move { Err(e) });
        }
        self.run(move |f| {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.max_write.fetch_max(data.len() as u64, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BlockError::Io("injected write failure".into())) });
        }
        if let Err(e) = self.check(offset, data.len() as u64) {
            return Box::pin(async move { Err(e) });
        }
        self.run(move |f| {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.run(|f| f.sync_all())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        self.trims.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.check(offset, len) {
            return Box::pin(async move { Err(e) });
        }
        self.run(move |f| {
            fallocate(
                f,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(std::io::Error::from)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _fua: bool,
        _may_trim: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.check(offset, len) {
            return Box::pin(async move { Err(e) });
        }
        self.run(move |f| {
            fallocate(
                f,
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(std::io::Error::from)
        })
    }
}

/// Detaches (best effort, through the device's own Drop) if the test did
/// not. Declare it before any MountGuard on the device so it drops last.
pub struct DeviceGuard(pub Option<AttachedDevice>);

impl DeviceGuard {
    pub fn dev(&self) -> &AttachedDevice {
        self.0.as_ref().unwrap()
    }

    pub async fn detach(&mut self) {
        let dev = self.0.take().unwrap();
        dev.detach().await.unwrap();
    }
}

/// Unmounts (lazily if it must) and removes the mount point on drop.
pub struct MountGuard {
    pub path: PathBuf,
    mounted: bool,
}

impl MountGuard {
    pub fn mount(dev: &Path, path: PathBuf, opts: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        run_ok(Command::new("mount").arg("-o").arg(opts).arg(dev).arg(&path));
        MountGuard { path, mounted: true }
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            run_ok(Command::new("umount").arg(&self.path));
            self.mounted = false;
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount").arg(&self.path).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub fn run(cmd: &mut Command) -> Output {
    // Child tools must not go through the environment's proxies.
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(v);
    }
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `losetup -l` line for a device: (sizelimit/size, dio, log-sec, back-file).
pub fn losetup_info(dev: &Path) -> Option<(String, String, String, String)> {
    let out = run_ok(
        Command::new("losetup").args(["-l", "-O", "NAME,DIO,LOG-SEC,BACK-FILE", "--raw", "--noheadings"]).arg(dev),
    );
    let line = out.lines().next()?;
    let mut f = line.splitn(4, ' ');
    Some((f.next()?.to_string(), f.next()?.to_string(), f.next()?.to_string(), f.next()?.to_string()))
}

pub fn blockdev_size(dev: &Path) -> u64 {
    run_ok(Command::new("blockdev").arg("--getsize64").arg(dev)).trim().parse().unwrap()
}

/// Nothing of the device is left: no mount under run_dir, no loop device
/// bound to a file there, no directory for the volume.
pub fn assert_nothing_left(run_dir: &Path, volume_id: &str, loop_dev: &Path) {
    let run_dir = run_dir.canonicalize().unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let run_str = run_dir.to_str().unwrap();
    assert!(!mountinfo.contains(run_str), "a mount under {run_str} is left:\n{mountinfo}");
    let all = run_ok(Command::new("losetup").arg("-a"));
    assert!(!all.contains(run_str), "a loop device bound under {run_str} is left:\n{all}");
    let name = loop_dev.file_name().unwrap().to_str().unwrap();
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
    assert!(!backing.contains(run_str), "{name} is still bound to {backing}");
    assert!(!run_dir.join("fuse").join(volume_id).exists(), "mount point directory left");
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a tree of files with known content under `root` and returns a
/// `sha256sum` manifest with paths relative to `root`.
pub fn write_tree(root: &Path) -> String {
    let sizes = [0usize, 1, 511, 4095, 4096, 4097, 65536, (1 << 20) + 7, 3 << 20];
    for (i, size) in sizes.iter().enumerate() {
        let dir = root.join(format!("d{}/sub{}", i % 3, i % 2));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.bin")), pattern(i as u64 + 1, *size)).unwrap();
    }
    let out = run_ok(
        Command::new("sh").arg("-c").arg("find . -type f -print0 | sort -z | xargs -0 sha256sum").current_dir(root),
    );
    assert_eq!(out.lines().count(), sizes.len());
    out
}

pub fn check_tree(root: &Path, manifest: &str) {
    let manifest_path = std::env::temp_dir().join(format!(
        "volumed-frontend-manifest-{}-{}",
        std::process::id(),
        root.display().to_string().replace('/', "_")
    ));
    std::fs::write(&manifest_path, manifest).unwrap();
    let out = run(Command::new("sha256sum").arg("--quiet").arg("-c").arg(&manifest_path).current_dir(root));
    let _ = std::fs::remove_file(&manifest_path);
    assert!(
        out.status.success(),
        "checksums differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
