//! mount(2) / umount(2): filesystem mounts, bind mounts, read-only remounts.

use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use volumed_csi::errors::CsiError;
use volumed_csi::params::FsType;

use crate::mountinfo;

/// Mount flags from a CSI capability, split into what mount(2) takes as
/// flags and what goes to the filesystem as its data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { flags: MsFlags::empty(), data: Vec::new() }
    }
}

/// Per-mount flags: also applied to bind mounts (by a remount).
const PER_MOUNT: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOATIME)
    .union(MsFlags::MS_NODIRATIME)
    .union(MsFlags::MS_RELATIME)
    .union(MsFlags::MS_STRICTATIME);

impl MountOptions {
    /// Parses CSI `mount_flags` (each entry may hold several, comma
    /// separated). Options that change what a mount *is* (bind, remount,
    /// move...) are refused; unknown options are left to the filesystem,
    /// which rejects what it does not know at mount time.
    pub fn parse(list: &[String]) -> Result<MountOptions, CsiError> {
        let mut out = MountOptions::default();
        for opt in list.iter().flat_map(|e| e.split(',')).map(str::trim) {
            let flag = match opt {
                "" | "defaults" | "rw" | "auto" | "nouser" | "async" | "suid" | "dev" | "exec" => None,
                "ro" => Some(MsFlags::MS_RDONLY),
                "nosuid" => Some(MsFlags::MS_NOSUID),
                "nodev" => Some(MsFlags::MS_NODEV),
                "noexec" => Some(MsFlags::MS_NOEXEC),
                "noatime" => Some(MsFlags::MS_NOATIME),
                "nodiratime" => Some(MsFlags::MS_NODIRATIME),
                "relatime" => Some(MsFlags::MS_RELATIME),
                "strictatime" => Some(MsFlags::MS_STRICTATIME),
                "lazytime" => Some(MsFlags::MS_LAZYTIME),
                "sync" => Some(MsFlags::MS_SYNCHRONOUS),
                "dirsync" => Some(MsFlags::MS_DIRSYNC),
                "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "private" | "rprivate" | "slave"
                | "rslave" | "unbindable" | "runbindable" | "loop" => {
                    return Err(CsiError::InvalidArgument(format!(
                        "mount flag \"{opt}\" is not allowed: the plugin decides how volumes are mounted"
                    )))
                }
                other => {
                    if other.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(CsiError::InvalidArgument(format!(
                            "mount flag {other:?} contains whitespace or control characters"
                        )));
                    }
                    out.data.push(other.to_string());
                    None
                }
            };
            if let Some(f) = flag {
                out.flags |= f;
            }
        }
        Ok(out)
    }

    pub fn per_mount_flags(&self) -> MsFlags {
        self.flags & PER_MOUNT
    }

    pub fn read_only(&self) -> bool {
        self.flags.contains(MsFlags::MS_RDONLY)
    }
}

fn errno_msg(what: &str, path: &Path, e: Errno) -> String {
    format!("{what} {}: {} ({e:?})", path.display(), e.desc())
}

/// Mounts `device` (holding `fs`) at `target`.
pub fn mount_device(
    device: &Path,
    target: &Path,
    fs: FsType,
    opts: &MountOptions,
    readonly: bool,
) -> Result<(), CsiError> {
    let mut flags = opts.flags;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    let mut data = opts.data.clone();
    if readonly && fs == FsType::Ext4 {
        // A read-only mount must not replay the journal (writing the device).
        data.push("noload".into());
    }
    if readonly && fs == FsType::Xfs {
        data.push("norecovery".into());
    }
    if fs == FsType::Xfs {
        // A restored or cloned volume carries its source's filesystem UUID,
        // and XFS refuses to mount a second filesystem with a UUID already
        // mounted on this node.
        data.push("nouuid".into());
    }
    let data = data.join(",");
    mount(Some(device), target, Some(fs.as_str()), flags, if data.is_empty() { None } else { Some(data.as_str()) })
        .map_err(|e| {
            let msg = format!(
                "mounting {} ({fs}, options \"{data}\") at {}: {} ({e:?})",
                device.display(),
                target.display(),
                e.desc()
            );
            match e {
                Errno::EINVAL => CsiError::InvalidArgument(msg),
                _ => CsiError::Internal(msg),
            }
        })
}

/// Bind-mounts `source` onto `target`; then, when `readonly` or per-mount
/// flags are asked, remounts the bind with them (a bind ignores flags on
/// its first mount). A failed remount undoes the bind.
pub fn bind(source: &Path, target: &Path, readonly: bool, extra: MsFlags) -> Result<(), CsiError> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| {
        CsiError::Internal(format!(
            "bind-mounting {} onto {}: {} ({e:?})",
            source.display(),
            target.display(),
            e.desc()
        ))
    })?;
    let mut flags = extra & PER_MOUNT;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    if !flags.is_empty() {
        let res =
            mount(None::<&str>, target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags, None::<&str>);
        if let Err(e) = res {
            let _ = umount2(target, MntFlags::empty());
            return Err(CsiError::Internal(errno_msg("remounting bind with flags at", target, e)));
        }
    }
    Ok(())
}

/// Unmounts everything mounted at `target` (stacked mounts included).
/// Busy mounts are retried briefly, never lazily detached: a detached
/// mount would hide writers from the unstage that follows.
pub fn unmount_all(target: &Path) -> Result<(), CsiError> {
    for _ in 0..16 {
        let mounted =
            mountinfo::mount_at(target).map_err(|e| CsiError::Internal(format!("reading the mount table: {e}")))?;
        if mounted.is_none() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            match umount2(target, MntFlags::empty()) {
                Ok(()) => break,
                Err(Errno::EINVAL) | Err(Errno::ENOENT) => break,
                Err(Errno::EBUSY) if attempt < 10 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    let msg = errno_msg("unmounting", target, e);
                    return Err(if e == Errno::EBUSY {
                        CsiError::FailedPrecondition(format!("{msg}: still in use"))
                    } else {
                        CsiError::Internal(msg)
                    });
                }
            }
        }
    }
    Err(CsiError::Internal(format!("{} still has mounts after 16 unmounts", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_and_data_split() {
        let o = MountOptions::parse(&v(&["noatime,nodev", "discard", "ro", "defaults"])).unwrap();
        assert!(o.flags.contains(MsFlags::MS_NOATIME));
        assert!(o.flags.contains(MsFlags::MS_NODEV));
        assert!(o.read_only());
        assert_eq!(o.data, vec!["discard"]);
        assert_eq!(o.per_mount_flags(), MsFlags::MS_NOATIME | MsFlags::MS_NODEV);
        assert_eq!(MountOptions::parse(&[]).unwrap(), MountOptions::default());
    }

    #[test]
    fn structural_flags_refused() {
        for bad in ["bind", "remount", "rshared", "loop"] {
            let e = MountOptions::parse(&v(&[bad])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(bad));
        }
        assert!(MountOptions::parse(&v(&["a b"])).is_err());
    }
}
