//! VolumeSnapshotClass / VolumeGroupSnapshotClass parameters.
//!
//! Every key is known and validated, or rejected with INVALID_ARGUMENT
//! naming it (a typo in a class must not pass silently); the keys the CO
//! adds itself (external-snapshotter's `--extra-create-metadata` passes
//! `csi.storage.k8s.io/volumesnapshot/name` and friends) are accepted and
//! ignored.

use std::collections::HashMap;

use crate::errors::CsiError;
use crate::params::CO_PREFIX;

/// Freeze the filesystems mounted from the volume around the cut.
pub const FREEZE: &str = "freeze";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotParams {
    /// FIFREEZE/FITHAW around the cut on the nodes the volume is published
    /// to (default true): the snapshot then holds a clean filesystem,
    /// including what was still in those nodes' page caches.
    pub freeze: bool,
}

impl Default for SnapshotParams {
    fn default() -> SnapshotParams {
        SnapshotParams { freeze: true }
    }
}

impl SnapshotParams {
    /// Parses the `parameters` of CreateSnapshot / CreateVolumeGroupSnapshot.
    pub fn from_parameters(parameters: &HashMap<String, String>) -> Result<SnapshotParams, CsiError> {
        let mut out = SnapshotParams::default();
        let mut keys: Vec<&String> = parameters.keys().collect();
        keys.sort_unstable();
        for key in keys {
            let value = &parameters[key];
            match key.as_str() {
                FREEZE => {
                    out.freeze = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(CsiError::InvalidArgument(format!(
                                "parameter \"{FREEZE}\": {value:?} is not \"true\" or \"false\""
                            )))
                        }
                    }
                }
                k if k.starts_with(CO_PREFIX) => {}
                k => {
                    return Err(CsiError::InvalidArgument(format!(
                        "parameter \"{k}\": not a snapshot class parameter of this driver (known: {FREEZE}; \
                         {CO_PREFIX}* keys set by the CO are accepted)"
                    )))
                }
            }
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
    fn freeze_defaults_to_true_and_co_keys_pass() {
        assert_eq!(SnapshotParams::from_parameters(&map(&[])).unwrap(), SnapshotParams { freeze: true });
        let p = SnapshotParams::from_parameters(&map(&[
            ("csi.storage.k8s.io/volumesnapshot/name", "s1"),
            ("freeze", "false"),
        ]))
        .unwrap();
        assert!(!p.freeze);
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let e = SnapshotParams::from_parameters(&map(&[("csi.storage.k8s.io/x", "1"), ("retention", "7d"), ("b", "")]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("\"b\""), "{e}");
        let e = SnapshotParams::from_parameters(&map(&[("freeze", "yes")])).unwrap_err();
        assert!(e.to_string().contains("freeze") && e.to_string().contains("yes"), "{e}");
    }
}
