//! Whole-cluster restarts: every node killed at once (a power cut of the
//! processes), and every node stopped cleanly. Volumes with one and with
//! three replicas must come back with all their data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use volumed_nbd::client::{ClientOptions, NbdClient};
use volumed_nbd::BlockDevice;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::workload::{fill, verify, Ledger, Writer};

/// Blocks filled in every volume before the restart.
const FILLED: u64 = 1024;

struct Vol {
    id: String,
    name: String,
    ledger: Ledger,
}

/// Two volumes of one replica and two of three, each with 4 MiB of known
/// data.
async fn volumes_with_data(cluster: &Cluster) -> Vec<Vol> {
    let mut out = Vec::new();
    for (name, r) in [("r1-a", 1), ("r3-a", 3), ("r1-b", 1), ("r3-b", 3)] {
        let v = cluster.create_volume(name, 32 << 20, r).await;
        let client = cluster.nbd_client(&v.id, &[], ClientOptions::default()).await;
        let ledger = fill(&client, 0, FILLED, 64, 4).await;
        client.flush().await.expect("flush");
        client.close().await;
        out.push(Vol { id: v.id, name: name.into(), ledger });
    }
    // The single-replica volumes must not all sit on one node, or the test
    // would not cover a restart of each node's own groups.
    let mut holders = Vec::new();
    for v in &out {
        let got = cluster.get_volume(&v.id).await;
        if got.replica_count == 1 {
            holders.push(got.replicas[0].node_id);
        }
    }
    assert_ne!(holders[0], holders[1], "single-replica volumes were placed on the same node");
    out
}

async fn wait_all_led(cluster: &Cluster, vols: &[Vol]) {
    for v in vols {
        cluster
            .wait_volume(&v.id, Duration::from_secs(120), "a leader after the restart", |x| {
                x.leader_node_id != 0 && x.state != pb::VolumeState::Unavailable as i32
            })
            .await;
    }
}

async fn verify_all(cluster: &Cluster, vols: &[Vol]) {
    for v in vols {
        let client = cluster.nbd_client(&v.id, &[], ClientOptions::default()).await;
        let n = verify(&*client, &v.ledger, 0, FILLED).await.unwrap_or_else(|e| panic!("volume {}: {e}", v.name));
        assert_eq!(n, FILLED, "volume {}", v.name);
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_sigkill_and_restart_keeps_every_volume() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vols = volumes_with_data(&cluster).await;

    // A writer keeps going on a three-replica volume across the outage:
    // its client reconnects and replays what was in flight when the
    // processes died.
    let busy = cluster.create_volume("busy", 32 << 20, 3).await;
    let opts = ClientOptions { io_timeout: Duration::from_secs(240), ..ClientOptions::default() };
    let client: Arc<NbdClient> = cluster.nbd_client(&busy.id, &[], opts).await;
    let writer = Writer::start(client.clone(), 0, 2048, 8, 0x5eed);
    writer.wait_acks(300, Duration::from_secs(60)).await;

    for i in 0..cluster.nodes.len() {
        cluster.kill(i);
    }
    let down = Instant::now();
    for i in 0..cluster.nodes.len() {
        cluster.restart(i);
    }
    cluster.wait_ready(3, Duration::from_secs(120)).await;
    println!("cluster ready {} ms after SIGKILL of every node", down.elapsed().as_millis());
    wait_all_led(&cluster, &vols).await;

    writer.wait_acks(300, Duration::from_secs(240)).await;
    let ledger = writer.stop().await;
    println!(
        "writer: pause across the outage {} ms, {} acknowledged, client stats {:?}",
        ledger.longest_pause(down, ledger.last_ack().unwrap()).as_millis(),
        ledger.acks,
        client.stats()
    );
    assert!(
        ledger.failures.is_empty(),
        "writes failed across the restart: {:?}",
        &ledger.failures[..ledger.failures.len().min(5)]
    );
    verify(&*client, &ledger, 0, 2048).await.unwrap_or_else(|e| panic!("busy volume: {e}"));
    client.close().await;
    verify_all(&cluster, &vols).await;

    let listed = cluster.admin().await.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.volumes.len(), 5, "{listed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clean_stop_of_every_node_exits_zero_and_keeps_data() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vols = volumes_with_data(&cluster).await;

    // Stop in turn: the last nodes stop without a quorum, which must not
    // keep them from exiting cleanly.
    for i in 0..cluster.nodes.len() {
        let t = Instant::now();
        let status = cluster.stop(i).expect("node was running");
        println!("node {i} stopped in {} ms: {status}", t.elapsed().as_millis());
        assert!(status.success(), "node {i} exited with {status}\n{}", cluster.logs_tail(20));
        // RocksDB was closed before the process ended, not left to the
        // exit path.
        assert_eq!(cluster.log_count(i, &["database closed"]), 1, "node {i}\n{}", cluster.logs_tail(10));
    }
    for i in 0..cluster.nodes.len() {
        cluster.restart(i);
    }
    cluster.wait_ready(3, Duration::from_secs(120)).await;
    wait_all_led(&cluster, &vols).await;
    verify_all(&cluster, &vols).await;

    // And a clean stop with I/O in flight: the NBD server drains it first.
    let client = cluster.nbd_client(&vols[1].id, &[], ClientOptions::default()).await;
    let writer = Writer::start(client.clone(), FILLED, 512, 4, 0xc1ea);
    writer.wait_acks(100, Duration::from_secs(60)).await;
    let victim = cluster.leader_index(&vols[1].id).await;
    let status = cluster.stop(victim).expect("running");
    assert!(status.success(), "node {victim} exited with {status} while serving I/O");
    writer.wait_acks(100, Duration::from_secs(120)).await;
    let ledger = writer.stop().await;
    assert!(
        ledger.failures.is_empty(),
        "writes failed across a clean stop: {:?}",
        &ledger.failures[..ledger.failures.len().min(5)]
    );
    verify(&*client, &ledger, FILLED, 512).await.unwrap_or_else(|e| panic!("{e}"));
    client.close().await;
}
