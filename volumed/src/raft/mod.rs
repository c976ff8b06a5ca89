//! Raft plumbing shared by every group: timing presets, the peer network
//! (client side in [`network`], server side in [`transport`]) and helpers to
//! read a group's state from openraft's metrics.

pub mod network;

use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, RaftMetrics, ServerState, SnapshotPolicy};

use crate::storage::log_store::NodeId;

/// Timing of the cluster-wide catalog group. Catalog writes are rare, so it
/// can afford calmer timers than volume groups.
#[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
pub fn catalog_config(cluster: &str) -> Result<Arc<Config>, openraft::ConfigError> {
    let cfg = Config {
        cluster_name: format!("{cluster}-catalog"),
        heartbeat_interval: 200,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 200,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate()?))
}

/// Timing of a volume group. The election timeout bounds how long I/O pauses
/// when a leader dies (detection) and must stay well above scheduling noise
/// on a loaded 2-core machine running several nodes.
#[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
pub fn volume_config(volume: &str) -> Result<Arc<Config>, openraft::ConfigError> {
    let cfg = Config {
        cluster_name: format!("volume-{volume}"),
        // openraft's followers refuse votes for `election_timeout_max` after
        // the last heartbeat (the leader lease), so after a leader dies the
        // first candidate is usually refused and a second round elects:
        // the pause is roughly 1–2 × the maximum. 800 ms keeps it well
        // inside the 5 s failover bound, and 400 ms is still 4 missed
        // heartbeats, above scheduling noise on a busy 2-core machine.
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // A Raft snapshot of a volume pins an index instead of copying data
        // (see volume::blocks), so taking one is cheap; what it costs is the
        // old block versions it keeps alive until the next one.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(2_000),
        max_in_snapshot_log_to_keep: 500,
        purge_batch_size: 1024,
        // openraft cancels an AppendEntries after one heartbeat interval
        // whatever deadline the network sets (replication/mod.rs), so a
        // batch must be sendable and storable well within 100 ms: entries
        // carry up to 1 MiB each, so at most 8 MiB per message. At queue
        // depth 32 about 8 entries are in flight anyway.
        max_payload_entries: 8,
        install_snapshot_timeout: 30_000,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate()?))
}

/// Lease used for local reads on a volume leader. A follower refuses to vote
/// for `election_timeout_max` after it last heard from the leader, so a
/// leader that got a quorum acknowledgement less than this long ago is still
/// the only leader. Half the minimum election timeout leaves room for clock
/// drift and scheduling delay.
pub const VOLUME_READ_LEASE: Duration = Duration::from_millis(200);

/// Lease of the catalog leader for answering reads from its own state (see
/// `Catalog::confirm_leader`): half the catalog's minimum election timeout.
pub const CATALOG_READ_LEASE: Duration = Duration::from_millis(500);

/// Role of this node in a group, derived from openraft metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Learner,
    Candidate,
    Shutdown,
}

pub fn role_of(m: &RaftMetrics<NodeId, openraft::BasicNode>) -> Role {
    match m.state {
        ServerState::Leader => Role::Leader,
        ServerState::Candidate => Role::Candidate,
        ServerState::Learner => Role::Learner,
        ServerState::Follower => {
            if m.membership_config.membership().voter_ids().any(|v| v == m.id) {
                Role::Follower
            } else {
                Role::Learner
            }
        }
        ServerState::Shutdown => Role::Shutdown,
    }
}
