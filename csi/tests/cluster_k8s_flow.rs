//! The Kubernetes flow end to end over the real plugin sockets of a running
//! cluster: what external-provisioner, external-attacher and kubelet do,
//! in their order.
//!
//! Every test starts a dev cluster of its own (`volctl dev up`; see
//! `common`): `cargo build --workspace --bins && cargo test -p volumed-csi
//! --test cluster_k8s_flow` as root. With `VOLUMED_CLUSTER_STATE=<state-dir>` the
//! tests use that running cluster instead.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use tonic::Code;
use volumed_csi::proto::{self as csi, volume_usage::Unit};

fn bytes_total(r: &csi::NodeGetVolumeStatsResponse) -> i64 {
    r.usage.iter().find(|u| u.unit == Unit::Bytes as i32).map(|u| u.total).unwrap_or(0)
}

/// ControllerPublish + NodeStage + NodePublish on `node`.
async fn attach(
    c: &Csi,
    node: usize,
    v: &csi::Volume,
    cap: csi::VolumeCapability,
    staging: &str,
    target: &str,
    readonly: bool,
) {
    let pc = c.controller_publish(&v.volume_id, node, cap.clone(), false).await.unwrap();
    c.stage(node, v, staging, cap.clone(), pc.clone()).await.unwrap();
    c.publish(node, v, staging, target, cap, readonly, pc).await.unwrap();
}

async fn detach(c: &Csi, node: usize, id: &str, staging: &str, target: &str) {
    c.unpublish(node, id, target).await.unwrap();
    c.unstage(node, id, staging).await.unwrap();
    c.controller_unpublish(id, node).await.unwrap();
}

#[tokio::test]
async fn three_replica_volume_moves_from_node_a_to_node_b() {
    let c = Csi::connect(cluster());
    assert!(c.nodes.len() >= 2, "needs two nodes");
    let v = c.create(&c.name("move"), 64 * MIB, &[("replicas", "3")], vec![ext4()]).await.unwrap();
    let (staging, target) = ("plugins/move/globalmount", "pods/a/volumes/data");
    attach(&c, 0, &v, ext4(), staging, target, false).await;
    let payload: Vec<u8> = (0..(3 * MIB) as u32).map(|i| (i % 253) as u8).collect();
    {
        let mut f = std::fs::File::create(c.nodes[0].path(&format!("{target}/payload"))).unwrap();
        f.write_all(&payload).unwrap();
        f.sync_all().unwrap();
    }
    detach(&c, 0, &v.volume_id, staging, target).await;

    let target_b = "pods/b/volumes/data";
    attach(&c, 1, &v, ext4(), staging, target_b, false).await;
    let back = std::fs::read(c.nodes[1].path(&format!("{target_b}/payload"))).unwrap();
    assert_eq!(back, payload, "node B sees what node A wrote");
    detach(&c, 1, &v.volume_id, staging, target_b).await;
    c.delete(&v.volume_id).await.unwrap();
}

#[tokio::test]
async fn expand_online() {
    let c = Csi::connect(cluster());
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let v = c.create(&c.name("expand"), 320 * MIB, &[("fsType", "xfs")], vec![xfs.clone()]).await.unwrap();
    let (staging, target) = ("plugins/expand/globalmount", "pods/e/volumes/data");
    attach(&c, 0, &v, xfs.clone(), staging, target, false).await;
    std::fs::write(c.nodes[0].path(&format!("{target}/keep")), b"k").unwrap();
    let before = bytes_total(&c.stats(0, &v.volume_id, target).await);

    let r = c
        .ctrl
        .clone()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 640 * MIB, limit_bytes: 0 }),
            volume_capability: Some(xfs.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.capacity_bytes >= 640 * MIB);
    assert!(r.node_expansion_required);
    let n = c.nodes[0]
        .node
        .clone()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: c.nodes[0].p(target),
            capacity_range: Some(csi::CapacityRange { required_bytes: 640 * MIB, limit_bytes: 0 }),
            staging_target_path: c.nodes[0].p(staging),
            volume_capability: Some(xfs.clone()),
            secrets: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(n.capacity_bytes >= 640 * MIB);
    let after = bytes_total(&c.stats(0, &v.volume_id, target).await);
    assert!(after > before + 250 * MIB, "filesystem grew online: {before} -> {after}");
    assert_eq!(std::fs::read(c.nodes[0].path(&format!("{target}/keep"))).unwrap(), b"k");
    detach(&c, 0, &v.volume_id, staging, target).await;
}

#[tokio::test]
async fn raw_block_round_trip_across_nodes() {
    let c = Csi::connect(cluster());
    assert!(c.nodes.len() >= 2, "needs two nodes");
    let cap = block_cap(Mode::SingleNodeWriter);
    let v = c.create(&c.name("block"), 16 * MIB, &[], vec![cap.clone()]).await.unwrap();
    let (staging, target) = ("plugins/block/staging", "pods/blk/volumeDevices/dev0");
    attach(&c, 0, &v, cap.clone(), staging, target, false).await;
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 249) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(c.nodes[0].path(target)).unwrap();
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    detach(&c, 0, &v.volume_id, staging, target).await;
    attach(&c, 1, &v, cap.clone(), staging, target, false).await;
    let mut back = vec![0u8; pattern.len()];
    {
        // Closed before NodeUnpublish, as a pod's files are.
        let mut f = std::fs::File::open(c.nodes[1].path(target)).unwrap();
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert_eq!(back, pattern);
    detach(&c, 1, &v.volume_id, staging, target).await;
    assert!(!c.nodes[1].path(target).exists(), "target file removed");
}

#[tokio::test]
async fn read_only_publish_refuses_writes() {
    let c = Csi::connect(cluster());
    let v = c.create(&c.name("ro"), 32 * MIB, &[], vec![ext4()]).await.unwrap();
    let staging = "plugins/ro/globalmount";
    let pc = c.controller_publish(&v.volume_id, 0, ext4(), false).await.unwrap();
    c.stage(0, &v, staging, ext4(), pc.clone()).await.unwrap();
    c.publish(0, &v, staging, "pods/rw/volumes/d", ext4(), false, pc.clone()).await.unwrap();
    std::fs::write(c.nodes[0].path("pods/rw/volumes/d/f"), b"data").unwrap();
    c.publish(0, &v, staging, "pods/ro/volumes/d", ext4(), true, pc.clone()).await.unwrap();
    let e = std::fs::write(c.nodes[0].path("pods/ro/volumes/d/g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EROFS), "{e}");
    assert_eq!(std::fs::read(c.nodes[0].path("pods/ro/volumes/d/f")).unwrap(), b"data");
    c.unpublish(0, &v.volume_id, "pods/ro/volumes/d").await.unwrap();
    c.unpublish(0, &v.volume_id, "pods/rw/volumes/d").await.unwrap();
    c.unstage(0, &v.volume_id, staging).await.unwrap();
    c.controller_unpublish(&v.volume_id, 0).await.unwrap();
}

/// errno of a write to a read-only filesystem (Linux).
const EROFS: i32 = 30;

#[tokio::test]
async fn bad_input_over_real_sockets() {
    let c = Csi::connect(cluster());
    let v = c.create(&c.name("bad"), 16 * MIB, &[], vec![ext4()]).await.unwrap();
    let n = &c.nodes[0];
    let root = n.info.kubelet_dir.to_string_lossy().into_owned();
    for path in [
        format!("{root}/../escape"),
        format!("{root}/a/./b"),
        "relative/x".to_string(),
        "/etc/volumed-test".to_string(),
    ] {
        let m = code(
            n.node
                .clone()
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    staging_target_path: path.clone(),
                    volume_capability: Some(ext4()),
                    volume_context: v.volume_context.clone(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(m.contains("staging_target_path"), "{path}: {m}");
    }
    let m = code(
        c.stage(0, &v, "plugins/bad/gm", mount_cap("ntfs", Mode::SingleNodeWriter), HashMap::new()).await,
        Code::InvalidArgument,
    );
    assert!(m.contains("ntfs"));
    for id in ["../../etc", "a/b", ""] {
        let bogus = csi::Volume { volume_id: id.into(), ..v.clone() };
        code(c.stage(0, &bogus, "plugins/bad/gm", ext4(), HashMap::new()).await, Code::InvalidArgument);
    }
    let ghost = csi::Volume { volume_id: MISSING_VOLUME.into(), ..v.clone() };
    let m = code(c.stage(0, &ghost, "plugins/bad/ghost", ext4(), HashMap::new()).await, Code::NotFound);
    assert!(m.contains(MISSING_VOLUME), "{m}");
    for id in ["not-a-uuid", "../../etc"] {
        code(
            c.ctrl.clone().controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.into() }).await,
            Code::NotFound,
        );
    }
}
