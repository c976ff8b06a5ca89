//! Filesystem freeze around CreateSnapshot and CreateVolumeGroupSnapshot
//! (VolumeSnapshotClass parameter `freeze`, default "true").
//!
//! CSI has no hook to quiesce a filesystem, so the controller does it: it
//! asks the volumed of every node a volume is attached to to FIFREEZE the
//! filesystems mounted from it (flushing dirty pages and the journal, and
//! holding new writes), takes the snapshot, and thaws them, also when the
//! snapshot failed. volumed thaws by itself after [`HOLD`] if the thaw never
//! comes, so a controller that dies in between never leaves an application
//! blocked. Raw block volumes and volumes not mounted anywhere freeze
//! nothing.

use std::collections::BTreeSet;

use tonic::transport::Channel;
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_proto::volumed::v1 as vd;
use volumed_proto::volumed::v1::admin_client::AdminClient;

use crate::service::ControllerService;
use crate::volumed::{channel, VolumedUrl};

/// How long a freeze may last before volumed thaws by itself.
const HOLD_MS: u32 = 15_000;

/// Filesystems frozen on one node for one volume.
pub(crate) struct Frozen {
    client: AdminClient<Channel>,
    node_id: u64,
    volume: String,
    token: u64,
}

impl ControllerService {
    /// Freezes the filesystems of `volumes` on every node they are attached
    /// to. All or nothing: on a failure what was frozen is thawed again.
    pub(crate) async fn freeze(&self, volumes: &[&str]) -> Result<Vec<Frozen>, CsiError> {
        let mut frozen = Vec::new();
        match self.freeze_into(volumes, &mut frozen).await {
            Ok(()) => Ok(frozen),
            Err(e) => {
                self.thaw(frozen).await;
                Err(e)
            }
        }
    }

    async fn freeze_into(&self, volumes: &[&str], frozen: &mut Vec<Frozen>) -> Result<(), CsiError> {
        let mut nodes: Option<Vec<vd::Node>> = None;
        for id in volumes {
            // A missing volume is the snapshot call's NOT_FOUND to give.
            let Some(v) = self.volume_by_id(id).await? else { continue };
            let on: BTreeSet<u64> = v.attachments.iter().map(|a| a.node_id).collect();
            if on.is_empty() {
                continue;
            }
            if nodes.is_none() {
                nodes = Some(self.nodes().await?);
            }
            for n in on {
                let node = nodes.as_deref().unwrap_or_default().iter().find(|x| x.node_id == n).ok_or_else(|| {
                    CsiError::Unavailable(format!(
                        "volume {id} is attached to node {n}, which volumed does not list; retry"
                    ))
                })?;
                let url = VolumedUrl::Http(format!("http://{}", node.api_addr));
                let mut client = AdminClient::new(channel(&url));
                let req = vd::FreezeFilesystemsRequest { volume: id.to_string(), hold_ms: HOLD_MS };
                let r = client.freeze_filesystems(req).await.map_err(|s| {
                    let e = from_volumed(s, freeze_context(id, node));
                    CsiError::with_code(
                        e.code(),
                        format!("{e} (or set freeze: \"false\" in the snapshot class for crash-consistent snapshots)"),
                    )
                })?;
                let r = r.into_inner();
                if r.token != 0 {
                    tracing::info!(volume_id = %id, node = n, mounts = ?r.mount_points, "filesystems frozen");
                    frozen.push(Frozen { client, node_id: n, volume: id.to_string(), token: r.token });
                }
            }
        }
        Ok(())
    }

    /// Thaws what [`ControllerService::freeze`] froze. Failures are logged:
    /// volumed thaws by itself after the hold time.
    pub(crate) async fn thaw(&self, frozen: Vec<Frozen>) {
        for mut f in frozen {
            let req = vd::ThawFilesystemsRequest { volume: f.volume.clone(), token: f.token };
            if let Err(s) = f.client.thaw_filesystems(req).await {
                tracing::warn!(volume_id = %f.volume, node = f.node_id, error = %s.message(),
                    "thaw failed; volumed thaws by itself within {HOLD_MS} ms");
            }
        }
    }
}

fn freeze_context(id: &str, node: &vd::Node) -> String {
    format!("freezing the filesystems of volume {id} on node {} ({})", node.name, node.api_addr)
}
