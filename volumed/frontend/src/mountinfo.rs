//! Reading /proc/self/mountinfo.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// `major:minor` of the mounted device.
    pub dev: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
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

pub(crate) fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mount_point options [optional...] - fstype source super_options
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() < sep + 3 {
            continue;
        }
        out.push(MountEntry {
            dev: fields[2].to_string(),
            mount_point: PathBuf::from(unescape(fields[4])),
            fs_type: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]),
        });
    }
    out
}

pub(crate) fn read() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t)).unwrap_or_default()
}

/// Whether `path` is currently a mount point.
pub(crate) fn is_mount_point(path: &Path) -> bool {
    read().iter().any(|m| m.mount_point == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fuse_and_escaped_paths() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    90 24 0:55 / /run/volumed\\040x/fuse/pvc-1 rw,nosuid,nodev,relatime - fuse volumed:pvc-1 rw,user_id=0,group_id=0\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, "98:0");
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[1].mount_point, PathBuf::from("/run/volumed x/fuse/pvc-1"));
        assert_eq!(m[1].fs_type, "fuse");
        assert_eq!(m[1].source, "volumed:pvc-1");
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\9b"), "a\\9b");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
