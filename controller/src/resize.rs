//! ControllerExpandVolume and ControllerModifyVolume.

use volumed_csi::access;
use volumed_csi::capacity;
use volumed_csi::errors::{from_volumed, CsiError};
use volumed_csi::params::{QosSpec, VolumeKind};
use volumed_csi::proto::{self as csi};
use volumed_proto::volumed::v1 as vd;

use crate::service::{stored_spec, ControllerService};

impl ControllerService {
    pub(crate) async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let range = req.capacity_range.ok_or(CsiError::Missing("capacity_range"))?;
        let cap = match req.volume_capability.as_ref() {
            Some(c) => Some(access::parse_capability(Some(c), "volume_capability")?),
            None => None,
        };
        let id = req.volume_id.as_str();
        let v = self.existing_volume(id).await?;
        let current = v.size_bytes;
        if range.limit_bytes > 0 && (range.limit_bytes as u64) < current {
            return Err(CsiError::OutOfRange(format!(
                "volume {id} is already {current} bytes, above limit_bytes {}; volumes do not shrink",
                range.limit_bytes
            )));
        }
        let wanted = capacity::resolve(Some(&range), current)?;
        // A filesystem on a block volume grows on the node (NodeExpandVolume);
        // raw block and file volumes are done once volumed has grown them.
        let node_expansion_required =
            stored_spec(&v).kind == VolumeKind::Block && !cap.as_ref().is_some_and(|c| c.is_block());
        if wanted <= current {
            return Ok(csi::ControllerExpandVolumeResponse {
                capacity_bytes: capacity::to_i64(current),
                node_expansion_required,
            });
        }
        let rreq = vd::ResizeVolumeRequest { id_or_name: id.to_string(), size_bytes: wanted };
        let resized = self
            .volumed
            .call("ResizeVolume", |mut c| {
                let r = rreq.clone();
                async move { c.resize_volume(r).await }
            })
            .await
            .map_err(|s| from_volumed(s, format!("volume {id}: growing to {wanted} bytes")))?;
        tracing::info!(from = current, to = resized.size_bytes, "volume expanded");
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: capacity::to_i64(resized.size_bytes),
            node_expansion_required,
        })
    }

    pub(crate) async fn modify(
        &self,
        req: csi::ControllerModifyVolumeRequest,
    ) -> Result<csi::ControllerModifyVolumeResponse, CsiError> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        if req.mutable_parameters.is_empty() {
            return Err(CsiError::Missing("mutable_parameters"));
        }
        let change = QosSpec::from_mutable(&req.mutable_parameters)?;
        let id = req.volume_id.as_str();
        let v = self.existing_volume(id).await?;
        let mut qos = stored_spec(&v).qos;
        change.apply(&mut qos);
        // Send every changed key, normalised; "0" clears a limit.
        let parameters = req
            .mutable_parameters
            .keys()
            .map(|k| {
                let value = match k.as_str() {
                    volumed_csi::params::QOS_READ_IOPS => qos.read_iops,
                    volumed_csi::params::QOS_WRITE_IOPS => qos.write_iops,
                    volumed_csi::params::QOS_READ_BPS => qos.read_bytes_per_sec,
                    _ => qos.write_bytes_per_sec,
                };
                (k.clone(), value.unwrap_or(0).to_string())
            })
            .collect();
        let mreq = vd::ModifyVolumeRequest { id_or_name: id.to_string(), parameters };
        self.volumed
            .call("ModifyVolume", |mut c| {
                let r = mreq.clone();
                async move { c.modify_volume(r).await }
            })
            .await
            .map_err(|s| from_volumed(s, format!("volume {id}")))?;
        Ok(csi::ControllerModifyVolumeResponse {})
    }
}
