//! Volume groups: one Raft group per volume, replicated over the nodes the
//! catalog placed it on.
//!
//! - [`command`]: what the log carries and the group's type config;
//! - [`blocks`]: versioned, checksummed block storage in RocksDB;
//! - [`state_machine`]: applying the log, Raft snapshots by pinning;
//! - [`snapshot`]: streaming a replica to a new member;
//! - [`qos`]: per-volume I/O limits enforced on the leader;
//! - [`replica`]: the running replica: batching proposer, lease reads,
//!   repair, membership convergence.

pub mod blocks;
pub mod command;
pub mod qos;
pub mod replica;
pub mod snapshot;
pub mod state_machine;
