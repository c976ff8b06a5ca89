//! What one running volumed node does.
//!
//! - [`node`]: the runtime state of the node and its identity;
//! - [`bootstrap`]: discovering peers, forming or joining the cluster;
//! - [`heartbeat`]: liveness and replica reports to the catalog leader;
//! - [`replicas`]: starting, leading and dropping local replicas;
//! - [`control`]: volume-group control calls between nodes;
//! - [`exports`]: NBD exports, routed to each volume's leader;
//! - [`snapshots`]: snapshot operations and their housekeeping;
//! - [`disk`]: capacity of the data directory.

pub mod bootstrap;
pub mod control;
pub mod disk;
pub mod exports;
pub mod heartbeat;
pub mod node;
pub mod replicas;
pub mod snapshots;
