//! Loop devices through their ioctls (linux/loop.h).
//!
//! A device is taken only through LOOP_CTL_GET_FREE and bound atomically
//! with LOOP_CONFIGURE, so a device another process grabbed in between is
//! noticed (EBUSY) and we try the next free one; we release exactly the one
//! we bound.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

pub(crate) const LO_FLAGS_READ_ONLY: u32 = 1;
pub(crate) const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub(crate) const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn new(flags: u32, file_name: &Path) -> Self {
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        };
        // The kernel shows this name only for information (LOOP_GET_STATUS);
        // the real backing path is in sysfs. Keep it NUL-terminated.
        let name = file_name.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        info
    }
}

/// How to bind a loop device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopOptions {
    pub read_only: bool,
    pub direct_io: bool,
    pub block_size: u32,
    /// Let the kernel release the device at its last close: if the daemon
    /// dies, an unused loop device does not outlive it.
    pub autoclear: bool,
}

impl LoopOptions {
    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if self.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        if self.autoclear {
            flags |= LO_FLAGS_AUTOCLEAR;
        }
        flags
    }
}

/// A loop device bound by us. Dropping it only closes our handle; call
/// [`LoopDevice::clear`] to unbind.
#[derive(Debug)]
pub(crate) struct LoopDevice {
    number: u32,
    path: PathBuf,
    file: File,
}

fn ioctl_ptr<T>(fd: &File, request: libc::c_ulong, arg: *const T) -> io::Result<libc::c_int> {
    // SAFETY: `fd` is an open descriptor and `arg` points to a live, correctly
    // laid out argument of the type this request expects (checked by the
    // callers and by the layout tests below).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ioctl_val(fd: &File, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: these requests take an integer argument, not a pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Asks /dev/loop-control for a free device number (creating one if all are
/// bound).
pub(crate) fn get_free() -> io::Result<u32> {
    let ctl = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/loop-control")?;
    let n = ioctl_val(&ctl, LOOP_CTL_GET_FREE, 0)?;
    u32::try_from(n).map_err(|_| io::Error::other("LOOP_CTL_GET_FREE returned a negative number"))
}

/// Whether the loop driver can be used here.
pub(crate) fn available() -> Result<(), String> {
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control is missing (no loop driver)".into());
    }
    Ok(())
}

fn open_node(number: u32, read_only: bool) -> io::Result<File> {
    let path = device_path(number);
    // A device just created by LOOP_CTL_GET_FREE appears in devtmpfs
    // asynchronously.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let res = OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_CLOEXEC).open(&path);
        match res {
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

pub(crate) fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

fn sys_dir(number: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{number}"))
}

/// The file a loop device is bound to, per sysfs (None when unbound).
pub(crate) fn backing_file(number: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(sys_dir(number).join("loop/backing_file")).ok()?;
    let s = s.trim_end_matches('\n');
    if s.is_empty() {
        None
    } else {
        Some(PathBuf::from(s))
    }
}

/// All bound loop devices with their backing files.
pub(crate) fn list_bound() -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|s| s.strip_prefix("loop")).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(backing) = backing_file(n) {
            out.push((n, backing));
        }
    }
    out.sort();
    out
}

/// Size of a block device in bytes per sysfs.
pub(crate) fn sysfs_size(number: u32) -> Option<u64> {
    let s = std::fs::read_to_string(sys_dir(number).join("size")).ok()?;
    s.trim().parse::<u64>().ok().map(|sectors| sectors * 512)
}

pub(crate) fn sysfs_dio(number: u32) -> bool {
    std::fs::read_to_string(sys_dir(number).join("loop/dio")).map(|s| s.trim() == "1").unwrap_or(false)
}

/// Clears a loop device we no longer hold a handle to (stale cleanup).
/// With other openers the kernel defers the release to the last close.
pub(crate) fn clear_number(number: u32) -> io::Result<()> {
    let file = open_node(number, true)?;
    match ioctl_val(&file, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits until the kernel has released `number` from `backing`.
pub(crate) fn wait_released(number: u32, backing: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match backing_file(number) {
            Some(p) if p == backing => {}
            _ => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl LoopDevice {
    /// Binds a free loop device to `backing` (opened by the caller with the
    /// access mode and O_DIRECT it wants the loop driver to use).
    pub(crate) fn bind(backing: &File, backing_path: &Path, opts: LoopOptions) -> io::Result<Self> {
        const ATTEMPTS: usize = 32;
        let mut last_err = None;
        for _ in 0..ATTEMPTS {
            let number = get_free()?;
            let file = match open_node(number, opts.read_only) {
                Ok(f) => f,
                // Removed between GET_FREE and open: take another.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let dev = LoopDevice { number, path: device_path(number), file };
            match dev.configure(backing, backing_path, opts) {
                Ok(()) => return Ok(dev),
                // Someone else bound it first; it is theirs.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no free loop device")))
    }

    fn configure(&self, backing: &File, backing_path: &Path, opts: LoopOptions) -> io::Result<()> {
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: opts.block_size,
            info: LoopInfo64::new(opts.flags(), backing_path),
            reserved: [0; 8],
        };
        match ioctl_ptr(&self.file, LOOP_CONFIGURE, &config) {
            Ok(_) => return Ok(()),
            // Kernels before 5.8 do not know LOOP_CONFIGURE.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
                tracing::debug!(device = %self.path.display(), error = %e, "LOOP_CONFIGURE refused, using LOOP_SET_FD");
            }
            Err(e) => return Err(e),
        }
        ioctl_val(&self.file, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong)?;
        // From here the device is ours: undo on any later failure.
        let rest = (|| {
            let flags = opts.flags() & !LO_FLAGS_DIRECT_IO;
            let info = LoopInfo64::new(flags, backing_path);
            ioctl_ptr(&self.file, LOOP_SET_STATUS64, &info)?;
            ioctl_val(&self.file, LOOP_SET_BLOCK_SIZE, opts.block_size as libc::c_ulong)?;
            if opts.direct_io {
                ioctl_val(&self.file, LOOP_SET_DIRECT_IO, 1)?;
            }
            Ok(())
        })();
        if let Err(e) = rest {
            let _ = self.clear();
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn number(&self) -> u32 {
        self.number
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Turns direct I/O on or off after binding.
    pub(crate) fn set_direct_io(&self, on: bool) -> io::Result<()> {
        ioctl_val(&self.file, LOOP_SET_DIRECT_IO, on as libc::c_ulong).map(|_| ())
    }

    pub(crate) fn direct_io(&self) -> bool {
        sysfs_dio(self.number)
    }

    /// Re-reads the backing file's size (after it grew).
    pub(crate) fn set_capacity(&self) -> io::Result<()> {
        ioctl_val(&self.file, LOOP_SET_CAPACITY, 0).map(|_| ())
    }

    /// Unbinds the device. If others still have it open, the kernel marks it
    /// autoclear and unbinds at their last close. Already unbound is fine.
    pub(crate) fn clear(&self) -> io::Result<()> {
        match ioctl_val(&self.file, LOOP_CLR_FD, 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn size(&self) -> Option<u64> {
        sysfs_size(self.number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_linux_uapi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_number), 40);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
    }

    #[test]
    fn file_name_is_truncated_and_terminated() {
        let long = PathBuf::from("/".repeat(100));
        let info = LoopInfo64::new(0, &long);
        assert_eq!(info.lo_file_name[LO_NAME_SIZE - 1], 0);
        assert_eq!(info.lo_file_name[0], b'/');
        let info = LoopInfo64::new(LO_FLAGS_DIRECT_IO, Path::new("/run/x/disk"));
        assert_eq!(&info.lo_file_name[..12], b"/run/x/disk\0");
        assert_eq!(info.lo_flags, 16);
    }

    #[test]
    fn option_flags() {
        let o = LoopOptions { read_only: true, direct_io: true, block_size: 4096, autoclear: true };
        assert_eq!(o.flags(), 1 | 4 | 16);
    }
}
