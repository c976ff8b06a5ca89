//! The CSI Identity service, served by both binaries.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use volumed_proto::csi::v1::identity_server::Identity;
use volumed_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    ProbeRequest, ProbeResponse,
};

use crate::caps::PluginFeatures;
use crate::logging::observe;

/// Whether the plugin can serve: both plugins are ready only while their
/// volumed answers.
#[tonic::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Err(reason)` when not ready.
    async fn check(&self) -> Result<(), String>;
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct IdentityService {
    driver_name: String,
    features: PluginFeatures,
    readiness: Arc<dyn Readiness>,
}

impl IdentityService {
    pub fn new(driver_name: impl Into<String>, features: PluginFeatures, readiness: Arc<dyn Readiness>) -> Self {
        IdentityService { driver_name: driver_name.into(), features, readiness }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        observe("GetPluginInfo", "", async {
            Ok(GetPluginInfoResponse {
                name: self.driver_name.clone(),
                vendor_version: crate::VERSION.to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        observe("GetPluginCapabilities", "", async {
            Ok(GetPluginCapabilitiesResponse { capabilities: self.features.capabilities() })
        })
        .await
    }

    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        observe("Probe", "", async {
            let ready = match tokio::time::timeout(PROBE_TIMEOUT, self.readiness.check()).await {
                Ok(Ok(())) => true,
                Ok(Err(reason)) => {
                    tracing::warn!(%reason, "not ready");
                    false
                }
                Err(_) => {
                    tracing::warn!("not ready: volumed did not answer within {PROBE_TIMEOUT:?}");
                    false
                }
            };
            Ok(ProbeResponse { ready: Some(ready) })
        })
        .await
    }
}
