//! Self-healing: a node lost for good has its replicas rebuilt on a spare
//! node (after `--node-down-grace`), visible as REBUILDING with progress
//! and then HEALTHY; the rebuilt replica holds the data (it serves in a
//! majority once another original replica dies); the lost node, when it
//! comes back, drops its stale copy and never serves it. `RemoveNode` moves
//! replicas at once, without waiting for any grace period.

mod support;

use std::time::{Duration, Instant};

use volumed_nbd::client::{ClientOptions, NbdClient, StaticEndpoints};
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::workload::{fill, verify};

/// Node indexes holding replicas of `v`.
async fn holders(cluster: &Cluster, v: &pb::Volume) -> Vec<usize> {
    let mut out = Vec::new();
    for r in &v.replicas {
        out.push(cluster.index_of(r.node_id).await);
    }
    out
}

fn healthy_on(v: &pb::Volume, count: usize) -> bool {
    v.state == pb::VolumeState::Healthy as i32
        && v.replicas.len() == count
        && v.replicas.iter().all(|r| r.state == pb::ReplicaState::Healthy as i32)
}

/// Polls the line `needle` in node `i`'s log.
async fn wait_log(cluster: &Cluster, i: usize, needle: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(&cluster.node(i).log).unwrap_or_default();
        if text.lines().any(|l| needle.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(Instant::now() < deadline, "node {i} never logged {needle:?}\n{}", cluster.logs_tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_node_is_rebuilt_on_a_spare_and_its_stale_copy_dropped() {
    let _serial = serial();
    let mut cluster =
        // The copy is paced (at about 5 s for the 200 MiB below), so the
        // progress reports of the catalog can catch it half-way on any machine.
        Cluster::start(ClusterOptions {
            nodes: 4,
            bootstrap_expect: 4,
            down_grace: "3s".into(),
            extra_args: vec!["--rebuild-bandwidth".into(), "40Mi".into()],
            ..Default::default()
        })
        .await;
    let vol = cluster.create_volume("rebuild", 256 << 20, 3).await;
    let placed = holders(&cluster, &vol).await;
    // A second volume on the same nodes, deleted while the lost node is
    // away: it must drop that copy too when it comes back.
    let doomed = cluster.create_volume("doomed", 16 << 20, 3).await;
    let doomed_placed = holders(&cluster, &doomed).await;
    let c = cluster.nbd_client(&doomed.id, &[], ClientOptions::default()).await;
    fill(&c, 0, 256, 64, 4).await;
    c.close().await;
    let spare = (0..4).find(|i| !placed.contains(i)).expect("a node without a replica");

    // 200 MiB of known data, so the copy takes a while.
    let blocks = 200 * 256;
    let client = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    let t = Instant::now();
    let ledger = fill(&client, 0, blocks, 256, 8).await;
    println!("wrote 200 MiB in {} ms", t.elapsed().as_millis());
    client.close().await;

    let leader = cluster.leader_index(&vol.id).await;
    let catalog = cluster.catalog_leader_index().await;
    let both: Vec<usize> = placed.iter().copied().filter(|i| doomed_placed.contains(i)).collect();
    let lost = *both.iter().find(|i| **i != leader && **i != catalog).unwrap_or(&both[0]);
    let lost_id = cluster.node_id(lost).await;
    let spare_id = cluster.node_id(spare).await;
    println!("replicas on {placed:?}, leader {leader}, catalog leader {catalog}; losing node {lost}, spare {spare}");
    cluster.kill(lost);
    let killed = Instant::now();

    // Watch the rebuild closely.
    let mut admin = cluster.admin().await;
    let mut saw_rebuilding = None;
    let mut progress: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let v = admin
            .get_volume(pb::GetVolumeRequest { id_or_name: vol.id.clone() })
            .await
            .expect("get volume")
            .into_inner();
        if v.state == pb::VolumeState::Rebuilding as i32 {
            saw_rebuilding.get_or_insert(killed.elapsed());
            if let Some(r) = v.replicas.iter().find(|r| r.node_id == spare_id) {
                if progress.last() != Some(&(r.rebuild_bytes_done, r.rebuild_bytes_total)) {
                    progress.push((r.rebuild_bytes_done, r.rebuild_bytes_total));
                }
            }
        }
        if healthy_on(&v, 3) && v.replicas.iter().any(|r| r.node_id == spare_id) {
            break v;
        }
        assert!(Instant::now() < deadline, "rebuild did not finish: {v:#?}\n{}", cluster.logs_tail(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "REBUILDING seen {:?} after the kill; HEALTHY after {} ms; progress samples (done, total): {progress:?}",
        saw_rebuilding,
        killed.elapsed().as_millis()
    );
    assert!(saw_rebuilding.is_some(), "the volume never showed REBUILDING");
    assert!(progress.iter().any(|(d, t)| *d > 0 && *d < *t), "no partial rebuild progress was reported: {progress:?}");
    assert!(progress.iter().all(|(d, t)| d <= t), "{progress:?}");
    // (A total of 0 means "not known yet": no leader report at hand.)
    assert!(
        progress.iter().all(|(_, t)| *t == 0 || *t >= 200 << 20),
        "total must cover the 200 MiB written: {progress:?}"
    );
    assert!(done.replicas.iter().all(|r| r.node_id != lost_id), "{done:#?}");

    // The catalog must have replaced the lost voter before another node
    // may go (else the admin API loses its quorum).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = admin.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
        if !s.catalog_voters.contains(&lost_id) && s.catalog_voters.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "lost node still a catalog voter: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let gone = cluster
        .admin()
        .await
        .delete_volume(pb::DeleteVolumeRequest { id_or_name: doomed.id.clone() })
        .await
        .expect("delete");
    assert!(gone.into_inner().existed);

    // The lost node comes back: its copy is stale and no longer placed.
    let back = Instant::now();
    cluster.restart(lost);
    cluster.wait_heard_from(lost, back, Duration::from_secs(60)).await;
    wait_log(&cluster, lost, &["replica dropped and its data deleted", &vol.id], Duration::from_secs(60)).await;
    wait_log(&cluster, lost, &["replica dropped and its data deleted", &doomed.id], Duration::from_secs(60)).await;
    let v = cluster.wait_volume(&vol.id, Duration::from_secs(60), "healthy", |v| healthy_on(v, 3)).await;
    assert!(v.replicas.iter().all(|r| r.node_id != lost_id), "the stale replica is still reported: {v:#?}");
    assert_ne!(v.leader_node_id, lost_id);
    // Its NBD endpoint serves the volume — from the real group, by
    // forwarding to the leader — and never its stale copy.
    let only_lost = std::sync::Arc::new(StaticEndpoints(vec![cluster.node(lost).nbd_addr()]));
    let via_lost = NbdClient::connect(only_lost, vol.id.clone(), ClientOptions::default()).await.expect("connect");
    verify(&*via_lost, &ledger, 0, 4096).await.unwrap_or_else(|e| panic!("through the returned node: {e}"));
    via_lost.close().await;
    let status = cluster.stop(lost).expect("running");
    assert!(status.success(), "the returned node exited with {status}\n{}", cluster.logs_tail(10));
    for id in [&vol.id, &doomed.id] {
        let left = support::group_keys(&cluster.node(lost).data_dir, id);
        assert_eq!(left, 0, "the returned node still stores {left} keys of volume {id}");
    }

    // Kill one more original replica: the new one is now half of the
    // surviving majority, and every read comes from the group it is in.
    // (The lost node stays stopped, so nothing can replace this one while
    // the 200 MiB are read back.)
    let second = *placed.iter().find(|i| **i != lost).expect("another original replica");
    cluster.kill(second);
    let reader = cluster.nbd_client(&vol.id, &[spare], ClientOptions::default()).await;
    let n = verify(&*reader, &ledger, 0, blocks).await.unwrap_or_else(|e| panic!("after the rebuild: {e}"));
    assert_eq!(n, blocks);
    reader.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_node_moves_its_replicas_at_once() {
    let _serial = serial();
    // Default grace (5 minutes): only RemoveNode can move anything here.
    let cluster = Cluster::start(ClusterOptions { nodes: 4, bootstrap_expect: 4, ..Default::default() }).await;
    let vol = cluster.create_volume("evacuate", 64 << 20, 3).await;
    let client = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    let ledger = fill(&client, 0, 4096, 64, 8).await;
    client.close().await;

    let placed = holders(&cluster, &vol).await;
    let spare = (0..4).find(|i| !placed.contains(i)).expect("a spare");
    let catalog = cluster.catalog_leader_index().await;
    let gone = *placed.iter().find(|i| **i != catalog).expect("a replica off the catalog leader");
    let gone_id = cluster.node_id(gone).await;
    let spare_id = cluster.node_id(spare).await;

    let mut admin = cluster.admin().await;
    let t = Instant::now();
    let r = admin.remove_node(pb::RemoveNodeRequest { node_id: gone_id }).await.expect("remove node").into_inner();
    assert_eq!(r.replicas_moving, 1, "{r:?}");
    let v = cluster
        .wait_volume(&vol.id, Duration::from_secs(120), "moved off the removed node", |v| {
            healthy_on(v, 3)
                && v.replicas.iter().any(|r| r.node_id == spare_id)
                && v.replicas.iter().all(|r| r.node_id != gone_id)
        })
        .await;
    println!("replica moved off node {gone} to node {spare} in {} ms", t.elapsed().as_millis());
    assert_eq!(v.replicas.len(), 3);

    let nodes = admin.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let rec = nodes.iter().find(|n| n.node_id == gone_id).expect("removed node listed");
    assert_eq!(rec.state, pb::NodeState::Removed as i32, "{rec:?}");
    assert_eq!(rec.replicas, 0, "{rec:?}");
    // The removed node (still running) gives its copy up.
    wait_log(&cluster, gone, &["replica dropped and its data deleted", &vol.id], Duration::from_secs(60)).await;

    let reader = cluster.nbd_client(&vol.id, &[spare], ClientOptions::default()).await;
    verify(&*reader, &ledger, 0, 4096).await.unwrap_or_else(|e| panic!("after the move: {e}"));
    reader.close().await;
}
