//! Volume groups: one Raft group per volume, replicated over the nodes the
//! catalog placed it on.
//!
//! - [`command`]: what the log carries and the group's type config;
//! - [`blocks`]: versioned, checksummed block storage in RocksDB;
//! - [`state_machine`]: applying the log, Raft snapshots by pinning;
//! - [`snapshot`]: streaming a replica to a new member;
//! - [`space`]: what user snapshots hold, counted exactly;
//! - [`sweep`]: dropping what a deleted snapshot alone held;
//! - [`hydrate`]: filling a restored or cloned volume from a snapshot;
//! - [`qos`]: per-volume I/O limits enforced on the leader;
//! - [`replica`]: the running replica: batching proposer, lease reads,
//!   repair, membership convergence.

pub mod blocks;
pub mod command;
pub mod hydrate;
pub mod qos;
pub mod replica;
pub mod snapshot;
pub mod space;
pub mod state_machine;
pub mod sweep;
