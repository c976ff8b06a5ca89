//! Everything one running volumed holds: its store, the catalog, the volume
//! replicas it hosts, and its identity.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::catalog::service::{Catalog, LivenessConfig};
use crate::catalog::state::NodeRecord;
use crate::config::NodeConfig;
use crate::raft::network::PeerPool;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;
use crate::storage::Store;
use crate::volume::replica::{ReplicaContext, VolumeReplica};

use super::bootstrap::Bootstrap;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory {path}: {detail}")]
    DataDir { path: String, detail: String },
    #[error("{0}")]
    Identity(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("catalog: {0}")]
    Catalog(String),
}

/// Persisted in `<data-dir>/node.json` on first start; later starts must
/// agree with it, so a data directory is never adopted by another node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub node_id: NodeId,
    pub node_name: String,
}

impl Identity {
    pub fn load_or_create(dir: &Path, node_id: NodeId, node_name: &str) -> Result<Identity, NodeError> {
        let path = dir.join("node.json");
        let dd = |detail: String| NodeError::DataDir { path: dir.display().to_string(), detail };
        std::fs::create_dir_all(dir).map_err(|e| dd(e.to_string()))?;
        match std::fs::read(&path) {
            Ok(bytes) => {
                let id: Identity = serde_json::from_slice(&bytes).map_err(|e| dd(format!("node.json: {e}")))?;
                if id.node_id != node_id {
                    return Err(NodeError::Identity(format!(
                        "{} belongs to node id {} ({}), but this node is {} ({}); point --data-dir elsewhere or fix --node-id/--node-name",
                        dir.display(),
                        id.node_id,
                        id.node_name,
                        node_id,
                        node_name
                    )));
                }
                if id.node_name != node_name {
                    warn!(old = %id.node_name, new = %node_name, "node name changed; keeping node id {}", id.node_id);
                }
                Ok(Identity { node_id, node_name: node_name.to_string() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity { node_id, node_name: node_name.to_string() };
                let tmp = dir.join("node.json.tmp");
                let body = serde_json::to_vec_pretty(&id).map_err(|e| dd(e.to_string()))?;
                std::fs::write(&tmp, body).map_err(|e| dd(e.to_string()))?;
                std::fs::rename(&tmp, &path).map_err(|e| dd(e.to_string()))?;
                info!(node_id, node_name, "new node identity");
                Ok(id)
            }
            Err(e) => Err(dd(e.to_string())),
        }
    }
}

pub struct NodeRuntime {
    pub config: NodeConfig,
    pub store: Arc<Store>,
    pub pool: Arc<PeerPool>,
    pub catalog: Arc<Catalog>,
    pub replica_ctx: ReplicaContext,
    pub replicas: RwLock<HashMap<GroupId, Arc<VolumeReplica>>>,
    pub bootstrap: Bootstrap,
    /// Wakes the heartbeat loop for an immediate report.
    pub report_now: Notify,
    pub shutdown: watch::Sender<bool>,
    pub capacity_bytes: u64,
    /// States of the volumes attached here, for the heartbeat (kept by
    /// the attachment manager).
    pub local_attachments: RwLock<Vec<crate::attach::AttachmentReport>>,
    /// Serialises group snapshots (their write barriers) on this node.
    pub snapshot_ops: tokio::sync::Mutex<()>,
}

impl NodeRuntime {
    pub async fn open(config: NodeConfig) -> Result<Arc<NodeRuntime>, NodeError> {
        Identity::load_or_create(&config.data_dir, config.node_id, &config.node_name)?;
        let store = Store::open(&config.data_dir).map_err(|e| NodeError::Storage(e.to_string()))?;
        let pool = PeerPool::new();
        pool.set_addr(config.node_id, &config.advertise);
        let liveness = LivenessConfig {
            heartbeat: std::time::Duration::from_secs(1),
            suspect_after: std::time::Duration::from_secs(4),
            down_after: config.node_down_grace,
            catalog_voters: config.catalog_voters,
        };
        let catalog = Catalog::start(store.clone(), pool.clone(), config.node_id, liveness)
            .await
            .map_err(|e| NodeError::Catalog(e.to_string()))?;
        let capacity_bytes = match config.capacity_bytes {
            Some(c) => c,
            None => super::disk::fs_stats(&config.data_dir).map(|s| s.total).unwrap_or(0),
        };
        let replica_ctx = ReplicaContext {
            node_id: config.node_id,
            store: store.clone(),
            pool: pool.clone(),
            snap_dir: config.data_dir.join("snapshots"),
            rebuild_bandwidth: config.rebuild_bandwidth,
        };
        let (shutdown, _) = watch::channel(false);
        Ok(Arc::new(NodeRuntime {
            bootstrap: Bootstrap::new(&config),
            config,
            store,
            pool,
            catalog,
            replica_ctx,
            replicas: RwLock::new(HashMap::new()),
            report_now: Notify::new(),
            shutdown,
            capacity_bytes,
            local_attachments: RwLock::new(Vec::new()),
            snapshot_ops: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    pub fn replica(&self, id: GroupId) -> Option<Arc<VolumeReplica>> {
        self.replicas.read().ok().and_then(|m| m.get(&id).cloned())
    }

    pub fn local_replicas(&self) -> Vec<Arc<VolumeReplica>> {
        self.replicas.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// This node's catalog record as it should be.
    pub fn self_record(&self) -> NodeRecord {
        NodeRecord {
            id: self.config.node_id,
            name: self.config.node_name.clone(),
            api_addr: self.config.advertise.clone(),
            nbd_addr: self.config.nbd_advertise.clone(),
            labels: self.config.labels.clone(),
            capacity_bytes: self.capacity_bytes,
            max_volumes: self.config.max_volumes,
            removed: false,
            down: false,
            joined_at_ms: crate::catalog::service::now_ms(),
        }
    }

    /// Labels as the catalog's placement reads them.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.config.labels.clone()
    }

    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let replicas = self.local_replicas();
        for r in replicas {
            r.shutdown().await;
        }
        if let Err(e) = self.catalog.raft.shutdown().await {
            warn!(error = %e, "catalog raft shutdown");
        }
        // Make everything written so far durable before exiting: the WAL,
        // and the state machines' unlogged writes (so a clean restart has
        // no log to re-apply).
        if let Err(e) = self.store.db().flush_wal(true) {
            warn!(error = %e, "final WAL sync");
        }
        if let Err(e) = self.store.flush_memtables() {
            warn!(error = %e, "final memtable flush");
        }
    }
}
