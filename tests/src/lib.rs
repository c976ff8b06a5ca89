//! Test support for Volumed's end-to-end suites: a multi-process cluster
//! harness ([`cluster`]), helpers to drive third-party tools ([`tools`]),
//! and self-checking block workloads ([`workload`]). Everything here runs
//! the real binaries on real sockets.

pub mod cluster;
pub mod files;
pub mod node_local;
pub mod snapshots;
pub mod tools;
pub mod workload;
