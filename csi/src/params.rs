//! StorageClass / VolumeAttributesClass parameters parsed into typed specs.
//!
//! Every key is either known and validated, or rejected with
//! INVALID_ARGUMENT naming it: a typo in a StorageClass must not silently
//! give a volume with defaults. The normalised form
//! ([`VolumeSpec::to_parameters`]) is what volumed stores, so an idempotent
//! CreateVolume compares like with like.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::errors::CsiError;

pub const REPLICAS: &str = "replicas";
pub const FS_TYPE: &str = "fsType";
pub const KIND: &str = "kind";
pub const ZONE_SPREAD: &str = "zoneSpread";
pub const QOS_READ_IOPS: &str = "qos.readIOPS";
pub const QOS_WRITE_IOPS: &str = "qos.writeIOPS";
pub const QOS_READ_BPS: &str = "qos.readBps";
pub const QOS_WRITE_BPS: &str = "qos.writeBps";

/// Keys the CO adds itself (external-provisioner's `--extra-create-metadata`:
/// PVC/PV names) are accepted and not stored.
pub const CO_PREFIX: &str = "csi.storage.k8s.io/";

pub const DEFAULT_REPLICAS: u32 = 3;
pub const MAX_REPLICAS: u32 = 5;

/// Keys of `volume_context`: what the node plugin needs at stage time.
pub mod context {
    pub const KIND: &str = "volumed.dev/kind";
    pub const FS_TYPE: &str = "volumed.dev/fsType";
    pub const NAME: &str = "volumed.dev/name";
    pub const REPLICAS: &str = "volumed.dev/replicas";
}

/// Keys of `publish_context` (ControllerPublish -> NodeStage).
pub mod publish {
    pub const GENERATION: &str = "volumed.dev/generation";
    pub const NODE_ID: &str = "volumed.dev/nodeId";
    pub const MODE: &str = "volumed.dev/accessMode";
    pub const READONLY: &str = "volumed.dev/readonly";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter \"{key}\": {reason}")]
pub struct ParamError {
    pub key: String,
    pub reason: String,
}

impl ParamError {
    fn new(key: &str, reason: impl Into<String>) -> ParamError {
        ParamError { key: key.to_string(), reason: reason.into() }
    }
}

impl From<ParamError> for CsiError {
    fn from(e: ParamError) -> CsiError {
        CsiError::InvalidArgument(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub const SUPPORTED: &'static str = "ext4, xfs";

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Parses a CSI/StorageClass fsType; `None` for anything else.
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// A block device (NBD or FUSE+loop), raw or with ext4/xfs on it.
    #[default]
    Block,
    /// A shared filesystem served by volumed through FUSE (RWX).
    File,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::Block => "block",
            VolumeKind::File => "file",
        }
    }

    pub fn parse(s: &str) -> Option<VolumeKind> {
        match s {
            "block" => Some(VolumeKind::Block),
            "file" => Some(VolumeKind::File),
            _ => None,
        }
    }
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QoS limits; `None` = no limit. These are the only mutable parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QosSpec {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub read_bytes_per_sec: Option<u64>,
    pub write_bytes_per_sec: Option<u64>,
}

impl QosSpec {
    pub fn is_qos_key(key: &str) -> bool {
        matches!(key, QOS_READ_IOPS | QOS_WRITE_IOPS | QOS_READ_BPS | QOS_WRITE_BPS)
    }

    /// Sets one QoS key; "0" removes the limit.
    fn set(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        let parsed = match key {
            QOS_READ_IOPS | QOS_WRITE_IOPS => parse_count(key, value)?,
            _ => parse_quantity(key, value)?,
        };
        let limit = (parsed != 0).then_some(parsed);
        match key {
            QOS_READ_IOPS => self.read_iops = limit,
            QOS_WRITE_IOPS => self.write_iops = limit,
            QOS_READ_BPS => self.read_bytes_per_sec = limit,
            _ => self.write_bytes_per_sec = limit,
        }
        Ok(())
    }

    /// Parses ControllerModifyVolume / CreateVolume `mutable_parameters`:
    /// QoS keys only; the other known keys are immutable.
    pub fn from_mutable(params: &HashMap<String, String>) -> Result<QosChange, ParamError> {
        let mut change = QosChange::default();
        for (key, value) in sorted(params) {
            if QosSpec::is_qos_key(key) {
                change.set.push((key.to_string(), value.to_string()));
                // Validate now, apply later on top of the current spec.
                QosSpec::default().set(key, value)?;
            } else if is_immutable_key(key) {
                return Err(ParamError::new(key, "is immutable; only the QoS keys can be modified"));
            } else {
                return Err(ParamError::new(key, unknown_key_reason()));
            }
        }
        Ok(change)
    }

    fn write(&self, out: &mut BTreeMap<String, String>) {
        let entries = [
            (QOS_READ_IOPS, self.read_iops),
            (QOS_WRITE_IOPS, self.write_iops),
            (QOS_READ_BPS, self.read_bytes_per_sec),
            (QOS_WRITE_BPS, self.write_bytes_per_sec),
        ];
        for (k, v) in entries {
            if let Some(v) = v {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }

    pub fn to_parameters(&self) -> HashMap<String, String> {
        let mut out = BTreeMap::new();
        self.write(&mut out);
        out.into_iter().collect()
    }
}

/// A validated set of QoS updates (from mutable parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QosChange {
    set: Vec<(String, String)>,
}

impl QosChange {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub fn apply(&self, qos: &mut QosSpec) {
        for (k, v) in &self.set {
            // Already validated in from_mutable.
            let _ = qos.set(k, v);
        }
    }
}

/// The typed form of a StorageClass's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VolumeSpec {
    pub replicas: u32,
    pub kind: VolumeKind,
    /// `None`: the node picks (ext4) unless the capability names one.
    pub fs_type: Option<FsType>,
    /// Hard requirement: replicas in distinct zones.
    pub zone_spread: bool,
    pub qos: QosSpec,
}

impl Default for VolumeSpec {
    fn default() -> Self {
        VolumeSpec {
            replicas: DEFAULT_REPLICAS,
            kind: VolumeKind::Block,
            fs_type: None,
            zone_spread: false,
            qos: QosSpec::default(),
        }
    }
}

impl VolumeSpec {
    pub fn from_parameters(params: &HashMap<String, String>) -> Result<VolumeSpec, ParamError> {
        let mut spec = VolumeSpec::default();
        for (key, value) in sorted(params) {
            match key {
                REPLICAS => {
                    let n: u32 = value
                        .trim()
                        .parse()
                        .map_err(|_| ParamError::new(key, format!("\"{value}\" is not a whole number")))?;
                    if n == 0 || n > MAX_REPLICAS {
                        return Err(ParamError::new(key, format!("{n} is out of range 1..={MAX_REPLICAS}")));
                    }
                    spec.replicas = n;
                }
                FS_TYPE => {
                    spec.fs_type = Some(FsType::parse(value).ok_or_else(|| {
                        ParamError::new(key, format!("\"{value}\" is not supported (supported: {})", FsType::SUPPORTED))
                    })?);
                }
                KIND => {
                    spec.kind = VolumeKind::parse(value)
                        .ok_or_else(|| ParamError::new(key, format!("\"{value}\" is not one of block, file")))?;
                }
                ZONE_SPREAD => {
                    spec.zone_spread = parse_bool(key, value)?;
                }
                k if QosSpec::is_qos_key(k) => spec.qos.set(k, value)?,
                k if k.starts_with(CO_PREFIX) => {}
                _ => return Err(ParamError::new(key, unknown_key_reason())),
            }
        }
        if spec.kind == VolumeKind::File && spec.fs_type.is_some() {
            return Err(ParamError::new(
                FS_TYPE,
                "does not apply to kind=file (file volumes are served by volumed itself)",
            ));
        }
        Ok(spec)
    }

    /// Normalised key/value form stored with the volume in volumed.
    pub fn to_parameters(&self) -> HashMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(REPLICAS.to_string(), self.replicas.to_string());
        out.insert(KIND.to_string(), self.kind.as_str().to_string());
        if let Some(fs) = self.fs_type {
            out.insert(FS_TYPE.to_string(), fs.as_str().to_string());
        }
        out.insert(ZONE_SPREAD.to_string(), self.zone_spread.to_string());
        self.qos.write(&mut out);
        out.into_iter().collect()
    }

    /// Why an existing volume with spec `self` cannot stand for a request
    /// with spec `wanted` (idempotent CreateVolume), naming the first
    /// differing key; `None` when they are compatible. QoS is mutable and
    /// therefore never a conflict.
    pub fn conflict_with(&self, wanted: &VolumeSpec) -> Option<String> {
        if self.replicas != wanted.replicas {
            return Some(format!(
                "{REPLICAS} is {} on the existing volume, {} requested",
                self.replicas, wanted.replicas
            ));
        }
        if self.kind != wanted.kind {
            return Some(format!("{KIND} is {} on the existing volume, {} requested", self.kind, wanted.kind));
        }
        if self.fs_type != wanted.fs_type {
            let show = |f: Option<FsType>| f.map_or("unset", FsType::as_str);
            return Some(format!(
                "{FS_TYPE} is {} on the existing volume, {} requested",
                show(self.fs_type),
                show(wanted.fs_type)
            ));
        }
        if self.zone_spread != wanted.zone_spread {
            return Some(format!(
                "{ZONE_SPREAD} is {} on the existing volume, {} requested",
                self.zone_spread, wanted.zone_spread
            ));
        }
        None
    }
}

fn is_immutable_key(key: &str) -> bool {
    matches!(key, REPLICAS | FS_TYPE | KIND | ZONE_SPREAD)
}

fn unknown_key_reason() -> String {
    format!(
        "unknown key (known: {REPLICAS}, {FS_TYPE}, {KIND}, {ZONE_SPREAD}, {QOS_READ_IOPS}, \
         {QOS_WRITE_IOPS}, {QOS_READ_BPS}, {QOS_WRITE_BPS})"
    )
}

/// Sorted iteration so the first error reported is deterministic.
fn sorted(params: &HashMap<String, String>) -> Vec<(&str, &str)> {
    let mut v: Vec<_> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    v.sort();
    v
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ParamError> {
    match value {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        _ => Err(ParamError::new(key, format!("\"{value}\" is not true or false"))),
    }
}

fn parse_count(key: &str, value: &str) -> Result<u64, ParamError> {
    value.trim().parse::<u64>().map_err(|_| ParamError::new(key, format!("\"{value}\" is not a whole number")))
}

/// A Kubernetes-style quantity: `1000`, `10M` (10^6), `10Mi` (2^20), up to
/// E/Ei. Fractions are rejected: a byte rate is a whole number.
pub fn parse_quantity(key: &str, value: &str) -> Result<u64, ParamError> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    let bad = || ParamError::new(key, format!("\"{value}\" is not a quantity (examples: 1000, 500M, 64Mi)"));
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(|| ParamError::new(key, format!("\"{value}\" is too large")))
}

/// What the node plugin reads back from `volume_context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeContext {
    pub kind: VolumeKind,
    pub fs_type: Option<FsType>,
}

impl NodeContext {
    pub fn to_context(spec: &VolumeSpec, name: &str) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(context::KIND.to_string(), spec.kind.as_str().to_string());
        if let Some(fs) = spec.fs_type {
            m.insert(context::FS_TYPE.to_string(), fs.as_str().to_string());
        }
        m.insert(context::NAME.to_string(), name.to_string());
        m.insert(context::REPLICAS.to_string(), spec.replicas.to_string());
        m
    }

    /// Missing keys fall back to defaults (statically provisioned PVs carry
    /// whatever the admin wrote); present keys must be valid.
    pub fn from_context(ctx: &HashMap<String, String>) -> Result<NodeContext, ParamError> {
        let mut out = NodeContext::default();
        if let Some(k) = ctx.get(context::KIND) {
            out.kind = VolumeKind::parse(k)
                .ok_or_else(|| ParamError::new(context::KIND, format!("\"{k}\" is not one of block, file")))?;
        }
        if let Some(f) = ctx.get(context::FS_TYPE) {
            out.fs_type = Some(FsType::parse(f).ok_or_else(|| {
                ParamError::new(
                    context::FS_TYPE,
                    format!("\"{f}\" is not supported (supported: {})", FsType::SUPPORTED),
                )
            })?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_when_empty() {
        let s = VolumeSpec::from_parameters(&HashMap::new()).unwrap();
        assert_eq!(s, VolumeSpec::default());
        assert_eq!(s.replicas, 3);
        assert_eq!(s.kind, VolumeKind::Block);
    }

    #[test]
    fn full_spec_parses() {
        let s = VolumeSpec::from_parameters(&map(&[
            ("replicas", "2"),
            ("fsType", "xfs"),
            ("kind", "block"),
            ("zoneSpread", "true"),
            ("qos.readIOPS", "500"),
            ("qos.writeIOPS", "0"),
            ("qos.readBps", "100Mi"),
            ("qos.writeBps", "20M"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(s.replicas, 2);
        assert_eq!(s.fs_type, Some(FsType::Xfs));
        assert!(s.zone_spread);
        assert_eq!(s.qos.read_iops, Some(500));
        assert_eq!(s.qos.write_iops, None, "0 means no limit");
        assert_eq!(s.qos.read_bytes_per_sec, Some(100 << 20));
        assert_eq!(s.qos.write_bytes_per_sec, Some(20_000_000));
        // Round trip through the stored form.
        let again = VolumeSpec::from_parameters(&s.to_parameters()).unwrap();
        assert_eq!(again, s);
        assert!(!s.to_parameters().contains_key("csi.storage.k8s.io/pvc/name"));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("replicas", "three"),
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "-1"),
            ("fsType", "btrfs"),
            ("fsType", "EXT4"),
            ("kind", "object"),
            ("zoneSpread", "yes"),
            ("qos.readIOPS", "fast"),
            ("qos.writeIOPS", "1.5"),
            ("qos.readBps", "10Xi"),
            ("qos.writeBps", "Mi"),
            ("qos.writeBps", "99999999999999999999"),
            ("qos.writeBps", "16Ei"),
            ("replica", "3"),
            ("volumed.dev/anything", "x"),
        ];
        for (k, v) in cases {
            let err = VolumeSpec::from_parameters(&map(&[(k, v)])).unwrap_err();
            assert_eq!(&err.key, k, "{k}={v}: {err}");
            let st = tonic::Status::from(CsiError::from(err.clone()));
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            assert!(st.message().contains(k), "{}", st.message());
        }
    }

    #[test]
    fn fs_type_with_file_kind_is_rejected() {
        let err = VolumeSpec::from_parameters(&map(&[("kind", "file"), ("fsType", "ext4")])).unwrap_err();
        assert_eq!(err.key, "fsType");
        assert!(VolumeSpec::from_parameters(&map(&[("kind", "file")])).is_ok());
    }

    #[test]
    fn conflicts_name_the_key_and_ignore_qos() {
        let a = VolumeSpec::from_parameters(&map(&[("replicas", "3")])).unwrap();
        let b = VolumeSpec::from_parameters(&map(&[("replicas", "2")])).unwrap();
        assert!(a.conflict_with(&b).unwrap().contains("replicas"));
        let c = VolumeSpec::from_parameters(&map(&[("fsType", "xfs")])).unwrap();
        assert!(a.conflict_with(&c).unwrap().contains("fsType"));
        let d = VolumeSpec::from_parameters(&map(&[("zoneSpread", "true")])).unwrap();
        assert!(a.conflict_with(&d).unwrap().contains("zoneSpread"));
        let e = VolumeSpec::from_parameters(&map(&[("kind", "file")])).unwrap();
        assert!(a.conflict_with(&e).unwrap().contains("kind"));
        let q = VolumeSpec::from_parameters(&map(&[("qos.readIOPS", "10")])).unwrap();
        assert_eq!(a.conflict_with(&q), None);
        assert_eq!(a.conflict_with(&a), None);
    }

    #[test]
    fn mutable_parameters_accept_only_qos() {
        let change = QosSpec::from_mutable(&map(&[("qos.readIOPS", "100")])).unwrap();
        let mut q = QosSpec { read_iops: Some(5), write_iops: Some(7), ..Default::default() };
        change.apply(&mut q);
        assert_eq!(q.read_iops, Some(100));
        assert_eq!(q.write_iops, Some(7));
        let clear = QosSpec::from_mutable(&map(&[("qos.writeIOPS", "0")])).unwrap();
        clear.apply(&mut q);
        assert_eq!(q.write_iops, None);

        for k in ["replicas", "fsType", "kind", "zoneSpread"] {
            let err = QosSpec::from_mutable(&map(&[(k, "1")])).unwrap_err();
            assert_eq!(err.key, k);
            assert!(err.reason.contains("immutable"), "{err}");
        }
        let err = QosSpec::from_mutable(&map(&[("iops", "1")])).unwrap_err();
        assert!(err.reason.contains("unknown"));
        let err = QosSpec::from_mutable(&map(&[("qos.readIOPS", "x")])).unwrap_err();
        assert_eq!(err.key, "qos.readIOPS");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("k", "1").unwrap(), 1);
        assert_eq!(parse_quantity("k", "2k").unwrap(), 2000);
        assert_eq!(parse_quantity("k", "3Ki").unwrap(), 3072);
        assert_eq!(parse_quantity("k", "1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("k", " 5T ").unwrap(), 5_000_000_000_000);
        assert!(parse_quantity("k", "").is_err());
        assert!(parse_quantity("k", "1.5Gi").is_err());
        assert!(parse_quantity("k", "-1").is_err());
    }

    #[test]
    fn node_context_round_trip_and_validation() {
        let spec = VolumeSpec::from_parameters(&map(&[("fsType", "xfs")])).unwrap();
        let ctx = NodeContext::to_context(&spec, "pvc-1");
        let nc = NodeContext::from_context(&ctx).unwrap();
        assert_eq!(nc.fs_type, Some(FsType::Xfs));
        assert_eq!(nc.kind, VolumeKind::Block);
        assert_eq!(NodeContext::from_context(&HashMap::new()).unwrap(), NodeContext::default());
        let err = NodeContext::from_context(&map(&[(context::FS_TYPE, "ntfs")])).unwrap_err();
        assert_eq!(err.key, context::FS_TYPE);
        let err = NodeContext::from_context(&map(&[(context::KIND, "tape")])).unwrap_err();
        assert_eq!(err.key, context::KIND);
    }
}
