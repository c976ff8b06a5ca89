//! Where a device is mounted, from `/proc/self/mountinfo` (matched by
//! device number, so any path naming the device counts).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Mount points of the block device `dev`; empty when it is not mounted
/// (or is not a block device any more).
pub fn mounts_of(dev: &Path) -> Vec<PathBuf> {
    let Ok(meta) = std::fs::metadata(dev) else { return Vec::new() };
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse(&text, major, minor)
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

fn parse(text: &str, major: u32, minor: u32) -> Vec<PathBuf> {
    let want = format!("{major}:{minor}");
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let dev = f.nth(2)?;
            let _root = f.next()?;
            let mp = f.next()?;
            (dev == want).then(|| PathBuf::from(unescape(mp)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mount_points_by_device_number() {
        let text = "36 25 7:3 / /mnt/a\\040b rw,relatime shared:1 - ext4 /dev/loop3 rw\n\
                    37 25 7:30 / /mnt/other rw - ext4 /dev/loop30 rw\n\
                    38 25 7:3 /sub /var/lib/kubelet/pods/x rw - ext4 /dev/loop3 rw\n";
        assert_eq!(parse(text, 7, 3), vec![PathBuf::from("/mnt/a b"), PathBuf::from("/var/lib/kubelet/pods/x")]);
        assert!(parse(text, 7, 4).is_empty());
    }
}
