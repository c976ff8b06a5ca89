//! The mount table, read from /proc/self/mountinfo.
//!
//! mountinfo (unlike /proc/mounts) gives each mount's device number and the
//! root inside its filesystem, which is how a bind mount is recognised as a
//! view of a given staged volume.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    pub major: u32,
    pub minor: u32,
    /// Path inside the filesystem that is mounted here ("/" for a whole fs).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (ro/rw, nosuid, noatime...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl MountInfo {
    /// The st_dev of files under this mount.
    pub fn dev(&self) -> u64 {
        nix::sys::stat::makedev(self.major as _, self.minor as _)
    }

    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    pub fn has_option(&self, opt: &str) -> bool {
        self.options.split(',').any(|o| o == opt)
    }
}

/// Undoes the octal escapes (`\040` for space...) of mountinfo fields.
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

fn parse_line(line: &str) -> Option<MountInfo> {
    let mut fields = line.split(' ');
    let id = fields.next()?.parse().ok()?;
    let parent = fields.next()?.parse().ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let options = fields.next()?.to_string();
    // Optional fields up to the "-" separator.
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fs_type = fields.next()?.to_string();
    let source = unescape(fields.next()?);
    let super_options = fields.next().unwrap_or("").to_string();
    Some(MountInfo {
        id,
        parent,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        options,
        fs_type,
        source,
        super_options,
    })
}

pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

pub fn read() -> io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The path as the kernel reports mount points (symlinks resolved); the
/// path itself when it cannot be resolved (it may not exist).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The topmost mount at exactly `path`.
pub fn find<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let p = canonical(path);
    mounts.iter().rev().find(|m| m.mount_point == p)
}

/// The mount at `path`, read fresh.
pub fn mount_at(path: &Path) -> io::Result<Option<MountInfo>> {
    Ok(find(&read()?, path).cloned())
}

/// Every mount under `dir` (not `dir` itself).
pub fn under<'a>(mounts: &'a [MountInfo], dir: &Path) -> impl Iterator<Item = &'a MountInfo> {
    let d = canonical(dir);
    mounts.iter().filter(move |m| m.mount_point != d && m.mount_point.starts_with(&d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
98 29 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.volumed.dev/abc/globalmount rw,noatime shared:50 - ext4 /dev/loop3 rw
99 29 7:3 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pv\\040one/mount ro,relatime shared:50 - ext4 /dev/loop3 rw
100 29 0:5 /loop3 /var/lib/kubelet/pods/p2/volumeDevices/dev rw,nosuid master:2 - devtmpfs udev rw,size=1024k
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].major, 7);
        assert_eq!(m[1].minor, 3);
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[1].source, "/dev/loop3");
        assert!(m[1].has_option("noatime"));
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
        assert_eq!(m[2].mount_point, PathBuf::from("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pv one/mount"));
        assert_eq!(m[1].dev(), m[2].dev());
        assert_eq!(m[3].root, PathBuf::from("/loop3"));
        assert_eq!(m[3].fs_type, "devtmpfs");
        assert_eq!(under(&m, Path::new("/var/lib/kubelet")).count(), 3, "mounts under the kubelet dir");
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse("not a mountinfo line\n\n1 2").is_empty());
    }

    #[test]
    fn reads_own_table() {
        let m = read().unwrap();
        assert!(find(&m, Path::new("/")).is_some());
        assert!(find(&m, Path::new("/proc")).is_some());
    }
}
