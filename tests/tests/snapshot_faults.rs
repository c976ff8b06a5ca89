//! Snapshots under faults (issue 5): a snapshot whose CreateSnapshot
//! returned survives the volume leader's death (the new leader has it), a
//! full cluster restart, and a replica rebuild (the rebuilt replica holds
//! every snapshot's data). What a replica holds is read straight from it
//! with the peer `ReadSnapshot` call, so no other replica can stand in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::Code;
use volumed_nbd::client::ClientOptions;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::workload::{fill, make_block, verify, Ledger};

const MIB: u64 = 1 << 20;
const END: u64 = 64 * MIB / 4096;

/// The snapshot content a replica returned must be exactly `ledger`'s
/// blocks (and nothing else).
fn assert_holds(got: &BTreeMap<u64, Vec<u8>>, ledger: &Ledger, what: &str) {
    assert_eq!(got.len(), ledger.blocks.len(), "{what}: number of blocks with data");
    for (block, rec) in &ledger.blocks {
        let seq = rec.acked.expect("filled blocks are acknowledged");
        let data = got.get(block).unwrap_or_else(|| panic!("{what}: block {block} missing"));
        assert!(*data == make_block(*block, seq), "{what}: block {block} differs");
    }
}

async fn holders(cluster: &Cluster, v: &pb::Volume) -> Vec<usize> {
    let mut out = Vec::new();
    for r in &v.replicas {
        out.push(cluster.index_of(r.node_id).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_survives_leader_death_and_full_restart() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("v", 64 * MIB, 3).await;
    let dev = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    let a = fill(&dev, 0, 1024, 64, 8).await;
    let leader = cluster.leader_index(&vol.id).await;
    let old_leader_id = cluster.node_id(leader).await;

    // The leader dies the moment CreateSnapshot returned.
    let snap = cluster.create_snapshot("s1", "v").await;
    cluster.kill(leader);
    let killed = Instant::now();
    let v = cluster
        .wait_volume(&vol.id, Duration::from_secs(30), "a new leader", |v| {
            v.leader_node_id != 0 && v.leader_node_id != old_leader_id
        })
        .await;
    let new_leader = cluster.index_of(v.leader_node_id).await;
    println!("new leader {new_leader} after {} ms", killed.elapsed().as_millis());
    let got = cluster.read_snapshot_on(new_leader, &vol.id, snap.log_index, END).await.expect("read on the new leader");
    assert_holds(&got, &a, "new leader");
    let s = cluster.get_snapshot("s1").await.expect("snapshot listed");
    assert!(s.ready_to_use && s.log_index == snap.log_index, "{s:?}");

    // Writes go on. The old leader comes back and catches up: it holds
    // the snapshot too.
    let b = fill(&dev, 0, 1024, 64, 8).await;
    cluster.restart(leader);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match cluster.read_snapshot_on(leader, &vol.id, snap.log_index, END).await {
            Ok(got) => {
                assert_holds(&got, &a, "restarted old leader");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "old leader never served the snapshot: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A restore of it holds A.
    cluster.wait_ready(3, Duration::from_secs(30)).await;
    let r = cluster.restore("r1", "s1", false, 0).await;
    let rdev = cluster.nbd_client(&r.id, &[], ClientOptions::default()).await;
    verify(rdev.as_ref(), &a, 0, 1024).await.expect("restore after the leader change holds A");
    rdev.close().await;

    // Every node restarts: snapshots are state, not memory.
    dev.close().await;
    for i in 0..3 {
        cluster.stop(i);
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_ready(3, Duration::from_secs(90)).await;
    let after = cluster.leader_index(&vol.id).await;
    let got = cluster.read_snapshot_on(after, &vol.id, snap.log_index, END).await.expect("read after restart");
    assert_holds(&got, &a, "after a full restart");
    let dev = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    verify(dev.as_ref(), &b, 0, 1024).await.expect("the volume itself holds B");
    dev.close().await;
    // Not a snapshot index: refused, not answered with something else.
    let e = cluster.read_snapshot_on(after, &vol.id, snap.log_index + 1, END).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilt_replica_carries_every_snapshot() {
    let _serial = serial();
    let mut cluster =
        Cluster::start(ClusterOptions { nodes: 4, bootstrap_expect: 4, down_grace: "3s".into(), ..Default::default() })
            .await;
    let vol = cluster.create_volume("v", 64 * MIB, 3).await;
    let placed = holders(&cluster, &vol).await;
    let spare = (0..4).find(|i| !placed.contains(i)).expect("a node without a replica");
    let dev = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    // Three generations of data, two snapshots between them.
    let a = fill(&dev, 0, 2048, 64, 8).await;
    let s1 = cluster.create_snapshot("gen-a", "v").await;
    let b = fill(&dev, 0, 1024, 64, 8).await;
    let s2 = cluster.create_snapshot("gen-b", "v").await;
    let c = fill(&dev, 512, 1024, 64, 8).await;
    dev.close().await;

    let leader = cluster.leader_index(&vol.id).await;
    let catalog = cluster.catalog_leader_index().await;
    let lost = *placed.iter().find(|i| **i != leader && **i != catalog).unwrap_or(&placed[0]);
    let spare_id = cluster.node_id(spare).await;
    cluster.kill(lost);
    cluster
        .wait_volume(&vol.id, Duration::from_secs(120), "rebuilt on the spare", |v| {
            v.state == pb::VolumeState::Healthy as i32 && v.replicas.iter().any(|r| r.node_id == spare_id)
        })
        .await;

    // The rebuilt replica serves both snapshots by itself.
    let mut want_b = Ledger::default();
    for blk in 0..2048u64 {
        let src = if blk < 1024 { &b } else { &a };
        want_b.acked(blk, src.blocks[&blk].acked.expect("acked"));
    }
    let got = cluster.read_snapshot_on(spare, &vol.id, s1.log_index, END).await.expect("gen-a on the rebuilt replica");
    assert_holds(&got, &a, "rebuilt replica, gen-a");
    let got = cluster.read_snapshot_on(spare, &vol.id, s2.log_index, END).await.expect("gen-b on the rebuilt replica");
    assert_holds(&got, &want_b, "rebuilt replica, gen-b");

    // The current data is right there too, and the snapshots still restore.
    let r = cluster.restore("from-b", "gen-b", false, 0).await;
    let rdev = cluster.nbd_client(&r.id, &[], ClientOptions::default()).await;
    verify(rdev.as_ref(), &want_b, 0, 2048).await.expect("restore of gen-b after the rebuild");
    rdev.close().await;
    let dev = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    verify(dev.as_ref(), &c, 512, 1024).await.expect("current data after the rebuild");
    dev.close().await;
}
