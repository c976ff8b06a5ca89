//! What the two CSI plugins of volumed share.
//!
//! - [`identity`]: the Identity service (both binaries serve it);
//! - [`serve`]: endpoints, unix-socket serving with stale-socket removal,
//!   client channels over unix sockets;
//! - [`params`]: StorageClass parameters parsed into a typed
//!   [`params::VolumeSpec`], volume/publish context keys;
//! - [`access`]: volume capabilities parsed and checked per volume kind;
//! - [`capacity`]: CapacityRange semantics;
//! - [`pagination`]: ListVolumes / ListSnapshots tokens;
//! - [`snapshot_params`]: VolumeSnapshotClass parameters;
//! - [`deadline`]: the caller's gRPC deadline, for calls that wait;
//! - [`errors`]: typed errors mapped to CSI status codes;
//! - [`caps`]: capability tables;
//! - [`logging`]: log setup and the per-RPC log line;
//! - [`topology`]: topology segments from volumed node labels;
//! - [`harness`]: the cluster seam of the conformance suites.

pub mod access;
pub mod capacity;
pub mod caps;
pub mod deadline;
pub mod errors;
pub mod harness;
pub mod identity;
pub mod logging;
pub mod pagination;
pub mod params;
pub mod plugin_main;
pub mod serve;
pub mod snapshot_params;
pub mod topology;

#[cfg(test)]
mod wire_tests;

pub use volumed_proto::csi::v1 as proto;

pub use errors::CsiError;

/// Name the plugins report unless `--driver-name` says otherwise.
pub const DRIVER_NAME: &str = "csi.volumed.dev";

/// Reported as `vendor_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Checks a driver name against the spec: domain notation, at most 63
/// characters, alphanumeric at both ends, `-`, `.` and alphanumerics
/// between.
pub fn validate_driver_name(name: &str) -> Result<(), String> {
    let ok_inner = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if name.is_empty() {
        return Err("driver name is empty".into());
    }
    if name.len() > 63 {
        return Err(format!("driver name \"{name}\" is longer than 63 characters"));
    }
    let first = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let last = name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first || !last || !name.chars().all(ok_inner) {
        return Err(format!(
            "driver name \"{name}\" must be domain-style: alphanumerics, '-' and '.', \
             starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names() {
        assert!(validate_driver_name(DRIVER_NAME).is_ok());
        assert!(validate_driver_name("a").is_ok());
        for bad in ["", "-a", "a-", "a_b", "a b", &"x".repeat(64)] {
            assert!(validate_driver_name(bad).is_err(), "{bad}");
        }
    }
}
