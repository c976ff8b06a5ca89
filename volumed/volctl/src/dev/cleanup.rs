//! What a stopped dev cluster can leave behind in the kernel: mounts under
//! the state directory (FUSE mounts of attached volumes, filesystems on
//! them) and loop devices whose backing file lives there. Loop devices are
//! shared with everything else on the machine, so exactly those are
//! released, nothing else.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};

/// `LOOP_CLR_FD` from linux/loop.h.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

/// Undoes the octal escapes of /proc/*/mountinfo (`\040` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points strictly below `dir` in a mountinfo text, deepest first.
pub fn mounts_below(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Lazily unmounts everything below `dirs` (stacked mounts too). Returns
/// what was unmounted, and what could not be.
pub fn unmount_below(dirs: &[&Path]) -> (Vec<PathBuf>, Vec<String>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    // Several rounds: a lazy unmount can uncover a mount stacked below it.
    for round in 0..=8 {
        let info = match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(i) => i,
            Err(e) => return (done, vec![format!("read /proc/self/mountinfo: {e}")]),
        };
        let mut targets: Vec<PathBuf> = dirs.iter().flat_map(|d| mounts_below(&info, d)).collect();
        targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        targets.dedup();
        if targets.is_empty() {
            return (done, Vec::new());
        }
        if round == 8 {
            failed.extend(targets.iter().map(|t| format!("{} is still mounted", t.display())));
            break;
        }
        failed.clear();
        for t in targets {
            match umount2(&t, MntFlags::MNT_DETACH) {
                Ok(()) => done.push(t),
                Err(e) => failed.push(format!("umount -l {}: {e}", t.display())),
            }
        }
    }
    (done, failed)
}

/// A loop device and the file behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing_file: PathBuf,
}

/// Bound loop devices whose backing file is below one of `dirs`.
pub fn loops_below(dirs: &[&Path]) -> Vec<LoopDevice> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(bf) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let bf = bf.trim_end_matches('\n');
        let bf = PathBuf::from(bf.strip_suffix(" (deleted)").unwrap_or(bf));
        if dirs.iter().any(|d| bf.starts_with(d)) {
            out.push(LoopDevice { device: PathBuf::from("/dev").join(&name), backing_file: bf });
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Detaches one loop device. A device still open elsewhere (mounted) is
/// marked to detach when its last user closes it; the kernel answers 0.
pub fn release_loop(dev: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(dev)?;
    // SAFETY: LOOP_CLR_FD takes no argument and only affects this device.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: nothing bound any more (released meanwhile).
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /tmp/dev rw shared:2 - tmpfs tmpfs rw
41 40 0:51 / /tmp/dev/node-1/run/fuse/v1 rw,nosuid - fuse.volumed volumed rw
42 41 7:3 / /tmp/dev/node-1/run/fuse/v1/mnt rw - ext4 /dev/loop3 rw
43 22 0:52 / /tmp/dev-other/x rw - tmpfs tmpfs rw
44 40 0:53 / /tmp/dev/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn mounts_below_the_state_dir_deepest_first() {
        let m = mounts_below(INFO, Path::new("/tmp/dev"));
        assert_eq!(
            m,
            vec![
                PathBuf::from("/tmp/dev/node-1/run/fuse/v1/mnt"),
                PathBuf::from("/tmp/dev/node-1/run/fuse/v1"),
                PathBuf::from("/tmp/dev/with space"),
            ]
        );
    }

    #[test]
    fn unescaping() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("plain\\"), "plain\\");
        assert_eq!(unescape("x\\09"), "x\\09");
    }
}
