//! The CSI Node plugin of volumed (`csi-node`).
//!
//! One module per concern, in the manner of Mayastor's node plugin:
//! [`filesystem`] (stage = format-if-blank + mount, publish = bind),
//! [`block`] (raw block: device node bound onto files), [`mountinfo`] (the
//! mount table), [`mount`] (mount/bind/unmount and CSI mount flags),
//! [`probe`] + [`format`] (blkid probing, mkfs only on blank devices),
//! [`stats`] (statvfs, device size), [`expand`] (online grow), [`fsgroup`]
//! (volume_mount_group), [`paths`] (staging/target path checks),
//! [`volumed`] (the local volumed that attaches devices), [`service`] (the
//! CSI Node service gluing them).

pub mod block;
pub mod cmd;
pub mod config;
pub mod expand;
pub mod filesystem;
pub mod format;
pub mod fsgroup;
pub mod locks;
pub mod mount;
pub mod mountinfo;
pub mod paths;
pub mod probe;
pub mod service;
pub mod stats;
pub mod volumed;

use std::sync::Arc;

use tonic::transport::Server;
use volumed_csi::caps::PluginFeatures;
use volumed_csi::identity::IdentityService;
use volumed_csi::proto::identity_server::IdentityServer;
use volumed_csi::proto::node_server::NodeServer;
use volumed_csi::serve::{self, Endpoint, ServeError};

pub use config::{Args, Config};
pub use service::NodeService;
pub use volumed::{GrpcLocalVolumed, LocalReadiness, LocalVolumed};

/// Serves Identity + Node on `endpoint` with `volumed` as the local volumed.
pub async fn serve_with<V: LocalVolumed>(
    volumed: Arc<V>,
    driver_name: &str,
    kubelet_dir: std::path::PathBuf,
    endpoint: &Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let identity =
        IdentityService::new(driver_name, PluginFeatures::current(), Arc::new(LocalReadiness(volumed.clone())));
    let node = NodeService::new(volumed, kubelet_dir);
    let router = Server::builder().add_service(IdentityServer::new(identity)).add_service(NodeServer::new(node));
    serve::serve(router, endpoint, shutdown).await
}

/// Serves the plugin as configured, talking to volumed over its socket.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<(), ServeError> {
    let volumed = Arc::new(GrpcLocalVolumed::new(&config.volumed_socket));
    serve_with(volumed, &config.driver_name, config.kubelet_dir, &config.endpoint, shutdown).await
}
