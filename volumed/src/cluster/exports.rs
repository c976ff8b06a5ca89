//! NBD exports of this node: every volume of the cluster, whichever node
//! leads it.
//!
//! Export names: `<volume id or name>[@<generation>][#fwd]`.
//! - `@<generation>`: the attachment generation of the writer (fencing).
//!   Without one, a connection writes only while no attachment holds the
//!   volume for writing (admin use: `nbdcopy`, `qemu-img`).
//! - `#fwd`: set by a volumed forwarding to another; such a connection is
//!   never forwarded again, so forwarding cannot loop while leadership moves,
//!   and only the volume's current leader accepts it.
//!
//! A request is served by the local replica when it leads, and otherwise
//! forwarded over a reconnecting NBD client to the current leader — so a
//! client connected to any node keeps working as leadership moves.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use uuid::Uuid;
use volumed_nbd::client::{ClientOptions, EndpointSource, NbdClient};
use volumed_nbd::{BlockDevice, BlockError, ExportInfo, ExportResolver, OpenError};

use super::node::NodeRuntime;
use crate::storage::keys::GroupId;
use crate::volume::command::IoKind;
use crate::volume::replica::VolumeReplica;

const FORWARD_MARK: &str = "#fwd";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportName {
    pub volume: String,
    pub generation: Option<u64>,
    pub forwarded: bool,
}

impl ExportName {
    pub fn parse(raw: &str) -> Result<ExportName, String> {
        let (rest, forwarded) = match raw.strip_suffix(FORWARD_MARK) {
            Some(r) => (r, true),
            None => (raw, false),
        };
        let (volume, generation) = match rest.rsplit_once('@') {
            Some((v, g)) => {
                let g: u64 = g.parse().map_err(|_| format!("generation {g:?} in export {raw:?} is not a number"))?;
                (v, Some(g))
            }
            None => (rest, None),
        };
        if volume.is_empty() {
            return Err("export name is empty; use the volume id".into());
        }
        Ok(ExportName { volume: volume.to_string(), generation, forwarded })
    }

    pub fn render(&self) -> String {
        let mut s = self.volume.clone();
        if let Some(g) = self.generation {
            s.push_str(&format!("@{g}"));
        }
        if self.forwarded {
            s.push_str(FORWARD_MARK);
        }
        s
    }
}

pub struct Exports {
    node: Weak<NodeRuntime>,
}

impl Exports {
    pub fn new(node: &Arc<NodeRuntime>) -> Arc<Exports> {
        Arc::new(Exports { node: Arc::downgrade(node) })
    }
}

impl ExportResolver for Exports {
    fn list(&self) -> BoxFuture<'_, Vec<ExportInfo>> {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else { return Vec::new() };
            node.catalog.read(|s| {
                s.volumes
                    .values()
                    .map(|v| ExportInfo {
                        name: v.id.to_string(),
                        description: format!("{} ({} bytes)", v.name, v.size_bytes),
                    })
                    .collect()
            })
        })
    }

    fn open(&self, name: &str) -> BoxFuture<'_, Result<Arc<dyn BlockDevice>, OpenError>> {
        let name = name.to_string();
        Box::pin(async move {
            let node = self.node.upgrade().ok_or_else(|| OpenError::Unavailable("volumed is stopping".into()))?;
            let parsed = ExportName::parse(&name).map_err(OpenError::Policy)?;
            let rec = node
                .catalog
                .read(|s| s.volume_by_id_or_name(&parsed.volume).cloned())
                .ok_or_else(|| OpenError::Unknown(name.clone()))?;
            // A forwarded connection is only of use on the leader (it is
            // never forwarded again). Refusing it elsewhere makes the
            // forwarding client try its next endpoint; accepting it would
            // let the client settle on a follower that answers every
            // request with ESHUTDOWN, reconnect to it, and loop.
            if parsed.forwarded && !node.replica(GroupId(rec.id)).is_some_and(|r| r.is_leader()) {
                return Err(OpenError::Unavailable(format!(
                    "node {} does not lead volume {} right now",
                    node.node_id(),
                    rec.id
                )));
            }
            let readonly = match parsed.generation {
                Some(g) if g < rec.fence_floor => {
                    return Err(OpenError::Policy(format!(
                    "generation {g} of volume {} is fenced: the volume was attached elsewhere since (generation {})",
                    rec.id, rec.fence_floor
                )))
                }
                Some(g) => rec.attachments.iter().find(|a| a.generation == g).is_some_and(|a| a.readonly),
                // Admin connections may not write under a writer attachment.
                None => rec.exclusive(),
            };
            let device = VolumeDevice {
                node: Arc::downgrade(&node),
                group: GroupId(rec.id),
                export: ExportName { volume: rec.id.to_string(), generation: parsed.generation, forwarded: true },
                generation: parsed.generation,
                forwarded: parsed.forwarded,
                readonly,
                fallback_size: rec.size_bytes,
                remote: tokio::sync::Mutex::new(None),
            };
            Ok(Arc::new(device) as Arc<dyn BlockDevice>)
        })
    }
}

/// Leader first, then the other replicas, as NBD endpoints.
struct LeaderEndpoints {
    node: Weak<NodeRuntime>,
    group: GroupId,
}

impl EndpointSource for LeaderEndpoints {
    fn endpoints(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else { return Vec::new() };
            let me = node.node_id();
            let leader = node.replica(self.group).and_then(|r| r.leader());
            let (placement, addrs) = node.catalog.read(|s| {
                let placement = s.volumes.get(&self.group.0).map(|v| v.placement.clone()).unwrap_or_default();
                let addrs: Vec<(u64, String)> = s.nodes.values().map(|n| (n.id, n.nbd_addr.clone())).collect();
                (placement, addrs)
            });
            let mut order: Vec<u64> = Vec::new();
            // When this node has become the leader since the connection
            // started forwarding, the forwarded requests come back here
            // (as `#fwd`, so they are served locally): leaving it out would
            // keep them bouncing off followers that refuse them.
            if let Some(l) = leader {
                order.push(l);
            }
            order.extend(placement.into_iter().filter(|n| *n != me && Some(*n) != leader));
            let mut out = Vec::new();
            for id in order {
                let Some((_, addr)) = addrs.iter().find(|(n, _)| *n == id) else { continue };
                if let Ok(found) = tokio::net::lookup_host(addr.as_str()).await {
                    out.extend(found);
                }
            }
            out
        })
    }
}

/// A volume as one NBD connection sees it.
pub struct VolumeDevice {
    node: Weak<NodeRuntime>,
    group: GroupId,
    /// Export name used when forwarding.
    export: ExportName,
    generation: Option<u64>,
    forwarded: bool,
    readonly: bool,
    fallback_size: u64,
    remote: tokio::sync::Mutex<Option<Arc<NbdClient>>>,
}

impl VolumeDevice {
    fn local_leader(&self) -> Option<Arc<VolumeReplica>> {
        self.node.upgrade()?.replica(self.group).filter(|r| r.is_leader())
    }

    async fn remote(&self) -> Result<Arc<NbdClient>, BlockError> {
        if self.forwarded {
            return Err(BlockError::Unavailable(format!("this node does not lead volume {}", self.group)));
        }
        let mut slot = self.remote.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let endpoints = Arc::new(LeaderEndpoints { node: self.node.clone(), group: self.group });
        let opts = ClientOptions {
            initial_connect_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        let client = NbdClient::connect(endpoints, self.export.render(), opts)
            .await
            .map_err(|e| BlockError::Unavailable(format!("cannot reach the leader of volume {}: {e}", self.group)))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    fn check_write(&self) -> Result<(), BlockError> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    async fn submit(&self, fua: bool, kind: IoKind) -> Result<(), BlockError> {
        self.check_write()?;
        if let Some(r) = self.local_leader() {
            match r.submit(self.generation, fua, kind.clone()).await {
                Err(BlockError::Unavailable(_)) if !self.forwarded => {}
                other => return other,
            }
        }
        let remote = self.remote().await?;
        match kind {
            IoKind::Write { offset, data } => remote.write(offset, data, fua).await,
            IoKind::Zero { offset, len } => remote.write_zeroes(offset, len, fua, true).await,
        }
    }
}

impl Drop for VolumeDevice {
    fn drop(&mut self) {
        if let Some(c) = self.remote.get_mut().take() {
            tokio::spawn(async move { c.close().await });
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        match self.node.upgrade().and_then(|n| n.replica(self.group)) {
            Some(r) if r.size() > 0 => r.size(),
            _ => self.fallback_size,
        }
    }

    fn read_only(&self) -> bool {
        self.readonly
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move {
            if let Some(r) = self.local_leader() {
                match r.read(offset, len).await {
                    Err(BlockError::Unavailable(_)) if !self.forwarded => {}
                    other => return other,
                }
            }
            self.remote().await?.read(offset, len).await
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.submit(fua, IoKind::Write { offset, data }))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            if let Some(r) = self.local_leader() {
                match r.flush().await {
                    Err(BlockError::Unavailable(_)) if !self.forwarded => {}
                    other => return other,
                }
            }
            self.remote().await?.flush().await
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.submit(fua, IoKind::Zero { offset, len }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, _may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        // Zeroed blocks are always freed: a thin volume stores nothing for them.
        Box::pin(self.submit(fua, IoKind::Zero { offset, len }))
    }
}

/// Volume ids are uuids; anything else is looked up by name.
pub fn is_volume_id(s: &str) -> bool {
    Uuid::parse_str(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_roundtrip() {
        let n = ExportName::parse("vol-1@7#fwd").unwrap();
        assert_eq!(n, ExportName { volume: "vol-1".into(), generation: Some(7), forwarded: true });
        assert_eq!(n.render(), "vol-1@7#fwd");
        assert_eq!(ExportName::parse("abc").unwrap().generation, None);
        assert!(ExportName::parse("abc@x").is_err());
        assert!(ExportName::parse("").is_err());
        assert!(ExportName::parse("#fwd").is_err());
    }
}
