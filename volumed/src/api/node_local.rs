//! The node-local API (`NodeLocal`), served on a unix socket that only
//! root may use: the CSI node plugin and `volctl volume attach` ask the
//! volumed of their own node for devices.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::node_local_server::NodeLocal;

use crate::attach::{AttachError, AttachManager, AttachSpec};
use crate::cluster::node::NodeRuntime;
use crate::file::mounts::{MountError, MountManager};

pub struct NodeLocalService {
    node: Arc<NodeRuntime>,
    attachments: Arc<AttachManager>,
    mounts: Arc<MountManager>,
}

impl NodeLocalService {
    pub fn new(node: Arc<NodeRuntime>, attachments: Arc<AttachManager>, mounts: Arc<MountManager>) -> Self {
        NodeLocalService { node, attachments, mounts }
    }
}

fn mount_status(e: MountError) -> Status {
    Status::new(e.code(), e.to_string())
}

fn status(e: AttachError) -> Status {
    Status::new(e.code(), e.to_string())
}

#[tonic::async_trait]
impl NodeLocal for NodeLocalService {
    async fn attach(&self, request: Request<pb::AttachRequest>) -> Result<Response<pb::AttachResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("attach", volume = %req.volume, force = req.force);
        async move {
            let spec = AttachSpec::from_proto(&req).map_err(status)?;
            let info = self.attachments.attach(spec).await.map_err(status)?;
            Ok(Response::new(pb::AttachResponse {
                volume_id: info.record.volume_id.to_string(),
                device: info.record.device.display().to_string(),
                frontend: info.record.frontend.to_string(),
                generation: info.record.generation,
                size_bytes: info.size_bytes,
            }))
        }
        .instrument(span)
        .await
    }

    async fn detach(&self, request: Request<pb::DetachRequest>) -> Result<Response<pb::DetachResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("detach", volume = %req.volume);
        async move {
            let existed = self.attachments.detach(&req.volume).await.map_err(status)?;
            Ok(Response::new(pb::DetachResponse { existed }))
        }
        .instrument(span)
        .await
    }

    async fn list_attachments(
        &self,
        _request: Request<pb::ListAttachmentsRequest>,
    ) -> Result<Response<pb::ListAttachmentsResponse>, Status> {
        let attachments = self.attachments.list().iter().map(|a| a.to_proto()).collect();
        Ok(Response::new(pb::ListAttachmentsResponse { attachments, mounts: self.mounts.list() }))
    }

    async fn device_health(
        &self,
        request: Request<pb::DeviceHealthRequest>,
    ) -> Result<Response<pb::DeviceHealthResponse>, Status> {
        let key = request.into_inner().volume;
        if key.trim().is_empty() {
            return Err(Status::invalid_argument("volume id or name is required"));
        }
        // File volumes: the health of their mounts here.
        let mounts: Vec<pb::LocalMount> =
            self.mounts.list().into_iter().filter(|m| m.volume_id == key || m.volume_name == key).collect();
        if !mounts.is_empty() {
            let sick = mounts.iter().find(|m| !m.healthy);
            return Ok(Response::new(pb::DeviceHealthResponse {
                attached: true,
                healthy: sick.is_none(),
                reason: sick.map(|m| format!("mount at {}: {}", m.target, m.reason)).unwrap_or_default(),
            }));
        }
        Ok(Response::new(match self.attachments.get(&key) {
            Some(a) => pb::DeviceHealthResponse {
                attached: true,
                healthy: a.healthy,
                reason: if a.healthy { String::new() } else { format!("{}: {}", a.state.as_str(), a.reason) },
            },
            None => pb::DeviceHealthResponse {
                attached: false,
                healthy: false,
                reason: format!("volume {key} is not attached on this node"),
            },
        }))
    }

    async fn mount(&self, request: Request<pb::MountRequest>) -> Result<Response<pb::MountResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("mount", volume = %req.volume, target = %req.target);
        async move {
            let rec = self.mounts.mount(&req).await.map_err(mount_status)?;
            Ok(Response::new(pb::MountResponse {
                volume_id: rec.volume_id.to_string(),
                target: rec.target.display().to_string(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn unmount(&self, request: Request<pb::UnmountRequest>) -> Result<Response<pb::UnmountResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("unmount", target = %req.target);
        async move {
            let existed = self.mounts.unmount(&req.target).await.map_err(mount_status)?;
            Ok(Response::new(pb::UnmountResponse { existed }))
        }
        .instrument(span)
        .await
    }

    async fn node_info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let c = &self.node.config;
        let f = self.attachments.frontend();
        Ok(Response::new(pb::NodeInfoResponse {
            node_id: c.node_id,
            node_name: c.node_name.clone(),
            labels: c.labels.clone().into_iter().collect(),
            max_volumes: c.max_volumes,
            api_addr: c.advertise.clone(),
            frontend: f.kind.to_string(),
            frontend_reason: f.reason.clone(),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("node-local socket {path}: {detail}")]
pub struct SocketError {
    pub path: PathBuf,
    pub detail: String,
}

/// Binds the node-local socket with mode 0600: created under a temporary
/// name, restricted, then renamed into place, so it is never reachable with
/// wider permissions. A socket left by an earlier run is replaced; a path
/// that is something else is refused.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let err = |detail: String| SocketError { path: path.to_path_buf(), detail };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(format!("create {}: {e}", parent.display())))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(|e| err(format!("remove the old socket: {e}")))?
        }
        Ok(_) => return Err(err("exists and is not a socket; remove it or choose --local-socket".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "volumed.sock".into());
    let tmp = parent.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| err(format!("bind: {e}")))?;
    let restrict = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = restrict {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(format!("restrict to 0600: {e}")));
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn socket_is_root_only_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/volumed.sock");
        let first = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(first);
        // The socket file of a dead process is still there: replaced.
        let _second = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let leftovers: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumed.sock");
        std::fs::write(&path, b"data").unwrap();
        let e = bind(&path).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
