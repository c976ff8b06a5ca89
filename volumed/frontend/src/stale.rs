//! Leftovers of an earlier volumed run (crash, kill, restart).
//!
//! FUSE+loop devices do not survive their daemon: the FUSE connection dies
//! with the process (the mount answers ENOTCONN), so the loop device above
//! it fails all I/O. They are cleaned up here; one still mounted by a
//! filesystem is marked `in_use` and set to vanish at its last close.
//! Kernel NBD devices do survive (the kernel waits `dead_conn_timeout` for
//! new sockets) and are only reported, for [`crate::kernel_nbd::reconnect`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{kernel_nbd, loopdev, mountinfo, FrontendKind};

/// One volume's leftovers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleDevice {
    pub volume_id: String,
    pub kind: FrontendKind,
    /// `/dev/loopN` or `/dev/nbdN`, if one was found.
    pub device_path: Option<PathBuf>,
    /// Kernel NBD: the device index, for [`crate::kernel_nbd::reconnect`].
    pub nbd_index: Option<u32>,
    /// FUSE+loop: the FUSE mount point, if it was still mounted.
    pub fuse_mountpoint: Option<PathBuf>,
    /// The device is still mounted or held open: its data path is broken
    /// until its user lets go (FUSE+loop), or it is waiting for a reconnect
    /// (kernel NBD).
    pub in_use: bool,
    /// Nothing of it is left (all removed).
    pub cleaned: bool,
    /// What could not be cleaned, if anything.
    pub error: Option<String>,
}

impl StaleDevice {
    fn new(volume_id: &str, kind: FrontendKind) -> Self {
        StaleDevice {
            volume_id: volume_id.to_string(),
            kind,
            device_path: None,
            nbd_index: None,
            fuse_mountpoint: None,
            in_use: false,
            cleaned: false,
            error: None,
        }
    }
}

/// The volume id of a path under `<run_dir>/fuse/`.
fn volume_of(fuse_root: &Path, path: &Path) -> Option<String> {
    let rest = path.strip_prefix(fuse_root).ok()?;
    let first = rest.components().next()?;
    first.as_os_str().to_str().map(str::to_string)
}

/// Finds and cleans up what earlier runs left under `run_dir` (FUSE mounts
/// under `<run_dir>/fuse/`, loop devices bound to files there, empty mount
/// point directories) and reports volumed's kernel NBD devices. Call it at
/// start-up, before attaching anything: live devices of this process would
/// be torn down too. Blocking.
pub fn recover_stale(run_dir: &Path) -> Vec<StaleDevice> {
    let fuse_root = run_dir.join("fuse");
    // Canonical form, as the kernel reports paths.
    let fuse_root = fuse_root.canonicalize().unwrap_or(fuse_root);
    let mut found: BTreeMap<String, StaleDevice> = BTreeMap::new();

    let loops: Vec<(u32, PathBuf)> =
        loopdev::list_bound().into_iter().filter(|(_, backing)| backing.starts_with(&fuse_root)).collect();
    let mounts: Vec<PathBuf> = mountinfo::read()
        .into_iter()
        .filter(|m| m.fs_type == "fuse" || m.fs_type.starts_with("fuse."))
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&fuse_root) && p != &fuse_root)
        .collect();

    for (n, backing) in &loops {
        let Some(id) = volume_of(&fuse_root, backing) else {
            continue;
        };
        let entry = found.entry(id.clone()).or_insert_with(|| StaleDevice::new(&id, FrontendKind::FuseLoop));
        let dev = loopdev::device_path(*n);
        entry.device_path = Some(dev.clone());
        if crate::fuse_loop::claimed_exclusively(&dev) {
            entry.in_use = true;
        }
        // Unbinds now, or (in use) at the last close.
        if let Err(e) = loopdev::clear_number(*n) {
            entry.error = Some(format!("LOOP_CLR_FD on {}: {e}", dev.display()));
        } else if !entry.in_use && !loopdev::wait_released(*n, backing, Duration::from_secs(2)) {
            entry.in_use = true;
        }
    }

    for mp in &mounts {
        let Some(id) = volume_of(&fuse_root, mp) else {
            continue;
        };
        let entry = found.entry(id.clone()).or_insert_with(|| StaleDevice::new(&id, FrontendKind::FuseLoop));
        entry.fuse_mountpoint = Some(mp.clone());
        // A loop device still bound to the file keeps the mount busy:
        // detach it from the tree, the kernel frees it with the loop.
        let res = match nix::mount::umount2(mp.as_path(), nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) => nix::mount::umount2(mp.as_path(), nix::mount::MntFlags::MNT_DETACH),
            other => other,
        };
        if let Err(e) = res {
            if e != nix::errno::Errno::EINVAL {
                let msg = format!("unmount {}: {e}", mp.display());
                entry.error = Some(match entry.error.take() {
                    Some(prev) => format!("{prev}; {msg}"),
                    None => msg,
                });
            }
        }
    }

    // Mount point directories (with or without a mount found above).
    if let Ok(dir) = std::fs::read_dir(&fuse_root) {
        for d in dir.flatten() {
            let path = d.path();
            let Some(id) = volume_of(&fuse_root, &path) else {
                continue;
            };
            if mountinfo::is_mount_point(&path) {
                continue;
            }
            let is_ours = path.is_dir() && std::fs::read_dir(&path).map(|mut e| e.next().is_none()).unwrap_or(false);
            if !is_ours {
                continue;
            }
            match std::fs::remove_dir(&path) {
                Ok(()) => {
                    found.entry(id.clone()).or_insert_with(|| StaleDevice::new(&id, FrontendKind::FuseLoop));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    let entry =
                        found.entry(id.clone()).or_insert_with(|| StaleDevice::new(&id, FrontendKind::FuseLoop));
                    entry.error = Some(format!("remove {}: {e}", path.display()));
                }
            }
        }
    }

    for entry in found.values_mut() {
        let dir_gone = !fuse_root.join(&entry.volume_id).exists();
        let mount_gone = entry.fuse_mountpoint.as_ref().is_none_or(|mp| !mountinfo::is_mount_point(mp));
        entry.cleaned = entry.error.is_none() && !entry.in_use && dir_gone && mount_gone;
    }

    let mut out: Vec<StaleDevice> = found.into_values().collect();
    for (index, id) in kernel_nbd::list_ours() {
        let mut s = StaleDevice::new(&id, FrontendKind::KernelNbd);
        s.device_path = Some(kernel_nbd::device_path(index));
        s.nbd_index = Some(index);
        s.in_use = true;
        out.push(s);
    }
    for s in &out {
        tracing::warn!(
            volume_id = %s.volume_id,
            frontend = %s.kind,
            device = ?s.device_path,
            in_use = s.in_use,
            cleaned = s.cleaned,
            error = ?s.error,
            "found a device left by an earlier run"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_from_paths() {
        let root = Path::new("/run/v/fuse");
        assert_eq!(volume_of(root, Path::new("/run/v/fuse/pvc-1/disk")).as_deref(), Some("pvc-1"));
        assert_eq!(volume_of(root, Path::new("/run/v/fuse/pvc-2")).as_deref(), Some("pvc-2"));
        assert_eq!(volume_of(root, Path::new("/run/other/disk")), None);
        assert_eq!(volume_of(root, root), None);
    }

    #[test]
    fn nothing_found_in_an_empty_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let found: Vec<_> =
            recover_stale(dir.path()).into_iter().filter(|s| s.kind == FrontendKind::FuseLoop).collect();
        assert!(found.is_empty(), "{found:?}");
    }
}
