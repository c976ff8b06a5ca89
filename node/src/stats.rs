//! Volume usage: statvfs for filesystems, the device size for raw block.

use std::os::unix::io::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use volumed_csi::capacity::to_i64;
use volumed_csi::errors::CsiError;
use volumed_csi::proto::{volume_usage::Unit, VolumeUsage};

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Size in bytes of the block device at `path` (a device node or a bind of
/// one).
pub fn block_device_size(path: &Path) -> Result<u64, CsiError> {
    let f = std::fs::File::open(path)
        .map_err(|e| CsiError::Internal(format!("opening block device {}: {e}", path.display())))?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`; the fd is open.
    unsafe { blk_get_size64(f.as_raw_fd(), &mut size) }
        .map_err(|e| CsiError::Internal(format!("BLKGETSIZE64 on {}: {}", path.display(), e.desc())))?;
    Ok(size)
}

/// Bytes and inodes of the filesystem mounted at `path`. An I/O error from
/// the filesystem is returned as `Err(Errno::EIO)` so the caller can report
/// the volume as abnormal rather than fail.
pub fn filesystem_usage(path: &Path) -> Result<Vec<VolumeUsage>, Errno> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frsize = st.fragment_size() as u64;
    let blocks = st.blocks() as u64;
    let bfree = st.blocks_free() as u64;
    let bavail = st.blocks_available() as u64;
    let files = st.files() as u64;
    let ffree = st.files_free() as u64;
    let favail = st.files_available() as u64;
    Ok(vec![
        VolumeUsage {
            available: to_i64(bavail.saturating_mul(frsize)),
            total: to_i64(blocks.saturating_mul(frsize)),
            used: to_i64(blocks.saturating_sub(bfree).saturating_mul(frsize)),
            unit: Unit::Bytes as i32,
        },
        VolumeUsage {
            available: to_i64(favail),
            total: to_i64(files),
            used: to_i64(files.saturating_sub(ffree)),
            unit: Unit::Inodes as i32,
        },
    ])
}

pub fn block_usage(path: &Path) -> Result<Vec<VolumeUsage>, CsiError> {
    let size = block_device_size(path)?;
    Ok(vec![VolumeUsage { available: 0, total: to_i64(size), used: 0, unit: Unit::Bytes as i32 }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statvfs_of_a_real_filesystem() {
        let u = filesystem_usage(Path::new("/")).unwrap();
        assert_eq!(u[0].unit, Unit::Bytes as i32);
        assert!(u[0].total > 0 && u[0].used > 0 && u[0].available <= u[0].total);
        assert_eq!(u[1].unit, Unit::Inodes as i32);
        assert!(u[1].total >= u[1].used);
    }
}
