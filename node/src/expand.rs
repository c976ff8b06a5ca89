//! Growing a mounted filesystem to its (already grown) device: resize2fs
//! for ext4, xfs_growfs for xfs. Both work online.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use volumed_csi::errors::CsiError;

use crate::cmd;

const GROW_TIMEOUT: Duration = Duration::from_secs(600);

/// Grows the `fs_type` filesystem on `device`, mounted at `mount_point`.
pub async fn grow(fs_type: &str, device: &Path, mount_point: &Path) -> Result<(), CsiError> {
    let (program, arg): (&str, &OsStr) = match fs_type {
        "ext4" => ("resize2fs", device.as_os_str()),
        "xfs" => ("xfs_growfs", mount_point.as_os_str()),
        other => {
            return Err(CsiError::InvalidArgument(format!(
                "{} holds {other}, which the plugin cannot grow (ext4, xfs)",
                mount_point.display()
            )))
        }
    };
    let out = cmd::run(program, &[arg], GROW_TIMEOUT).await.map_err(|e| {
        let msg = format!("growing {fs_type} on {} at {}: {e}", device.display(), mount_point.display());
        match e {
            cmd::CmdError::Timeout { .. } => CsiError::DeadlineExceeded(msg),
            cmd::CmdError::Spawn { .. } => CsiError::Internal(msg),
        }
    })?;
    if out.success() {
        tracing::info!(device = %device.display(), mount_point = %mount_point.display(), fs_type, "filesystem grown");
        return Ok(());
    }
    let diag = out.diagnostics();
    let msg = format!(
        "{program} on {} (mounted at {}) failed (exit {:?}): {diag}",
        device.display(),
        mount_point.display(),
        out.code
    );
    // EPERM from the kernel's online-resize ioctl: the node plugin lacks the
    // privilege (CAP_SYS_RESOURCE) - retrying will not help until it has it.
    if diag.contains("Operation not permitted") || diag.contains("Permission denied") {
        return Err(CsiError::FailedPrecondition(format!(
            "{msg}; the kernel refused the online resize (the node plugin needs CAP_SYS_ADMIN and \
             CAP_SYS_RESOURCE), the volume keeps its old filesystem size"
        )));
    }
    Err(CsiError::Internal(msg))
}
