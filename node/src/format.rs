//! Making a filesystem on a blank device. Callers probe first
//! ([`crate::probe`]); the tools are also run without their force flags, so
//! they refuse on their own when they see an existing filesystem.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use volumed_csi::errors::CsiError;
use volumed_csi::params::FsType;

use crate::cmd;

/// Formatting a large thin volume over the network can take a while.
const MKFS_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn mkfs(device: &Path, fs: FsType) -> Result<(), CsiError> {
    let dev = device.as_os_str();
    let (program, args): (&str, Vec<&OsStr>) = match fs {
        // nodiscard: the device is known blank (probed), a whole-device
        // TRIM would only cost time.
        FsType::Ext4 => ("mkfs.ext4", vec![OsStr::new("-q"), OsStr::new("-E"), OsStr::new("nodiscard"), dev]),
        FsType::Xfs => ("mkfs.xfs", vec![OsStr::new("-q"), OsStr::new("-K"), dev]),
    };
    let out = cmd::run(program, &args, MKFS_TIMEOUT)
        .await
        .map_err(|e| CsiError::Internal(format!("formatting {} as {fs}: {e}", device.display())))?;
    if !out.success() {
        return Err(CsiError::Internal(format!(
            "{program} {} failed (exit {:?}): {}",
            device.display(),
            out.code,
            out.diagnostics()
        )));
    }
    tracing::info!(device = %device.display(), %fs, "filesystem created");
    Ok(())
}
