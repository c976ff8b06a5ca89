//! CSI conformance against a running volumed cluster: the ground of the
//! public csi-sanity suite (required fields, NOT_FOUND cases, idempotency
//! of every call, pagination, capacity semantics, the full lifecycle twice).
//!
//! Every test starts a dev cluster of its own (`volctl dev up`; see
//! `common`): `cargo build --workspace --bins && cargo test -p volumed-csi
//! --test cluster_conformance` as root. With `VOLUMED_CLUSTER_STATE=<state-dir>` the
//! tests use that running cluster instead.

mod common;

use std::collections::HashSet;

use common::*;
use tonic::Code;
use volumed_csi::proto::{self as csi};

#[tokio::test]
async fn identity() {
    let c = Csi::connect(cluster());
    let info = c.identity.clone().get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.volumed.dev");
    assert!(!info.vendor_version.is_empty());
    let probe = c.identity.clone().probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true), "controller ready with volumed up");
    let caps =
        c.identity.clone().get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert!(!caps.capabilities.is_empty());
    for n in &c.nodes {
        let ni = n.identity.clone().get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(ni.name, info.name, "one driver name on every socket");
        assert_eq!(n.identity.clone().probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
        let gi = n.node.clone().node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(gi.node_id, n.info.node_id, "NodeGetInfo gives the volumed node id");
        if let Some(t) = gi.accessible_topology {
            assert!(t.segments.keys().all(|k| volumed_csi::topology::is_topology_key(k)), "{t:?}");
        }
    }
}

#[tokio::test]
async fn create_volume_arguments_and_idempotency() {
    let c = Csi::connect(cluster());
    let mut ctrl = c.ctrl.clone();
    code(ctrl.create_volume(create_req("", None, &[], vec![ext4()])).await, Code::InvalidArgument);
    code(ctrl.create_volume(create_req(&c.name("nocaps"), None, &[], vec![])).await, Code::InvalidArgument);
    let m = code(
        ctrl.create_volume(create_req(&c.name("badparam"), None, &[("replicas", "x")], vec![ext4()])).await,
        Code::InvalidArgument,
    );
    assert!(m.contains("replicas"));

    let name = c.name("idem");
    let v1 = c.create(&name, 10 * MIB + 1, &[("replicas", "3")], vec![ext4()]).await.unwrap();
    assert!(v1.capacity_bytes > 10 * MIB);
    assert_eq!(v1.capacity_bytes % MIB, 0, "whole allocation units");
    let v2 = c.create(&name, 10 * MIB + 1, &[("replicas", "3")], vec![ext4()]).await.unwrap();
    assert_eq!(v1.volume_id, v2.volume_id, "same name, same volume");
    assert_eq!(v1.volume_context, v2.volume_context);
    let m = code(
        ctrl.create_volume(create_req(&name, Some((100 * MIB, 100 * MIB)), &[("replicas", "3")], vec![ext4()])).await,
        Code::AlreadyExists,
    );
    assert!(m.contains(&name), "{m}");
    let m = code(
        ctrl.create_volume(create_req(&name, Some((10 * MIB + 1, 0)), &[("replicas", "2")], vec![ext4()])).await,
        Code::AlreadyExists,
    );
    assert!(m.contains("replicas"), "{m}");

    // Capacity semantics.
    let v = c
        .ctrl
        .clone()
        .create_volume(create_req(&c.name("limit"), Some((0, 5 * MIB)), &[], vec![ext4()]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.track(&v.volume_id);
    assert!(v.capacity_bytes <= 5 * MIB && v.capacity_bytes > 0);
    code(
        ctrl.create_volume(create_req(&c.name("oor"), Some((MIB + 1, MIB + 2)), &[], vec![ext4()])).await,
        Code::OutOfRange,
    );
    let cap = ctrl.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner();
    // Bigger than the free space: RESOURCE_EXHAUSTED (the provisioner may
    // reschedule); bigger than any volume can be: OUT_OF_RANGE.
    let max = cap.maximum_volume_size.expect("maximum_volume_size");
    let huge = c.name("huge");
    let m = code(
        ctrl.create_volume(create_req(&huge, Some((max + GIB, 0)), &[], vec![ext4()])).await,
        Code::ResourceExhausted,
    );
    assert!(m.contains(&huge), "{m}");
    code(
        ctrl.create_volume(create_req(
            &c.name("toobig"),
            Some((volumed_csi::capacity::MAX_SIZE as i64 + GIB, 0)),
            &[],
            vec![ext4()],
        ))
        .await,
        Code::OutOfRange,
    );
    // Neither left a volume behind.
    code(ctrl.create_volume(create_req(&huge, Some((max + GIB, 0)), &[], vec![ext4()])).await, Code::ResourceExhausted);
}

#[tokio::test]
async fn delete_validate_get_not_found_cases() {
    let c = Csi::connect(cluster());
    let mut ctrl = c.ctrl.clone();
    code(ctrl.delete_volume(csi::DeleteVolumeRequest::default()).await, Code::InvalidArgument);
    c.delete(MISSING_VOLUME).await.unwrap();
    c.delete("malformed/id").await.unwrap();
    code(
        ctrl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: MISSING_VOLUME.into(),
            volume_capabilities: vec![ext4()],
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    code(
        ctrl.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: MISSING_VOLUME.into() }).await,
        Code::NotFound,
    );
    code(
        ctrl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: MISSING_VOLUME.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: GIB, limit_bytes: 0 }),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    code(
        ctrl.controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: MISSING_VOLUME.into(),
            mutable_parameters: [("qos.readIOPS".to_string(), "100".to_string())].into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    code(
        ctrl.controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: MISSING_VOLUME.into(),
            node_id: c.nodes[0].info.node_id.clone(),
            volume_capability: Some(ext4()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );

    let v = c.create(&c.name("val"), 16 * MIB, &[], vec![ext4()]).await.unwrap();
    let ok = ctrl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![ext4(), block_cap(Mode::SingleNodeWriter)],
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let no = ctrl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
    // Publish to a node that does not exist.
    code(
        ctrl.controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "999999".into(),
            volume_capability: Some(ext4()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    c.delete(&v.volume_id).await.unwrap();
    c.delete(&v.volume_id).await.unwrap();
}

#[tokio::test]
async fn list_volumes_pagination() {
    let c = Csi::connect(cluster());
    let mut ctrl = c.ctrl.clone();
    let mut mine = HashSet::new();
    for i in 0..5 {
        let v = c.create(&c.name(&format!("page{i}")), 8 * MIB, &[], vec![ext4()]).await.unwrap();
        mine.insert(v.volume_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut deleted_one = false;
    loop {
        let r = ctrl
            .list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        for e in &r.entries {
            let v = e.volume.as_ref().unwrap();
            seen.push(v.volume_id.clone());
            assert!(e.status.as_ref().unwrap().volume_condition.is_some());
        }
        if r.next_token.is_empty() {
            break;
        }
        // The last entry of a page disappears before the next call.
        if !deleted_one {
            if let Some(last) = r.entries.last().and_then(|e| e.volume.as_ref()) {
                if mine.contains(&last.volume_id) {
                    c.delete(&last.volume_id).await.unwrap();
                    mine.remove(&last.volume_id);
                    deleted_one = true;
                }
            }
        }
        token = r.next_token;
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no volume listed twice");
    assert!(mine.iter().all(|id| unique.contains(id)), "every volume of ours listed");
    code(
        ctrl.list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: "not-ours".into() }).await,
        Code::Aborted,
    );
}

#[tokio::test]
async fn get_capacity_per_topology() {
    let c = Csi::connect(cluster());
    let mut ctrl = c.ctrl.clone();
    let all = ctrl.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner();
    assert!(all.available_capacity > 0);
    assert!(all.maximum_volume_size.unwrap_or(0) > 0);
    let nowhere = ctrl
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [("topology.kubernetes.io/zone".to_string(), "no-such-zone".to_string())].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nowhere.available_capacity, 0);
    code(
        ctrl.get_capacity(csi::GetCapacityRequest {
            parameters: [("fsType".to_string(), "zfs".to_string())].into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
}

#[tokio::test]
async fn controller_publish_semantics() {
    let c = Csi::connect(cluster());
    assert!(c.nodes.len() >= 2, "needs two nodes");
    let v = c.create(&c.name("pub"), 16 * MIB, &[], vec![ext4()]).await.unwrap();
    let ctx1 = c.controller_publish(&v.volume_id, 0, ext4(), false).await.unwrap();
    let ctx2 = c.controller_publish(&v.volume_id, 0, ext4(), false).await.unwrap();
    assert_eq!(ctx1, ctx2, "idempotent");
    assert!(ctx1.contains_key("volumed.dev/generation"));
    let m = code(c.controller_publish(&v.volume_id, 1, ext4(), false).await, Code::FailedPrecondition);
    assert!(m.contains(&v.volume_id), "{m}");
    code(c.controller_publish(&v.volume_id, 0, ext4(), true).await, Code::AlreadyExists);
    let got = c
        .ctrl
        .clone()
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let st = got.status.unwrap();
    assert_eq!(st.published_node_ids, vec![c.nodes[0].info.node_id.clone()]);
    assert!(st.volume_condition.is_some());
    // Delete while published is refused.
    code(c.delete(&v.volume_id).await, Code::FailedPrecondition);
    c.controller_unpublish(&v.volume_id, 0).await.unwrap();
    c.controller_unpublish(&v.volume_id, 0).await.unwrap();
    // Now the second node may have it (a new fencing generation).
    let ctx3 = c.controller_publish(&v.volume_id, 1, ext4(), false).await.unwrap();
    let g = |m: &std::collections::HashMap<String, String>| m["volumed.dev/generation"].parse::<u64>().unwrap();
    assert!(g(&ctx3) > g(&ctx1), "generation bumped on move");
    c.controller_unpublish(&v.volume_id, 1).await.unwrap();
    // Unpublishing an unknown volume is not an error.
    c.ctrl
        .clone()
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: MISSING_VOLUME.into(),
            node_id: c.nodes[0].info.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn expand_and_modify() {
    let c = Csi::connect(cluster());
    let mut ctrl = c.ctrl.clone();
    let v = c.create(&c.name("grow"), 16 * MIB, &[("qos.readIOPS", "100")], vec![ext4()]).await.unwrap();
    code(
        ctrl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    let req = csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
        volume_capability: Some(ext4()),
        ..Default::default()
    };
    for _ in 0..2 {
        let r = ctrl.controller_expand_volume(req.clone()).await.unwrap().into_inner();
        assert!(r.capacity_bytes >= 32 * MIB);
        assert!(r.node_expansion_required, "a filesystem grows on the node");
    }
    let mut block = req.clone();
    block.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    assert!(!ctrl.controller_expand_volume(block).await.unwrap().into_inner().node_expansion_required);

    ctrl.controller_modify_volume(csi::ControllerModifyVolumeRequest {
        volume_id: v.volume_id.clone(),
        mutable_parameters: [("qos.readIOPS".to_string(), "500".to_string())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let m = code(
        ctrl.controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: v.volume_id.clone(),
            mutable_parameters: [("replicas".to_string(), "5".to_string())].into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("replicas"));
}

/// Create -> ControllerPublish -> Stage -> Publish -> write -> stats ->
/// Unpublish -> Unstage -> ControllerUnpublish -> Delete, twice, with every
/// call repeated (idempotency).
#[tokio::test]
async fn full_lifecycle_twice() {
    let c = Csi::connect(cluster());
    for round in 0..2 {
        let v = c.create(&c.name(&format!("life{round}")), 64 * MIB, &[], vec![ext4()]).await.unwrap();
        let mut pc = Default::default();
        for _ in 0..2 {
            pc = c.controller_publish(&v.volume_id, 0, ext4(), false).await.unwrap();
        }
        let staging = format!("plugins/csi/life{round}/globalmount");
        let target = format!("pods/life{round}/volumes/mount");
        for _ in 0..2 {
            c.stage(0, &v, &staging, ext4(), pc.clone()).await.unwrap();
        }
        for _ in 0..2 {
            c.publish(0, &v, &staging, &target, ext4(), false, pc.clone()).await.unwrap();
        }
        std::fs::write(c.nodes[0].path(&format!("{target}/round")), format!("{round}")).unwrap();
        let st = c.nodes[0]
            .node
            .clone()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: c.nodes[0].p(&target),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.usage.len(), 2, "bytes and inodes");
        assert!(!st.volume_condition.unwrap().abnormal);
        for _ in 0..2 {
            c.unpublish(0, &v.volume_id, &target).await.unwrap();
        }
        for _ in 0..2 {
            c.unstage(0, &v.volume_id, &staging).await.unwrap();
        }
        for _ in 0..2 {
            c.controller_unpublish(&v.volume_id, 0).await.unwrap();
        }
        for _ in 0..2 {
            c.delete(&v.volume_id).await.unwrap();
        }
        code(
            c.ctrl
                .clone()
                .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
                .await,
            Code::NotFound,
        );
    }
}
