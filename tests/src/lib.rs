//! Test support for Volumed's end-to-end suites: a multi-process cluster
//! harness ([`cluster`]) and helpers to drive third-party tools
//! ([`tools`]). Everything here runs the real binaries on real sockets.

pub mod cluster;
pub mod tools;
