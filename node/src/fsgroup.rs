//! `volume_mount_group` (the pod's fsGroup): the volume is made usable by
//! that group the way kubelet does it itself - group ownership of every
//! file, group read/write, and setgid directories so new files inherit the
//! group. Only the volume's own filesystem is walked (no crossing into
//! other mounts, symlinks not followed).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

const RW: u32 = 0o660;
const EXEC: u32 = 0o110;
const SETGID: u32 = 0o2000;

/// Whether the volume root already carries the group and the setgid bit
/// (kubelet's OnRootMismatch shortcut: then the tree is assumed done).
pub fn root_matches(root: &Path, gid: u32) -> io::Result<bool> {
    let m = std::fs::metadata(root)?;
    Ok(m.gid() == gid && m.mode() & SETGID != 0)
}

fn fix(path: &Path, meta: &std::fs::Metadata, gid: u32) -> io::Result<()> {
    if meta.gid() != gid {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut mask = RW;
    if meta.is_dir() {
        mask |= EXEC | SETGID;
    }
    let mode = meta.mode() & 0o7777;
    if mode | mask != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | mask))?;
    }
    Ok(())
}

fn walk(dir: &Path, dev: u64, gid: u32) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.dev() != dev {
            continue;
        }
        fix(&path, &meta, gid)?;
        if meta.is_dir() {
            walk(&path, dev, gid)?;
        }
    }
    Ok(())
}

/// Applies `gid` to the tree at `root` (a mount point).
pub fn apply(root: &Path, gid: u32) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    fix(root, &meta, gid)?;
    walk(root, meta.dev(), gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_group_and_setgid() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test changes file groups and must run as root");
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f"), b"x").unwrap();
        std::fs::set_permissions(root.join("sub/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        assert!(!root_matches(root, 4321).unwrap());
        apply(root, 4321).unwrap();
        assert!(root_matches(root, 4321).unwrap());
        let f = std::fs::metadata(root.join("sub/f")).unwrap();
        assert_eq!(f.gid(), 4321);
        assert_eq!(f.mode() & 0o777, 0o660);
        let d = std::fs::metadata(root.join("sub")).unwrap();
        assert_eq!(d.mode() & SETGID, SETGID);
        // The symlink's target is untouched.
        assert_ne!(std::fs::metadata("/etc/passwd").unwrap().gid(), 4321);
    }
}
