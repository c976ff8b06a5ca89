//! The CSI Node service: validates requests, asks the local volumed to
//! attach, and delegates to the per-concern modules ([`crate::filesystem`],
//! [`crate::block`], [`crate::stats`], [`crate::expand`]). Every RPC checks
//! what is already in place before acting.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use volumed_csi::access::{self, Access, AccessSpec, Mode};
use volumed_csi::errors::{from_volumed, invalid, CsiError};
use volumed_csi::logging::observe;
use volumed_csi::params::{publish, NodeContext, VolumeKind};
use volumed_csi::proto::node_server::Node;
use volumed_csi::proto::{self as csi};
use volumed_csi::{capacity, caps, topology};
use volumed_proto::volumed::v1 as vd;

use crate::filesystem::{self, rdev, table_err};
use crate::locks::VolumeLocks;
use crate::mount::MountOptions;
use crate::mountinfo::{self, MountInfo};
use crate::volumed::LocalVolumed;
use crate::{block, expand, fsgroup, paths, stats};

/// How long NodeExpandVolume waits for the attached device to show the
/// size ControllerExpandVolume gave the volume.
const DEVICE_GROW_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct NodeService {
    volumed: Arc<dyn LocalVolumed>,
    kubelet_dir: PathBuf,
    locks: VolumeLocks,
}

/// How a staged volume shows up in the mount table.
#[derive(Debug, Clone)]
enum Staged {
    /// A filesystem mounted at `at` (device number, root in the fs).
    Fs { dev: u64, root: PathBuf, at: PathBuf },
    /// A device node bound onto the file `at`.
    Block { rdev: u64, at: PathBuf },
}

fn is_fuse(m: &MountInfo) -> bool {
    m.fs_type == "fuse" || m.fs_type.starts_with("fuse.")
}

fn find_attachment<'a>(list: &'a vd::ListAttachmentsResponse, volume_id: &str) -> Option<&'a vd::LocalAttachment> {
    list.attachments.iter().find(|a| a.volume_id == volume_id || a.volume_name == volume_id)
}

impl NodeService {
    pub fn new(volumed: Arc<dyn LocalVolumed>, kubelet_dir: PathBuf) -> NodeService {
        NodeService { volumed, kubelet_dir, locks: VolumeLocks::default() }
    }

    fn path(&self, p: &str, field: &'static str) -> Result<PathBuf, CsiError> {
        paths::validate(&self.kubelet_dir, p, field)
    }

    async fn attachments(&self, volume_id: &str) -> Result<vd::ListAttachmentsResponse, CsiError> {
        self.volumed
            .list_attachments()
            .await
            .map_err(|s| from_volumed(s, format!("volume {volume_id}: listing local attachments")))
    }

    /// Attaches through the local volumed; the bool says whether this call
    /// attached it (and so should detach it again if staging fails).
    async fn attach(
        &self,
        volume_id: &str,
        cap: &AccessSpec,
        readonly: bool,
        publish_context: &std::collections::HashMap<String, String>,
    ) -> Result<(PathBuf, bool), CsiError> {
        let was_attached = find_attachment(&self.attachments(volume_id).await?, volume_id).is_some();
        let resp = self
            .volumed
            .attach(vd::AttachRequest {
                volume: volume_id.to_string(),
                mode: access::to_volumed_mode(cap.mode) as i32,
                readonly,
                force: false,
                frontend: vd::Frontend::Auto as i32,
            })
            .await
            .map_err(|s| from_volumed(s, format!("volume {volume_id}: attaching on this node")))?;
        if let Some(g) = publish_context.get(publish::GENERATION).and_then(|g| g.parse::<u64>().ok()) {
            if resp.generation != 0 && resp.generation < g {
                return Err(CsiError::Aborted(format!(
                    "volume {volume_id}: local attachment has fencing generation {} but \
                     ControllerPublish recorded {g}; retry once volumed has caught up",
                    resp.generation
                )));
            }
        }
        if resp.device.is_empty() {
            return Err(CsiError::Internal(format!("volume {volume_id}: volumed attached it but named no device")));
        }
        Ok((PathBuf::from(resp.device), !was_attached))
    }

    async fn detach_after_failure(&self, volume_id: &str) {
        if let Err(s) = self.volumed.detach(volume_id).await {
            tracing::warn!(error = %s.message(), "detaching after a failed stage");
        }
    }

    fn staged(&self, volume_id: &str, staging: &Path, mounts: &[MountInfo]) -> Option<Staged> {
        let file = block::staged_path(staging, volume_id);
        if mountinfo::find(mounts, &file).is_some() {
            if let Ok(d) = rdev(&file) {
                return Some(Staged::Block { rdev: d, at: file });
            }
        }
        mountinfo::find(mounts, staging).map(|m| Staged::Fs {
            dev: m.dev(),
            root: m.root.clone(),
            at: m.mount_point.clone(),
        })
    }

    /// Mount points under the kubelet directory showing the staged volume,
    /// other than the staging mount itself.
    fn publications(&self, staged: &Staged, mounts: &[MountInfo]) -> Vec<PathBuf> {
        mountinfo::under(mounts, &self.kubelet_dir)
            .filter(|m| !is_fuse(m) || matches!(staged, Staged::Fs { .. }))
            .filter(|m| match staged {
                Staged::Fs { dev, root, at } => m.dev() == *dev && &m.root == root && &m.mount_point != at,
                Staged::Block { rdev: d, at } => &m.mount_point != at && rdev(&m.mount_point).ok() == Some(*d),
            })
            .map(|m| m.mount_point.clone())
            .collect()
    }

    async fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<csi::NodeStageVolumeResponse, CsiError> {
        paths::validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.as_str();
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let cap = access::parse_capability(req.volume_capability.as_ref(), "volume_capability")?;
        let ctx = NodeContext::from_context(&req.volume_context)?;
        access::check_supported(&cap, ctx.kind).map_err(|e| invalid(format!("volume {id}: {e}")))?;
        let _guard = self.locks.try_lock(id)?;
        let readonly = access::is_reader_only(cap.mode)
            || req.publish_context.get(publish::READONLY).map(String::as_str) == Some("true");
        match (&cap.access, ctx.kind) {
            (Access::Mount { mount_group, .. }, VolumeKind::File) => {
                self.stage_file(id, &staging, &cap, readonly, *mount_group).await?
            }
            (Access::Block, _) => {
                let (device, fresh) = self.attach(id, &cap, readonly, &req.publish_context).await?;
                if let Err(e) = block::stage(id, &device, &staging) {
                    if fresh {
                        self.detach_after_failure(id).await;
                    }
                    return Err(e);
                }
            }
            (Access::Mount { flags, mount_group, .. }, VolumeKind::Block) => {
                let fs =
                    access::effective_fs_type(&cap, ctx.fs_type).map_err(|e| invalid(format!("volume {id}: {e}")))?;
                let options = MountOptions::parse(flags)?;
                // Something mounted there already: compare with the current
                // attachment rather than attaching first.
                if mountinfo::mount_at(&staging).map_err(table_err)?.is_some()
                    && find_attachment(&self.attachments(id).await?, id).is_none()
                {
                    return Err(CsiError::FailedPrecondition(format!(
                        "staging path {} already holds a mount, and volume {id} is not attached on \
                         this node",
                        staging.display()
                    )));
                }
                let (device, fresh) = self.attach(id, &cap, readonly, &req.publish_context).await?;
                let res = filesystem::stage(filesystem::Stage {
                    volume_id: id,
                    device: &device,
                    staging: &staging,
                    fs,
                    options: &options,
                    readonly,
                    mount_group: *mount_group,
                })
                .await;
                if let Err(e) = res {
                    if fresh {
                        self.detach_after_failure(id).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(csi::NodeStageVolumeResponse {})
    }

    async fn stage_file(
        &self,
        id: &str,
        staging: &Path,
        cap: &AccessSpec,
        readonly: bool,
        mount_group: Option<u32>,
    ) -> Result<(), CsiError> {
        if let Some(m) = mountinfo::mount_at(staging).map_err(table_err)? {
            let list = self.attachments(id).await?;
            let ours = list
                .mounts
                .iter()
                .any(|lm| (lm.volume_id == id || lm.volume_name == id) && Path::new(&lm.target) == m.mount_point);
            if is_fuse(&m) && ours {
                return Ok(());
            }
            return Err(CsiError::FailedPrecondition(format!(
                "staging path {} already holds a mount of {} ({}), not file volume {id}",
                staging.display(),
                m.source,
                m.fs_type
            )));
        }
        filesystem::prepare_empty_dir(staging, "staging path")?;
        self.volumed
            .mount(vd::MountRequest {
                volume: id.to_string(),
                target: staging.to_string_lossy().into_owned(),
                readonly,
                mode: access::to_volumed_mode(cap.mode) as i32,
                options: Vec::new(),
            })
            .await
            .map_err(|s| from_volumed(s, format!("volume {id}: mounting at {}", staging.display())))?;
        if let (Some(gid), false) = (mount_group, readonly) {
            fsgroup::apply(staging, gid).map_err(|e| {
                CsiError::Internal(format!("volume {id}: giving group {gid} access to {}: {e}", staging.display()))
            })?;
        }
        Ok(())
    }

    async fn unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<csi::NodeUnstageVolumeResponse, CsiError> {
        paths::validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.as_str();
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.locks.try_lock(id)?;
        let mounts = mountinfo::read().map_err(table_err)?;
        if let Some(staged) = self.staged(id, &staging, &mounts) {
            let published = self.publications(&staged, &mounts);
            if !published.is_empty() {
                let list: Vec<String> = published.iter().map(|p| p.display().to_string()).collect();
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is still published at {}; NodeUnpublishVolume first",
                    list.join(", ")
                )));
            }
        }
        // The staged device file: a mount point, or a leftover file when the
        // staging directory itself is not mounted (never a file inside a
        // staged filesystem, which is user data).
        let block_file = block::staged_path(&staging, id);
        let block_mounted = mountinfo::find(&mounts, &block_file).is_some();
        let leftover = mountinfo::find(&mounts, &staging).is_none() && std::fs::symlink_metadata(&block_file).is_ok();
        if block_mounted || leftover {
            block::unstage(id, &staging)?;
        }
        if let Some(m) = mountinfo::find(&mounts, &staging) {
            if is_fuse(m) {
                self.volumed
                    .unmount(&staging)
                    .await
                    .map_err(|s| from_volumed(s, format!("volume {id}: unmounting {}", staging.display())))?;
            }
            filesystem::unstage(id, &staging)?;
        }
        match self.volumed.detach(id).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(from_volumed(s, format!("volume {id}: detaching from this node"))),
        }
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<csi::NodePublishVolumeResponse, CsiError> {
        paths::validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.as_str();
        let target = self.path(&req.target_path, "target_path")?;
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let cap = access::parse_capability(req.volume_capability.as_ref(), "volume_capability")?;
        let ctx = NodeContext::from_context(&req.volume_context)?;
        access::check_supported(&cap, ctx.kind).map_err(|e| invalid(format!("volume {id}: {e}")))?;
        if target == staging {
            return Err(invalid(format!(
                "volume {id}: target_path and staging_target_path are both {}",
                target.display()
            )));
        }
        let _guard = self.locks.try_lock(id)?;
        let readonly = req.readonly || access::is_reader_only(cap.mode);
        if cap.mode == Mode::SingleNodeSingleWriter {
            let mounts = mountinfo::read().map_err(table_err)?;
            if let Some(staged) = self.staged(id, &staging, &mounts) {
                let others: Vec<String> = self
                    .publications(&staged, &mounts)
                    .into_iter()
                    .filter(|p| *p != mountinfo::canonical(&target))
                    .map(|p| p.display().to_string())
                    .collect();
                if !others.is_empty() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                        others.join(", ")
                    )));
                }
            }
        }
        match &cap.access {
            Access::Block => block::publish(id, &staging, &target, readonly)?,
            Access::Mount { flags, mount_group, .. } => {
                let options = MountOptions::parse(flags)?;
                filesystem::publish(id, &staging, &target, readonly, &options)?;
                if let (Some(gid), false) = (mount_group, readonly) {
                    let done = fsgroup::root_matches(&target, *gid).unwrap_or(false);
                    if !done {
                        fsgroup::apply(&target, *gid).map_err(|e| {
                            CsiError::Internal(format!(
                                "volume {id}: giving group {gid} access to {}: {e}",
                                target.display()
                            ))
                        })?;
                    }
                }
            }
        }
        Ok(csi::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse, CsiError> {
        paths::validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.as_str();
        let target = self.path(&req.target_path, "target_path")?;
        let _guard = self.locks.try_lock(id)?;
        filesystem::unpublish(id, &target)?;
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    /// Finds what `path` shows of volume `id`: the mount and, for devices,
    /// the attached device node. NOT_FOUND when it is not this volume.
    async fn locate(&self, id: &str, path: &Path) -> Result<(MountInfo, Option<PathBuf>), CsiError> {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(CsiError::NotFound(format!("volume {id}: path {} does not exist", path.display())));
        }
        let m = mountinfo::mount_at(path).map_err(table_err)?.ok_or_else(|| {
            CsiError::NotFound(format!(
                "volume {id}: {} is not a mount point, so not a staged or published volume",
                path.display()
            ))
        })?;
        let list = self.attachments(id).await?;
        if is_fuse(&m) {
            let ours = list.mounts.iter().any(|lm| lm.volume_id == id || lm.volume_name == id);
            return if ours {
                Ok((m, None))
            } else {
                Err(CsiError::NotFound(format!("volume {id}: {} is not a mount of this volume", path.display())))
            };
        }
        let att = find_attachment(&list, id)
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} is not attached on this node")))?;
        let device = PathBuf::from(&att.device);
        let dev = rdev(&device)?;
        let same = rdev(path).ok() == Some(dev) || m.dev() == dev;
        if !same {
            return Err(CsiError::NotFound(format!(
                "volume {id}: {} holds {} ({}), not this volume's device {}",
                path.display(),
                m.source,
                m.fs_type,
                device.display()
            )));
        }
        Ok((m, Some(device)))
    }

    async fn volume_stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, CsiError> {
        paths::validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.as_str();
        if req.volume_path.is_empty() {
            return Err(CsiError::Missing("volume_path"));
        }
        let path = self.path(&req.volume_path, "volume_path")?;
        let (_m, device) = self.locate(id, &path).await?;
        let is_block_target = rdev(&path).is_ok();
        let mut condition = match self.volumed.device_health(id).await {
            Ok(h) if h.attached && h.healthy => csi::VolumeCondition { abnormal: false, message: "healthy".into() },
            Ok(h) => csi::VolumeCondition {
                abnormal: true,
                message: format!(
                    "volume {id}: device {} ({})",
                    if h.attached { "unhealthy" } else { "not attached" },
                    if h.reason.is_empty() { "no reason given" } else { &h.reason }
                ),
            },
            Err(s) => csi::VolumeCondition {
                abnormal: true,
                message: format!("volume {id}: local volumed cannot report device health: {}", s.message()),
            },
        };
        let usage = if is_block_target {
            stats::block_usage(&path)?
        } else {
            match stats::filesystem_usage(&path) {
                Ok(u) => u,
                Err(e) => {
                    condition = csi::VolumeCondition {
                        abnormal: true,
                        message: format!(
                            "volume {id}: reading filesystem statistics of {} failed: {}{}",
                            path.display(),
                            e.desc(),
                            device.as_ref().map(|d| format!(" (device {})", d.display())).unwrap_or_default()
                        ),
                    };
                    Vec::new()
                }
            }
        };
        Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) })
    }

    async fn expand(&self, req: csi::NodeExpandVolumeRequest) -> Result<csi::NodeExpandVolumeResponse, CsiError> {
        paths::validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.as_str();
        if req.volume_path.is_empty() {
            return Err(CsiError::Missing("volume_path"));
        }
        let volume_path = self.path(&req.volume_path, "volume_path")?;
        let cap = match req.volume_capability.as_ref() {
            Some(c) => Some(access::parse_capability(Some(c), "volume_capability")?),
            None => None,
        };
        // The filesystem mount itself (staging) when given, else the path.
        let path = if req.staging_target_path.is_empty() {
            volume_path
        } else {
            self.path(&req.staging_target_path, "staging_target_path")?
        };
        let (range_req, range_lim) = req.capacity_range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
        if range_req < 0 || range_lim < 0 {
            return Err(invalid("capacity_range: bytes must not be negative"));
        }
        let _guard = self.locks.try_lock(id)?;
        let (m, device) = self.locate(id, &path).await?;
        let Some(device) = device else {
            // File volumes grow in volumed; nothing to do on the node.
            return Ok(csi::NodeExpandVolumeResponse { capacity_bytes: 0 });
        };
        // volumed grows an attached device by itself once the volume has
        // grown (its attachment watcher notices within seconds): wait for
        // that rather than send kubelet into a retry loop.
        let deadline = tokio::time::Instant::now() + DEVICE_GROW_WAIT;
        let mut size = stats::block_device_size(&device)?;
        while (range_req as u64) > size && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            size = stats::block_device_size(&device)?;
        }
        if range_req as u64 > size {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id}: device {} is {size} bytes, below the requested {range_req}; the volume \
                 did not grow on this node within {}s; retry once it has",
                device.display(),
                DEVICE_GROW_WAIT.as_secs()
            )));
        }
        let raw = cap.as_ref().is_some_and(|c| c.is_block()) || rdev(&path).is_ok();
        if !raw {
            expand::grow(&m.fs_type, &device, &m.mount_point).await.map_err(|e| e.context(format!("volume {id}")))?;
        }
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes: capacity::to_i64(size) })
    }

    async fn info(&self) -> Result<csi::NodeGetInfoResponse, CsiError> {
        let info = self
            .volumed
            .node_info()
            .await
            .map_err(|s| from_volumed(s, "asking the local volumed for its node identity"))?;
        if info.node_id == 0 {
            return Err(CsiError::Unavailable("the local volumed has no node id yet (not joined to a cluster)".into()));
        }
        let segments = topology::segments(&info.labels);
        Ok(csi::NodeGetInfoResponse {
            node_id: info.node_id.to_string(),
            max_volumes_per_node: i64::from(info.max_volumes),
            accessible_topology: (!segments.is_empty()).then_some(csi::Topology { segments }),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeStageVolume", &id, self.stage(req)).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeUnstageVolume", &id, self.unstage(req)).await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodePublishVolume", &id, self.publish(req)).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeUnpublishVolume", &id, self.unpublish(req)).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeGetVolumeStats", &id, self.volume_stats(req)).await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        observe("NodeExpandVolume", &id, self.expand(req)).await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        observe("NodeGetCapabilities", "", async {
            Ok(csi::NodeGetCapabilitiesResponse { capabilities: caps::node_capabilities() })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        observe("NodeGetInfo", "", self.info()).await
    }
}
