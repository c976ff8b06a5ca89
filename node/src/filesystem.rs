//! Filesystem volumes: stage = (format when blank) + mount at the staging
//! path; publish = bind mount staging -> target. Each step checks what is
//! already there first, so repeating a call is harmless and a path holding
//! something else is reported, never overwritten.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use volumed_csi::errors::CsiError;
use volumed_csi::params::FsType;

use crate::fsgroup;
use crate::mount::{self, MountOptions};
use crate::mountinfo::{self, MountInfo};
use crate::probe::{self, Content};

pub(crate) fn table_err(e: io::Error) -> CsiError {
    CsiError::Internal(format!("reading the mount table: {e}"))
}

/// The device number of the block device node at `path`.
pub fn rdev(path: &Path) -> Result<u64, CsiError> {
    let m = std::fs::metadata(path).map_err(|e| CsiError::Internal(format!("{}: {e}", path.display())))?;
    if !m.file_type().is_block_device() {
        return Err(CsiError::Internal(format!("{} is not a block device", path.display())));
    }
    Ok(m.rdev())
}

fn dev_name(dev: u64) -> String {
    format!("{}:{}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
}

/// Makes `dir` an empty directory ready to be mounted on.
pub(crate) fn prepare_empty_dir(dir: &Path, what: &str) -> Result<(), CsiError> {
    std::fs::create_dir_all(dir).map_err(|e| CsiError::Internal(format!("creating {what} {}: {e}", dir.display())))?;
    let meta =
        std::fs::symlink_metadata(dir).map_err(|e| CsiError::Internal(format!("{what} {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(CsiError::FailedPrecondition(format!("{what} {} exists and is not a directory", dir.display())));
    }
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| CsiError::Internal(format!("{what} {}: {e}", dir.display())))?;
    if entries.next().is_some() {
        return Err(CsiError::FailedPrecondition(format!(
            "{what} {} is not empty; refusing to mount over its content",
            dir.display()
        )));
    }
    Ok(())
}

pub struct Stage<'a> {
    pub volume_id: &'a str,
    pub device: &'a Path,
    pub staging: &'a Path,
    /// `None`: keep whatever filesystem is there, ext4 when blank.
    pub fs: Option<FsType>,
    pub options: &'a MountOptions,
    pub readonly: bool,
    pub mount_group: Option<u32>,
}

/// What is mounted at the staging path, when it is this volume's device.
fn staged(s: &Stage<'_>, dev: u64) -> Result<Option<MountInfo>, CsiError> {
    let Some(m) = mountinfo::mount_at(s.staging).map_err(table_err)? else {
        return Ok(None);
    };
    if m.dev() != dev {
        return Err(CsiError::FailedPrecondition(format!(
            "staging path {} already holds a mount of {} ({} on device {}), not volume {} \
             (device {} = {})",
            s.staging.display(),
            m.source,
            m.fs_type,
            dev_name(m.dev()),
            s.volume_id,
            s.device.display(),
            dev_name(dev)
        )));
    }
    Ok(Some(m))
}

pub async fn stage(s: Stage<'_>) -> Result<(), CsiError> {
    let dev = rdev(s.device)?;
    if let Some(m) = staged(&s, dev)? {
        if let Some(fs) = s.fs {
            if m.fs_type != fs.as_str() {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {} is staged at {} with {}, now asked for {fs}",
                    s.volume_id,
                    s.staging.display(),
                    m.fs_type
                )));
            }
        }
        if m.read_only() != s.readonly {
            return Err(CsiError::AlreadyExists(format!(
                "volume {} is staged at {} read-only={}, now asked read-only={}",
                s.volume_id,
                s.staging.display(),
                m.read_only(),
                s.readonly
            )));
        }
        return Ok(());
    }
    prepare_empty_dir(s.staging, "staging path")?;
    let fs = match probe::probe(s.device).await? {
        Content::Blank if s.readonly => {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} (device {}) is blank and is staged read-only: nothing to mount",
                s.volume_id,
                s.device.display()
            )))
        }
        Content::Blank => {
            let fs = s.fs.unwrap_or(FsType::Ext4);
            crate::format::mkfs(s.device, fs).await?;
            fs
        }
        Content::Filesystem(found) => match (FsType::parse(&found), s.fs) {
            (Some(f), None) => f,
            (Some(f), Some(w)) if f == w => f,
            (Some(f), Some(w)) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {} (device {}) holds {f}, {w} was requested; refusing to reformat a \
                     volume with data",
                    s.volume_id,
                    s.device.display()
                )))
            }
            (None, _) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {} (device {}) holds a {found} filesystem, which the plugin does not \
                     mount (supported: {}); refusing to reformat it",
                    s.volume_id,
                    s.device.display(),
                    FsType::SUPPORTED
                )))
            }
        },
        Content::Other(what) => {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} (device {}) holds {what}; refusing to format over it",
                s.volume_id,
                s.device.display()
            )))
        }
    };
    mount::mount_device(s.device, s.staging, fs, s.options, s.readonly)
        .map_err(|e| e.context(format!("volume {}", s.volume_id)))?;
    if let (Some(gid), false) = (s.mount_group, s.readonly) {
        if let Err(e) = fsgroup::apply(s.staging, gid) {
            let _ = mount::unmount_all(s.staging);
            return Err(CsiError::Internal(format!(
                "volume {}: giving group {gid} access to {}: {e}",
                s.volume_id,
                s.staging.display()
            )));
        }
    }
    tracing::info!(device = %s.device.display(), staging = %s.staging.display(), %fs, "volume staged");
    Ok(())
}

/// Bind-mounts the staged filesystem at `staging` onto `target`.
pub fn publish(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    readonly: bool,
    options: &MountOptions,
) -> Result<(), CsiError> {
    let mounts = mountinfo::read().map_err(table_err)?;
    let staged = mountinfo::find(&mounts, staging).cloned().ok_or_else(|| {
        CsiError::FailedPrecondition(format!(
            "volume {volume_id} is not staged at {} (call NodeStageVolume first)",
            staging.display()
        ))
    })?;
    let readonly = readonly || staged.read_only();
    if let Some(m) = mountinfo::find(&mounts, target) {
        if m.dev() == staged.dev() && m.root == staged.root {
            if m.read_only() == readonly {
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "volume {volume_id} is published at {} read-only={}, now asked read-only={readonly}",
                target.display(),
                m.read_only()
            )));
        }
        return Err(CsiError::AlreadyExists(format!(
            "target path {} already holds a mount of {} ({}), not volume {volume_id}",
            target.display(),
            m.source,
            m.fs_type
        )));
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if !m.is_dir() => {
            return Err(CsiError::FailedPrecondition(format!(
                "target path {} exists and is not a directory",
                target.display()
            )))
        }
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(target)
            .map_err(|e| CsiError::Internal(format!("creating target path {}: {e}", target.display())))?,
    }
    mount::bind(staging, target, readonly, options.per_mount_flags())
        .map_err(|e| e.context(format!("volume {volume_id}")))?;
    tracing::info!(staging = %staging.display(), target = %target.display(), readonly, "volume published");
    Ok(())
}

/// Unmounts whatever is at `target` and removes the directory or file the
/// plugin created there. Safe on any partially cleaned state.
pub fn unpublish(volume_id: &str, target: &Path) -> Result<(), CsiError> {
    mount::unmount_all(target).map_err(|e| e.context(format!("volume {volume_id}")))?;
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CsiError::Internal(format!("{}: {e}", target.display()))),
        Ok(m) if m.is_dir() => std::fs::remove_dir(target).map_err(|e| {
            if e.kind() == io::ErrorKind::DirectoryNotEmpty {
                CsiError::FailedPrecondition(format!(
                    "volume {volume_id}: {} is not a mount point and holds files; not removing them",
                    target.display()
                ))
            } else {
                CsiError::Internal(format!("removing {}: {e}", target.display()))
            }
        }),
        Ok(_) => {
            std::fs::remove_file(target).map_err(|e| CsiError::Internal(format!("removing {}: {e}", target.display())))
        }
    }
}

/// Unmounts the staging path; the directory itself belongs to the CO.
pub fn unstage(volume_id: &str, staging: &Path) -> Result<(), CsiError> {
    mount::unmount_all(staging).map_err(|e| e.context(format!("volume {volume_id}")))
}
