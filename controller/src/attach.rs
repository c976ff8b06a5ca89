//! ControllerPublishVolume / ControllerUnpublishVolume: the catalog
//! attachment of a volume to a node, with its fencing generation.

use std::collections::HashMap;

use volumed_csi::access::{self, Mode};
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::params::publish;
use volumed_csi::proto::{self as csi};
use volumed_proto::volumed::v1 as vd;

use crate::service::{parse_node_id, publications, stored_spec, ControllerService};

fn publish_context(a: &vd::Attachment) -> HashMap<String, String> {
    let mode = vd::AccessMode::try_from(a.mode).map(|m| m.as_str_name().to_string()).unwrap_or_default();
    [
        (publish::GENERATION, a.generation.to_string()),
        (publish::NODE_ID, a.node_id.to_string()),
        (publish::MODE, mode),
        (publish::READONLY, a.readonly.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn mode_name(m: i32) -> &'static str {
    vd::AccessMode::try_from(m).map(|m| m.as_str_name()).unwrap_or("UNKNOWN")
}

impl ControllerService {
    pub(crate) async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        if req.node_id.is_empty() {
            return Err(CsiError::Missing("node_id"));
        }
        let cap = access::parse_capability(req.volume_capability.as_ref(), "volume_capability")?;
        let id = req.volume_id.as_str();
        let v = self.existing_volume(id).await?;
        let node_id = parse_node_id(&req.node_id).ok_or_else(|| {
            CsiError::NotFound(format!("node {} does not exist (node ids are volumed node numbers)", req.node_id))
        })?;
        let nodes = self.nodes().await?;
        let node = nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| CsiError::NotFound(format!("node {node_id} is not a volumed node")))?;
        if vd::NodeState::try_from(node.state) == Ok(vd::NodeState::Removed) {
            return Err(CsiError::NotFound(format!("node {node_id} was removed from the cluster")));
        }
        let ctx = format!("volume {id}, node {node_id}");
        let spec = stored_spec(&v);
        access::check_supported(&cap, spec.kind).map_err(|e| CsiError::InvalidArgument(format!("{ctx}: {e}")))?;
        let mode = access::to_volumed_mode(cap.mode);

        // Idempotent when already published here the same way.
        if let Some(a) = publications(&v).find(|a| a.node_id == node_id) {
            if a.readonly == req.readonly && a.mode == mode as i32 {
                return Ok(csi::ControllerPublishVolumeResponse { publish_context: publish_context(a) });
            }
            return Err(CsiError::AlreadyExists(format!(
                "{ctx}: already published with readonly={} mode={}, now asked readonly={} mode={}",
                a.readonly,
                mode_name(a.mode),
                req.readonly,
                mode.as_str_name()
            )));
        }
        let others: Vec<&vd::Attachment> = publications(&v).filter(|a| a.node_id != node_id).collect();
        if !others.is_empty() {
            let list = others.iter().map(|a| a.node_id.to_string()).collect::<Vec<_>>().join(", ");
            if !access::is_multi_node(cap.mode) {
                return Err(CsiError::FailedPrecondition(format!(
                    "{ctx}: volume is {} and already published to node {list}; unpublish it there first",
                    cap.mode.as_str_name()
                )));
            }
            let other_writer = others.iter().any(|a| !a.readonly);
            if cap.mode == Mode::MultiNodeSingleWriter && !req.readonly && other_writer {
                return Err(CsiError::FailedPrecondition(format!(
                    "{ctx}: MULTI_NODE_SINGLE_WRITER allows one writer and node(s) {list} already write"
                )));
            }
            if access::is_reader_only(cap.mode) && others.iter().any(|a| !a.readonly) {
                return Err(CsiError::FailedPrecondition(format!(
                    "{ctx}: volume is published read-write on node(s) {list}"
                )));
            }
        }
        if node.max_volumes > 0 {
            let attached =
                self.all_volumes().await?.iter().filter(|vol| publications(vol).any(|a| a.node_id == node_id)).count();
            if attached >= node.max_volumes as usize {
                return Err(CsiError::ResourceExhausted(format!(
                    "{ctx}: node already has {attached} volume(s) published, its limit is {}",
                    node.max_volumes
                )));
            }
        }
        let preq = vd::PublishVolumeRequest {
            id_or_name: id.to_string(),
            node_id,
            mode: mode as i32,
            readonly: req.readonly,
            force: false,
        };
        let a = self
            .volumed
            .call("PublishVolume", |mut c| {
                let r = preq.clone();
                async move { c.publish_volume(r).await }
            })
            .await
            .map_err(|s| from_volumed(s, &ctx))?;
        tracing::info!(node_id, generation = a.generation, "volume published");
        Ok(csi::ControllerPublishVolumeResponse { publish_context: publish_context(&a) })
    }

    pub(crate) async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let id = req.volume_id.as_str();
        // An empty node id means "from every node" (volumed: 0).
        let node_id = if req.node_id.is_empty() {
            0
        } else {
            match parse_node_id(&req.node_id) {
                Some(n) => n,
                // No such node can hold the volume: already unpublished.
                None => return Ok(csi::ControllerUnpublishVolumeResponse {}),
            }
        };
        let Some(v) = self.volume_by_id(id).await? else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        if node_id != 0 && !publications(&v).any(|a| a.node_id == node_id) {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        let ureq = vd::UnpublishVolumeRequest { id_or_name: id.to_string(), node_id };
        match self
            .volumed
            .call("UnpublishVolume", |mut c| {
                let r = ureq.clone();
                async move { c.unpublish_volume(r).await }
            })
            .await
        {
            Ok(_) => Ok(csi::ControllerUnpublishVolumeResponse {}),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(csi::ControllerUnpublishVolumeResponse {}),
            Err(s) => Err(from_volumed(s, format!("volume {id}, node {}", req.node_id))),
        }
    }
}
