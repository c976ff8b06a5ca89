//! The CSI Controller plugin of volumed (`csi-controller`).
//!
//! Stateless: every answer comes from the volumed cluster's catalog through
//! its admin API ([`volumed::Volumed`], with fail-over between addresses).

pub mod attach;
pub mod config;
pub mod freeze;
pub mod groups;
pub mod resize;
pub mod restore;
pub mod service;
pub mod snapshots;
pub mod volumed;
pub mod volumes;

use std::sync::Arc;

use tonic::transport::Server;
use volumed_csi::caps::PluginFeatures;
use volumed_csi::identity::IdentityService;
use volumed_csi::proto::controller_server::ControllerServer;
use volumed_csi::proto::group_controller_server::GroupControllerServer;
use volumed_csi::proto::identity_server::IdentityServer;
use volumed_csi::serve::{self, ServeError};

pub use config::{Args, Config};
pub use service::ControllerService;

/// Serves Identity, Controller and GroupController on `config.endpoint`
/// until `shutdown`.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<(), ServeError> {
    let volumed = Arc::new(volumed::Volumed::new(&config.volumed));
    let identity = IdentityService::new(config.driver_name.clone(), PluginFeatures::current(), volumed.clone());
    let groups = ControllerService::new(volumed.clone());
    let controller = ControllerService::new(volumed);
    let router = Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller))
        .add_service(GroupControllerServer::new(groups));
    serve::serve(router, &config.endpoint, shutdown).await
}
