//! File volumes (RWX): a POSIX filesystem whose inodes, directory entries
//! and data live in the volume's own Raft group, mounted through FUSE by
//! the volumed of every node that uses it.
//!
//! - [`layout`]: where each object lives in the versioned block keyspace;
//! - [`ops`]: the replicated operations and their answers;
//! - [`apply`]: applying them deterministically on every replica;
//! - [`read`]: reads answered by the leader;
//! - [`service`]: the leader's request handler and operation batching;
//! - [`client`]: a mount's path to the leader, with failover;
//! - [`fuse`]: the FUSE filesystem;
//! - [`mounts`]: mount / unmount / list, restore after a restart;
//! - [`persist`]: the mount list on disk.

pub mod apply;
pub mod client;
pub mod fuse;
pub mod layout;
pub mod mounts;
pub mod ops;
pub mod persist;
pub mod read;
pub mod service;
