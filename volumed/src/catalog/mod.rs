//! The catalog: one cluster-wide Raft group holding nodes, volumes,
//! placement and attachments.
//!
//! - [`state`]: the replicated data and its deterministic commands;
//! - [`placement`]: where replicas go;
//! - [`snapshots`]: snapshot records, group snapshots, deletion rules;
//! - [`store`]: the openraft state machine;
//! - [`service`]: the running catalog on a node (writes with forwarding
//!   to the leader, liveness, the reconciler that heals volumes).

pub mod placement;
pub mod service;
pub mod snapshots;
pub mod state;
pub mod store;
