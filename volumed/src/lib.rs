//! volumed: the Volumed storage daemon and its admin CLI.
//!
//! The folders tell the architecture (see docs/architecture.md):
//! - [`storage`]: the node's single RocksDB and the key codec;
//! - [`raft`]: openraft plumbing shared by all groups (network, timing);
//! - [`catalog`]: the cluster-wide catalog group;
//! - [`volume`]: per-volume Raft groups and block storage;
//! - [`cluster`]: what one running node does (bootstrap, heartbeats,
//!   replica management, NBD exports);
//! - [`attach`]: devices of volumes attached on this node;
//! - [`file`]: file volumes (RWX): the filesystem state machine and FUSE mounts;
//! - [`persist`]: the small lists a node keeps beside its RocksDB;
//! - [`api`]: the gRPC edges.
//!
//! The admin CLI, `volctl`, is its own crate (`volumed/volctl`).

pub mod api;
pub mod attach;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod file;
pub mod persist;
pub mod raft;
pub mod storage;
pub mod volume;
