//! Raw block volumes: stage binds the device node onto a file
//! `<staging>/<volume_id>` (so "staged" is visible in the mount table and
//! survives a plugin restart); publish binds that file onto the target file.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use volumed_csi::errors::CsiError;

use crate::filesystem::{rdev, table_err};
use crate::mount;
use crate::mountinfo;

pub fn staged_path(staging: &Path, volume_id: &str) -> PathBuf {
    staging.join(volume_id)
}

/// Creates an empty regular file to bind a device node onto.
fn ensure_file(path: &Path, what: &str) -> Result<(), CsiError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| CsiError::Internal(format!("creating {}: {e}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => {
            Err(CsiError::FailedPrecondition(format!("{what} {} exists and is not a regular file", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map(drop)
            .map_err(|e| CsiError::Internal(format!("creating {what} {}: {e}", path.display()))),
        Err(e) => Err(CsiError::Internal(format!("{what} {}: {e}", path.display()))),
    }
}

pub fn stage(volume_id: &str, device: &Path, staging: &Path) -> Result<(), CsiError> {
    let dev = rdev(device)?;
    let file = staged_path(staging, volume_id);
    if mountinfo::mount_at(&file).map_err(table_err)?.is_some() {
        return match rdev(&file) {
            Ok(d) if d == dev => Ok(()),
            _ => Err(CsiError::FailedPrecondition(format!(
                "{} already holds another mount, not volume {volume_id} (device {})",
                file.display(),
                device.display()
            ))),
        };
    }
    if let Some(m) = mountinfo::mount_at(staging).map_err(table_err)? {
        return Err(CsiError::FailedPrecondition(format!(
            "staging path {} holds a mount of {} ({}); a raw block volume cannot be staged there",
            staging.display(),
            m.source,
            m.fs_type
        )));
    }
    std::fs::create_dir_all(staging)
        .map_err(|e| CsiError::Internal(format!("creating staging path {}: {e}", staging.display())))?;
    ensure_file(&file, "staged device file")?;
    mount::bind(device, &file, false, MsFlags::empty()).map_err(|e| e.context(format!("volume {volume_id}")))?;
    tracing::info!(device = %device.display(), staged = %file.display(), "block volume staged");
    Ok(())
}

pub fn publish(volume_id: &str, staging: &Path, target: &Path, readonly: bool) -> Result<(), CsiError> {
    let src = staged_path(staging, volume_id);
    let mounts = mountinfo::read().map_err(table_err)?;
    if mountinfo::find(&mounts, &src).is_none() {
        return Err(CsiError::FailedPrecondition(format!(
            "volume {volume_id} is not staged at {} (call NodeStageVolume first)",
            staging.display()
        )));
    }
    let dev = rdev(&src)?;
    if let Some(m) = mountinfo::find(&mounts, target) {
        return match rdev(target) {
            Ok(d) if d == dev && m.read_only() == readonly => Ok(()),
            Ok(d) if d == dev => Err(CsiError::AlreadyExists(format!(
                "volume {volume_id} is published at {} read-only={}, now asked read-only={readonly}",
                target.display(),
                m.read_only()
            ))),
            _ => Err(CsiError::AlreadyExists(format!(
                "target path {} already holds another mount, not volume {volume_id}",
                target.display()
            ))),
        };
    }
    ensure_file(target, "target path")?;
    mount::bind(&src, target, readonly, MsFlags::empty()).map_err(|e| e.context(format!("volume {volume_id}")))?;
    tracing::info!(target = %target.display(), readonly, "block volume published");
    Ok(())
}

/// Unmounts and removes the staged device file. Safe on partial state.
pub fn unstage(volume_id: &str, staging: &Path) -> Result<(), CsiError> {
    let file = staged_path(staging, volume_id);
    mount::unmount_all(&file).map_err(|e| e.context(format!("volume {volume_id}")))?;
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CsiError::Internal(format!("removing {}: {e}", file.display()))),
    }
}
