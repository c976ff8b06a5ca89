//! Volume capabilities (access type + access mode) parsed and checked
//! against what a volume kind supports.

use volumed_proto::csi::v1::{volume_capability, VolumeCapability};
use volumed_proto::volumed::v1 as vd;

use crate::errors::CsiError;
use crate::params::{FsType, VolumeKind};

pub use volume_capability::access_mode::Mode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Raw block device.
    Block,
    /// A filesystem mounted at a directory.
    Mount {
        fs_type: Option<FsType>,
        flags: Vec<String>,
        /// Group id (fsGroup) the workload runs with.
        mount_group: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSpec {
    pub access: Access,
    pub mode: Mode,
}

impl AccessSpec {
    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }

    pub fn fs_type(&self) -> Option<FsType> {
        match &self.access {
            Access::Mount { fs_type, .. } => *fs_type,
            Access::Block => None,
        }
    }
}

/// Parses one capability; `field` names it in errors
/// ("volume_capability", "volume_capabilities[1]").
pub fn parse_capability(cap: Option<&VolumeCapability>, field: &'static str) -> Result<AccessSpec, CsiError> {
    let cap = cap.ok_or(CsiError::Missing(field))?;
    parse_one(cap, field)
}

fn parse_one(cap: &VolumeCapability, field: &str) -> Result<AccessSpec, CsiError> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| CsiError::InvalidArgument(format!("{field}.access_mode is required")))?
        .mode;
    let mode = Mode::try_from(mode).ok().filter(|m| *m != Mode::Unknown).ok_or_else(|| {
        CsiError::InvalidArgument(format!("{field}.access_mode.mode {mode} is not a known access mode"))
    })?;
    let access = match cap.access_type.as_ref() {
        None => return Err(CsiError::InvalidArgument(format!("{field}.access_type is required (block or mount)"))),
        Some(volume_capability::AccessType::Block(_)) => Access::Block,
        Some(volume_capability::AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(FsType::parse(&m.fs_type).ok_or_else(|| {
                    CsiError::InvalidArgument(format!(
                        "{field}.mount.fs_type \"{}\" is not supported (supported: {})",
                        m.fs_type,
                        FsType::SUPPORTED
                    ))
                })?)
            };
            let mount_group = if m.volume_mount_group.is_empty() {
                None
            } else {
                Some(m.volume_mount_group.parse::<u32>().map_err(|_| {
                    CsiError::InvalidArgument(format!(
                        "{field}.mount.volume_mount_group \"{}\" is not a numeric group id",
                        m.volume_mount_group
                    ))
                })?)
            };
            Access::Mount { fs_type, flags: m.mount_flags.clone(), mount_group }
        }
    };
    Ok(AccessSpec { access, mode })
}

/// Parses the REQUIRED repeated `volume_capabilities`.
pub fn parse_capabilities(caps: &[VolumeCapability]) -> Result<Vec<AccessSpec>, CsiError> {
    if caps.is_empty() {
        return Err(CsiError::Missing("volume_capabilities"));
    }
    caps.iter().enumerate().map(|(i, c)| parse_one(c, &format!("volume_capabilities[{i}]"))).collect()
}

pub fn is_multi_node(mode: Mode) -> bool {
    matches!(mode, Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter)
}

pub fn is_reader_only(mode: Mode) -> bool {
    matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// `Err(reason)` when a volume of `kind` cannot be used with `spec`.
pub fn check_supported(spec: &AccessSpec, kind: VolumeKind) -> Result<(), String> {
    match (kind, &spec.access) {
        (VolumeKind::File, Access::Block) => Err("a kind=file volume cannot be used as a raw block device".into()),
        (VolumeKind::File, Access::Mount { fs_type: Some(fs), .. }) => {
            Err(format!("fs_type {fs} does not apply to a kind=file volume (it is served by volumed through FUSE)"))
        }
        (VolumeKind::File, Access::Mount { .. }) => Ok(()),
        (VolumeKind::Block, Access::Block) => Ok(()),
        (VolumeKind::Block, Access::Mount { .. }) => match spec.mode {
            Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => Err(format!(
                "access mode {} needs a shared filesystem: ext4/xfs on a block volume cannot be \
                 mounted on several nodes while one writes (use kind=file)",
                spec.mode.as_str_name()
            )),
            _ => Ok(()),
        },
    }
}

/// The fsType a mount capability ends up with: the capability's, else the
/// volume's StorageClass fsType; they must agree when both are given.
pub fn effective_fs_type(spec: &AccessSpec, volume_fs: Option<FsType>) -> Result<Option<FsType>, String> {
    match (spec.fs_type(), volume_fs) {
        (Some(a), Some(b)) if a != b => {
            Err(format!("fs_type {a} of the capability differs from fsType {b} of the volume"))
        }
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

pub fn to_volumed_mode(mode: Mode) -> vd::AccessMode {
    match mode {
        Mode::Unknown | Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            vd::AccessMode::SingleNodeWriter
        }
        Mode::SingleNodeReaderOnly => vd::AccessMode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly => vd::AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => vd::AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => vd::AccessMode::MultiNodeMultiWriter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

    fn mount(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn block(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn required_parts() {
        let e = parse_capability(None, "volume_capability").unwrap_err();
        assert_eq!(e.to_string(), "volume_capability is required");
        let mut c = mount("ext4", Mode::SingleNodeWriter);
        c.access_type = None;
        assert!(parse_capability(Some(&c), "volume_capability").unwrap_err().to_string().contains("access_type"));
        let mut c = mount("ext4", Mode::SingleNodeWriter);
        c.access_mode = None;
        assert!(parse_capability(Some(&c), "cap").unwrap_err().to_string().contains("access_mode"));
        let c = mount("ext4", Mode::Unknown);
        assert!(parse_capability(Some(&c), "cap").is_err());
        let mut c = mount("ext4", Mode::SingleNodeWriter);
        c.access_mode = Some(AccessMode { mode: 42 });
        assert!(parse_capability(Some(&c), "cap").is_err());
        assert_eq!(parse_capabilities(&[]).unwrap_err().to_string(), "volume_capabilities is required");
    }

    #[test]
    fn fs_type_and_group() {
        let s = parse_capability(Some(&mount("xfs", Mode::SingleNodeWriter)), "c").unwrap();
        assert_eq!(s.fs_type(), Some(FsType::Xfs));
        let e = parse_capability(Some(&mount("btrfs", Mode::SingleNodeWriter)), "c").unwrap_err();
        assert!(e.to_string().contains("btrfs"));
        let mut c = mount("", Mode::SingleNodeWriter);
        if let Some(AccessType::Mount(m)) = c.access_type.as_mut() {
            m.volume_mount_group = "2000".into();
        }
        let s = parse_capability(Some(&c), "c").unwrap();
        assert_eq!(s.access, Access::Mount { fs_type: None, flags: vec!["noatime".into()], mount_group: Some(2000) });
        if let Some(AccessType::Mount(m)) = c.access_type.as_mut() {
            m.volume_mount_group = "wheel".into();
        }
        assert!(parse_capability(Some(&c), "c").unwrap_err().to_string().contains("wheel"));
    }

    #[test]
    fn support_matrix() {
        let p = |c: VolumeCapability| parse_capability(Some(&c), "c").unwrap();
        assert!(check_supported(&p(block(Mode::MultiNodeMultiWriter)), VolumeKind::Block).is_ok());
        assert!(check_supported(&p(mount("", Mode::SingleNodeWriter)), VolumeKind::Block).is_ok());
        assert!(check_supported(&p(mount("", Mode::MultiNodeReaderOnly)), VolumeKind::Block).is_ok());
        assert!(check_supported(&p(mount("", Mode::MultiNodeMultiWriter)), VolumeKind::Block).is_err());
        assert!(check_supported(&p(mount("", Mode::MultiNodeSingleWriter)), VolumeKind::Block).is_err());
        assert!(check_supported(&p(mount("", Mode::MultiNodeMultiWriter)), VolumeKind::File).is_ok());
        assert!(check_supported(&p(mount("ext4", Mode::SingleNodeWriter)), VolumeKind::File).is_err());
        assert!(check_supported(&p(block(Mode::SingleNodeWriter)), VolumeKind::File).is_err());
    }

    #[test]
    fn effective_fs() {
        let s = parse_capability(Some(&mount("", Mode::SingleNodeWriter)), "c").unwrap();
        assert_eq!(effective_fs_type(&s, Some(FsType::Xfs)), Ok(Some(FsType::Xfs)));
        assert_eq!(effective_fs_type(&s, None), Ok(None));
        let s = parse_capability(Some(&mount("ext4", Mode::SingleNodeWriter)), "c").unwrap();
        assert!(effective_fs_type(&s, Some(FsType::Xfs)).is_err());
        assert_eq!(effective_fs_type(&s, Some(FsType::Ext4)), Ok(Some(FsType::Ext4)));
    }

    #[test]
    fn modes_map_to_volumed() {
        assert_eq!(to_volumed_mode(Mode::SingleNodeSingleWriter), vd::AccessMode::SingleNodeWriter);
        assert_eq!(to_volumed_mode(Mode::MultiNodeMultiWriter), vd::AccessMode::MultiNodeMultiWriter);
        assert!(is_reader_only(Mode::MultiNodeReaderOnly));
        assert!(!is_multi_node(Mode::SingleNodeMultiWriter));
    }
}
