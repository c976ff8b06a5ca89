//! Shared file volumes (kind=file, issue 7) through the real CSI plugins of
//! a running dev cluster: RWX on two nodes, a read-only publication, stats
//! with bytes and inodes, online expansion, and the refusals that keep
//! block volumes out of multi-node mounts.
//!
//! `cargo build --workspace --bins && cargo test -p volumed-csi --test
//! cluster_file_flow` as root (see `common`).

mod common;

use std::collections::HashMap;

use common::*;
use tonic::Code;
use volumed_csi::proto::{self as csi, volume_capability::access_mode::Mode, volume_usage::Unit};

fn usage(r: &csi::NodeGetVolumeStatsResponse, unit: Unit) -> (i64, i64) {
    r.usage.iter().find(|u| u.unit == unit as i32).map(|u| (u.total, u.used)).unwrap_or((0, 0))
}

#[tokio::test]
async fn file_volume_is_shared_between_nodes() {
    let c = Csi::connect(cluster());
    let rwx = mount_cap("", Mode::MultiNodeMultiWriter);
    let rox = mount_cap("", Mode::MultiNodeReaderOnly);

    // A block volume cannot be mounted by several writers.
    let e = code(c.create(&c.name("blk-rwx"), 64 * MIB, &[], vec![rwx.clone()]).await, Code::InvalidArgument);
    assert!(e.contains("kind=file"), "{e}");

    let v = c.create(&c.name("shared"), 64 * MIB, &[("kind", "file")], vec![rwx.clone(), rox.clone()]).await.unwrap();
    let pc0 = c.controller_publish(&v.volume_id, 0, rwx.clone(), false).await.unwrap();
    let pc1 = c.controller_publish(&v.volume_id, 1, rwx.clone(), false).await.unwrap();
    let (staging, t0, t1, tro) =
        ("plugins/shared/globalmount", "pods/a/volumes/data", "pods/b/volumes/data", "pods/c/volumes/data");
    c.stage(0, &v, staging, rwx.clone(), pc0.clone()).await.unwrap();
    c.stage(1, &v, staging, rwx.clone(), pc1.clone()).await.unwrap();
    // NodeStage twice is idempotent.
    c.stage(1, &v, staging, rwx.clone(), pc1.clone()).await.unwrap();
    c.publish(0, &v, staging, t0, rwx.clone(), false, pc0.clone()).await.unwrap();
    c.publish(1, &v, staging, t1, rwx.clone(), false, pc1.clone()).await.unwrap();
    c.publish(1, &v, staging, tro, rwx.clone(), true, pc1.clone()).await.unwrap();

    std::fs::write(c.nodes[0].path(&format!("{t0}/from-a")), b"written on node a").unwrap();
    std::fs::create_dir(c.nodes[1].path(&format!("{t1}/dir-b"))).unwrap();
    std::fs::write(c.nodes[1].path(&format!("{t1}/dir-b/from-b")), vec![7u8; 3 << 20]).unwrap();
    assert_eq!(std::fs::read(c.nodes[1].path(&format!("{t1}/from-a"))).unwrap(), b"written on node a");
    assert_eq!(std::fs::read(c.nodes[0].path(&format!("{t0}/dir-b/from-b"))).unwrap(), vec![7u8; 3 << 20]);
    assert_eq!(std::fs::read(c.nodes[1].path(&format!("{tro}/from-a"))).unwrap(), b"written on node a");
    let e = std::fs::write(c.nodes[1].path(&format!("{tro}/nope")), b"x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem, "{e}");

    let s = c.stats(0, &v.volume_id, t0).await;
    let (bytes_total, bytes_used) = usage(&s, Unit::Bytes);
    let (inodes_total, inodes_used) = usage(&s, Unit::Inodes);
    assert_eq!(bytes_total, 64 * MIB, "{s:?}");
    assert!(bytes_used >= 3 * MIB, "{s:?}");
    assert!(inodes_total > 0 && inodes_used >= 4, "{s:?}");

    // Expansion grows the quota online; nothing to do on the node.
    let r = c
        .ctrl
        .clone()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            volume_capability: Some(rwx.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.capacity_bytes >= 128 * MIB && !r.node_expansion_required, "{r:?}");
    c.nodes[1]
        .node
        .clone()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: c.nodes[1].p(t1),
            capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            staging_target_path: c.nodes[1].p(staging),
            volume_capability: Some(rwx.clone()),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    let mut grown = 0;
    for _ in 0..50 {
        grown = usage(&c.stats(1, &v.volume_id, t1).await, Unit::Bytes).0;
        if grown == 128 * MIB {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(grown, 128 * MIB, "statfs shows the new quota");

    for (node, target) in [(0, t0), (1, t1), (1, tro)] {
        c.unpublish(node, &v.volume_id, target).await.unwrap();
    }
    c.unstage(0, &v.volume_id, staging).await.unwrap();
    c.unstage(1, &v.volume_id, staging).await.unwrap();
    c.controller_unpublish(&v.volume_id, 0).await.unwrap();
    c.controller_unpublish(&v.volume_id, 1).await.unwrap();
    assert!(!c.nodes[0].path(t0).join("from-a").exists(), "nothing left at the target");
    c.delete(&v.volume_id).await.unwrap();
}
