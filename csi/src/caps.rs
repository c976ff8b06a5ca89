//! Capability tables: what each plugin advertises, in one place.
//!
//! Only what works is listed: the spec forbids advertising an RPC that
//! answers UNIMPLEMENTED. Snapshots, clones and group snapshots are served
//! by volumed's snapshot engine (cut in each volume's Raft log).

use volumed_proto::csi::v1::{
    controller_service_capability, group_controller_service_capability, node_service_capability, plugin_capability,
    ControllerServiceCapability, GroupControllerServiceCapability, NodeServiceCapability, PluginCapability,
};

use controller_service_capability::rpc::Type as CtrlRpc;
use group_controller_service_capability::rpc::Type as GroupRpc;
use node_service_capability::rpc::Type as NodeRpc;

/// RPC capabilities of the controller service.
pub const CONTROLLER_RPCS: &[CtrlRpc] = &[
    CtrlRpc::CreateDeleteVolume,
    CtrlRpc::PublishUnpublishVolume,
    CtrlRpc::ListVolumes,
    CtrlRpc::ListVolumesPublishedNodes,
    CtrlRpc::GetCapacity,
    CtrlRpc::ExpandVolume,
    CtrlRpc::GetVolume,
    CtrlRpc::VolumeCondition,
    CtrlRpc::SingleNodeMultiWriter,
    CtrlRpc::PublishReadonly,
    CtrlRpc::ModifyVolume,
    CtrlRpc::CreateDeleteSnapshot,
    CtrlRpc::ListSnapshots,
    CtrlRpc::GetSnapshot,
    CtrlRpc::CloneVolume,
];

/// RPC capabilities of the group controller service.
pub const GROUP_CONTROLLER_RPCS: &[GroupRpc] = &[GroupRpc::CreateDeleteGetVolumeGroupSnapshot];

/// RPC capabilities of the node service.
pub const NODE_RPCS: &[NodeRpc] = &[
    NodeRpc::StageUnstageVolume,
    NodeRpc::GetVolumeStats,
    NodeRpc::ExpandVolume,
    NodeRpc::VolumeCondition,
    NodeRpc::SingleNodeMultiWriter,
    NodeRpc::VolumeMountGroup,
];

pub fn controller_capabilities() -> Vec<ControllerServiceCapability> {
    CONTROLLER_RPCS
        .iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: *t as i32,
            })),
        })
        .collect()
}

pub fn group_controller_capabilities() -> Vec<GroupControllerServiceCapability> {
    GROUP_CONTROLLER_RPCS
        .iter()
        .map(|t| GroupControllerServiceCapability {
            r#type: Some(group_controller_service_capability::Type::Rpc(group_controller_service_capability::Rpc {
                r#type: *t as i32,
            })),
        })
        .collect()
}

pub fn node_capabilities() -> Vec<NodeServiceCapability> {
    NODE_RPCS
        .iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: *t as i32 })),
        })
        .collect()
}

/// Plugin-level capabilities (Identity.GetPluginCapabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PluginFeatures {
    pub controller_service: bool,
    pub accessibility_constraints: bool,
    pub online_expansion: bool,
    /// Group snapshots (one consistent cut across volumes).
    pub group_controller_service: bool,
}

impl PluginFeatures {
    /// What both binaries advertise today. Both report the same set: the
    /// CO asks either socket and must get one answer for the driver.
    pub const fn current() -> PluginFeatures {
        PluginFeatures {
            controller_service: true,
            accessibility_constraints: true,
            online_expansion: true,
            group_controller_service: true,
        }
    }

    pub fn capabilities(&self) -> Vec<PluginCapability> {
        use plugin_capability::service::Type as Svc;
        let svc = |t: Svc| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })),
        };
        let mut out = Vec::new();
        if self.controller_service {
            out.push(svc(Svc::ControllerService));
        }
        if self.accessibility_constraints {
            out.push(svc(Svc::VolumeAccessibilityConstraints));
        }
        if self.group_controller_service {
            out.push(svc(Svc::GroupControllerService));
        }
        if self.online_expansion {
            out.push(PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                })),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_clone_capabilities_are_advertised() {
        for wanted in
            [CtrlRpc::CreateDeleteSnapshot, CtrlRpc::ListSnapshots, CtrlRpc::GetSnapshot, CtrlRpc::CloneVolume]
        {
            assert!(CONTROLLER_RPCS.contains(&wanted), "{wanted:?}");
        }
        assert!(PluginFeatures::current().group_controller_service);
        assert_eq!(
            group_controller_capabilities(),
            vec![GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(
                    group_controller_service_capability::Rpc {
                        r#type: GroupRpc::CreateDeleteGetVolumeGroupSnapshot as i32
                    }
                )),
            }]
        );
    }

    #[test]
    fn tables_render() {
        assert_eq!(controller_capabilities().len(), CONTROLLER_RPCS.len());
        assert_eq!(node_capabilities().len(), 6);
        let caps = PluginFeatures::current().capabilities();
        assert_eq!(caps.len(), 4);
        let svc = |t: plugin_capability::service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })),
        };
        assert!(caps.contains(&svc(plugin_capability::service::Type::GroupControllerService)));
    }
}
