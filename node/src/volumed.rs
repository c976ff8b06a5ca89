//! The node-local volumed (NodeLocal service on a unix socket): it hosts the
//! devices and FUSE mounts, so a restart of this plugin never breaks I/O.
//!
//! The node service talks to it through [`LocalVolumed`]; the production
//! implementation is [`GrpcLocalVolumed`].

use std::path::Path;

use tonic::transport::Channel;
use tonic::Status;
use volumed_csi::identity::Readiness;
use volumed_csi::serve::{self, Endpoint};
use volumed_proto::volumed::v1 as vd;
use volumed_proto::volumed::v1::node_local_client::NodeLocalClient;

#[tonic::async_trait]
pub trait LocalVolumed: Send + Sync + 'static {
    async fn node_info(&self) -> Result<vd::NodeInfoResponse, Status>;
    /// Idempotent: an attached volume returns its device again.
    async fn attach(&self, req: vd::AttachRequest) -> Result<vd::AttachResponse, Status>;
    /// `Ok(false)` when the volume was not attached.
    async fn detach(&self, volume: &str) -> Result<bool, Status>;
    async fn list_attachments(&self) -> Result<vd::ListAttachmentsResponse, Status>;
    async fn device_health(&self, volume: &str) -> Result<vd::DeviceHealthResponse, Status>;
    /// FUSE mount of a kind=file volume at `req.target`.
    async fn mount(&self, req: vd::MountRequest) -> Result<vd::MountResponse, Status>;
    async fn unmount(&self, target: &Path) -> Result<bool, Status>;
}

pub struct GrpcLocalVolumed {
    client: NodeLocalClient<Channel>,
}

impl GrpcLocalVolumed {
    pub fn new(socket: &Path) -> GrpcLocalVolumed {
        GrpcLocalVolumed { client: NodeLocalClient::new(serve::channel(&Endpoint::Unix(socket.to_path_buf()))) }
    }
}

#[tonic::async_trait]
impl LocalVolumed for GrpcLocalVolumed {
    async fn node_info(&self) -> Result<vd::NodeInfoResponse, Status> {
        Ok(self.client.clone().node_info(vd::NodeInfoRequest {}).await?.into_inner())
    }

    async fn attach(&self, req: vd::AttachRequest) -> Result<vd::AttachResponse, Status> {
        Ok(self.client.clone().attach(req).await?.into_inner())
    }

    async fn detach(&self, volume: &str) -> Result<bool, Status> {
        let r = self.client.clone().detach(vd::DetachRequest { volume: volume.to_string() }).await?;
        Ok(r.into_inner().existed)
    }

    async fn list_attachments(&self) -> Result<vd::ListAttachmentsResponse, Status> {
        Ok(self.client.clone().list_attachments(vd::ListAttachmentsRequest {}).await?.into_inner())
    }

    async fn device_health(&self, volume: &str) -> Result<vd::DeviceHealthResponse, Status> {
        Ok(self
            .client
            .clone()
            .device_health(vd::DeviceHealthRequest { volume: volume.to_string() })
            .await?
            .into_inner())
    }

    async fn mount(&self, req: vd::MountRequest) -> Result<vd::MountResponse, Status> {
        Ok(self.client.clone().mount(req).await?.into_inner())
    }

    async fn unmount(&self, target: &Path) -> Result<bool, Status> {
        let r =
            self.client.clone().unmount(vd::UnmountRequest { target: target.to_string_lossy().into_owned() }).await?;
        Ok(r.into_inner().existed)
    }
}

/// The node plugin is ready while its volumed answers.
pub struct LocalReadiness<V: LocalVolumed>(pub std::sync::Arc<V>);

#[tonic::async_trait]
impl<V: LocalVolumed> Readiness for LocalReadiness<V> {
    async fn check(&self) -> Result<(), String> {
        self.0.node_info().await.map(|_| ()).map_err(|s| format!("local volumed: {}", s.message()))
    }
}
