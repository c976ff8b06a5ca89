//! The catalog's openraft state machine. The catalog is small, so it lives
//! in memory; it is persisted as a whole every few dozen commands (and at
//! every Raft snapshot), and on restart openraft re-applies the committed
//! log after the persisted point (`save_committed` is implemented by the
//! log store for exactly that).

use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::{CatalogCommand, CatalogResponse, CatalogState};
use crate::storage::keys::{self, GroupId, SmTag, CF_SM};
use crate::storage::log_store::{io_err, GroupTypeConfig, NodeId};
use crate::storage::{decode, encode, Store};

openraft::declare_raft_types!(
    /// Type configuration of the catalog group.
    pub CatalogTc:
        D = CatalogCommand,
        R = CatalogResponse,
        Node = BasicNode,
        SnapshotData = CatalogSnapshotData,
);

impl GroupTypeConfig for CatalogTc {
    fn entry_needs_sync(_entry: &Entry<Self>) -> bool {
        // Catalog commands are rare and each one matters (a lost
        // CreateVolume would orphan a PV): always durable.
        true
    }
}

/// A serialized [`PersistedCatalog`].
#[derive(Debug, Clone)]
pub struct CatalogSnapshotData(pub Vec<u8>);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PersistedCatalog {
    pub state: CatalogState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// How many applied commands may go unpersisted (they are replayed from the
/// log after a restart).
const PERSIST_EVERY: u64 = 32;

pub struct CatalogStateMachine {
    store: Arc<Store>,
    shared: Arc<RwLock<PersistedCatalog>>,
    applied_tx: watch::Sender<u64>,
    unpersisted: u64,
}

impl CatalogStateMachine {
    /// Loads the persisted catalog; returns the state machine and a shared
    /// view of its state plus a watch of the applied index.
    #[allow(clippy::type_complexity)]
    #[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
    pub fn open(
        store: Arc<Store>,
    ) -> Result<(CatalogStateMachine, Arc<RwLock<PersistedCatalog>>, watch::Receiver<u64>), StorageError<NodeId>> {
        let raw = {
            let cf = store.cf(CF_SM).map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
            store
                .db()
                .get_cf(cf, keys::sm_key(GroupId::CATALOG, SmTag::Applied))
                .map_err(|e| StorageIOError::read_state_machine(io_err(e)))?
        };
        let persisted: PersistedCatalog = match raw {
            Some(b) => decode("catalog state", &b).map_err(|e| StorageIOError::read_state_machine(io_err(e)))?,
            None => PersistedCatalog::default(),
        };
        let applied = persisted.last_applied.map(|l| l.index).unwrap_or(0);
        let shared = Arc::new(RwLock::new(persisted));
        let (applied_tx, applied_rx) = watch::channel(applied);
        Ok((CatalogStateMachine { store, shared: shared.clone(), applied_tx, unpersisted: 0 }, shared, applied_rx))
    }

    #[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
    fn persist(&mut self) -> Result<(), StorageError<NodeId>> {
        let bytes = {
            let guard = self.shared.read().map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
            encode(&*guard).map_err(|e| StorageIOError::write_state_machine(io_err(e)))?
        };
        let cf = self.store.cf(CF_SM).map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(&cf, keys::sm_key(GroupId::CATALOG, SmTag::Applied), bytes);
        self.store.write(batch).map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
        self.unpersisted = 0;
        Ok(())
    }

    #[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
    fn snapshot_now(&self) -> Result<Snapshot<CatalogTc>, StorageError<NodeId>> {
        let guard = self.shared.read().map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
        let data = encode(&*guard).map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
        let snapshot_id = match &guard.last_applied {
            Some(l) => format!("catalog-{}-{}", l.leader_id, l.index),
            None => "catalog-empty".to_string(),
        };
        let meta =
            SnapshotMeta { last_log_id: guard.last_applied, last_membership: guard.membership.clone(), snapshot_id };
        Ok(Snapshot { meta, snapshot: Box::new(CatalogSnapshotData(data)) })
    }

    #[allow(clippy::result_large_err)] // openraft's own error type, as its traits return it
    fn save_snapshot(&self, snap: &Snapshot<CatalogTc>) -> Result<(), StorageError<NodeId>> {
        let stored = StoredSnapshot { meta: snap.meta.clone(), data: snap.snapshot.0.clone() };
        let bytes = encode(&stored).map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        let cf = self.store.cf(CF_SM).map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(&cf, keys::sm_key(GroupId::CATALOG, SmTag::RaftSnapshot), bytes);
        self.store.write_sync(batch).map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        Ok(())
    }
}

/// Builds snapshots from the shared in-memory state.
pub struct CatalogSnapshotBuilder {
    store: Arc<Store>,
    shared: Arc<RwLock<PersistedCatalog>>,
}

impl RaftSnapshotBuilder<CatalogTc> for CatalogSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<CatalogTc>, StorageError<NodeId>> {
        let sm = CatalogStateMachine {
            store: self.store.clone(),
            shared: self.shared.clone(),
            applied_tx: watch::channel(0).0,
            unpersisted: 0,
        };
        let snap = sm.snapshot_now()?;
        sm.save_snapshot(&snap)?;
        Ok(snap)
    }
}

impl RaftStateMachine<CatalogTc> for CatalogStateMachine {
    type SnapshotBuilder = CatalogSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let guard = self.shared.read().map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
        Ok((guard.last_applied, guard.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CatalogResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<CatalogTc>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut last = 0;
        {
            let mut guard = self.shared.write().map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
            for entry in entries {
                guard.last_applied = Some(entry.log_id);
                last = entry.log_id.index;
                match entry.payload {
                    EntryPayload::Blank => out.push(CatalogResponse::Ok),
                    EntryPayload::Normal(cmd) => {
                        let resp = guard.state.apply(cmd);
                        out.push(resp);
                    }
                    EntryPayload::Membership(m) => {
                        guard.membership = StoredMembership::new(Some(entry.log_id), m);
                        out.push(CatalogResponse::Ok);
                    }
                }
                self.unpersisted += 1;
            }
        }
        if self.unpersisted >= PERSIST_EVERY {
            self.persist()?;
        }
        self.applied_tx.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        CatalogSnapshotBuilder { store: self.store.clone(), shared: self.shared.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<CatalogSnapshotData>, StorageError<NodeId>> {
        Ok(Box::new(CatalogSnapshotData(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<CatalogSnapshotData>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut incoming: PersistedCatalog = decode("catalog snapshot", &snapshot.0)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        incoming.last_applied = meta.last_log_id;
        incoming.membership = meta.last_membership.clone();
        {
            let mut guard = self.shared.write().map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
            *guard = incoming;
        }
        self.save_snapshot(&Snapshot { meta: meta.clone(), snapshot })?;
        self.persist()?;
        self.applied_tx.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<CatalogTc>>, StorageError<NodeId>> {
        let cf = self.store.cf(CF_SM).map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?;
        let raw = self
            .store
            .db()
            .get_cf(&cf, keys::sm_key(GroupId::CATALOG, SmTag::RaftSnapshot))
            .map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?;
        match raw {
            None => Ok(None),
            Some(b) => {
                let s: StoredSnapshot =
                    decode("catalog snapshot", &b).map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?;
                Ok(Some(Snapshot { meta: s.meta, snapshot: Box::new(CatalogSnapshotData(s.data)) }))
            }
        }
    }
}

/// Sends the catalog snapshot as one chunk: it is small.
pub struct CatalogSnapshotSource;

impl crate::raft::network::SnapshotSource<CatalogTc> for CatalogSnapshotSource {
    fn open(
        &self,
        snapshot: &Snapshot<CatalogTc>,
        _target: NodeId,
    ) -> Result<(Vec<u8>, futures::stream::BoxStream<'static, Result<bytes::Bytes, String>>), String> {
        let data = bytes::Bytes::from(snapshot.snapshot.0.clone());
        Ok((Vec::new(), Box::pin(futures::stream::once(futures::future::ready(Ok(data))))))
    }
}
