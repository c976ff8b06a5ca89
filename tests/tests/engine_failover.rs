//! Failover and degraded operation of a replicated volume under load.
//!
//! A writer keeps 8 self-describing 4 KiB writes in flight (see
//! `volumed_tests::workload`) while nodes are killed (SIGKILL), frozen
//! (SIGSTOP) or brought back. Afterwards every block must hold its latest
//! acknowledged version (or a later write whose outcome the client never
//! learned): an acknowledged write is never lost, whichever node died.
//! The pauses the writer saw are printed, never asserted.

use std::time::{Duration, Instant};

use bytes::Bytes;
use volumed_nbd::client::{ClientOptions, NbdClient, StaticEndpoints};
use volumed_nbd::BlockDevice;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::workload::{make_block, parse_block, verify, Writer};

const BLOCKS: u64 = 2048;
const DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// The volume's leader, which does not lead the catalog.
    VolumeLeader,
    /// The catalog leader, a follower of the volume.
    CatalogLeader,
    /// The node leading both the volume and the catalog.
    Both,
}

/// Client settings of the writers: a minute per request, and no giving up
/// on a quiet connection before that. A request held up somewhere in the
/// cluster (say, a forwarding node that lost track of the leader) then
/// fails the write instead of being rescued by the client reconnecting,
/// and the test fails on it.
fn writer_options() -> ClientOptions {
    ClientOptions {
        io_timeout: Duration::from_secs(60),
        stall_timeout: Duration::from_secs(90),
        ..ClientOptions::default()
    }
}

/// Node indexes holding replicas of `v`.
async fn replica_nodes(cluster: &Cluster, v: &pb::Volume) -> Vec<usize> {
    let mut out = Vec::new();
    for r in &v.replicas {
        out.push(cluster.index_of(r.node_id).await);
    }
    out
}

async fn leader_killed_under_load(kind: Victim) {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions { nodes: 4, bootstrap_expect: 4, ..Default::default() }).await;
    let catalog = cluster.catalog_leader_index().await;

    // Placement rotates the first replica (the one forming the group, and
    // so its first leader) over the nodes: a few volumes give every
    // leader/catalog-leader relation we need.
    let mut chosen = None;
    for i in 0..6 {
        let v = cluster.create_volume(&format!("failover-{i}"), 64 << 20, 3).await;
        let v = cluster
            .wait_volume(&v.id, Duration::from_secs(60), "healthy", |v| v.state == pb::VolumeState::Healthy as i32)
            .await;
        let leader = cluster.leader_index(&v.id).await;
        let nodes = replica_nodes(&cluster, &v).await;
        let fits = match kind {
            Victim::VolumeLeader => leader != catalog,
            Victim::CatalogLeader => leader != catalog && nodes.contains(&catalog),
            Victim::Both => leader == catalog,
        };
        if fits {
            chosen = Some((v, leader));
            break;
        }
    }
    let (vol, leader) = chosen.unwrap_or_else(|| panic!("no volume with the wanted leaders for {kind:?}"));
    let victim = match kind {
        Victim::VolumeLeader | Victim::Both => leader,
        Victim::CatalogLeader => catalog,
    };
    println!("{kind:?}: volume {} led by node {leader}, catalog led by node {catalog}; killing node {victim}", vol.id);

    let client = cluster.nbd_client(&vol.id, &[leader], writer_options()).await;
    let writer = Writer::start(client.clone(), 0, BLOCKS, DEPTH, 0xfa11_0000 + kind as u64);
    writer.wait_acks(400, Duration::from_secs(60)).await;

    let killed_at = Instant::now();
    let mut cluster = cluster;
    cluster.kill(victim);
    writer.wait_acks(400, Duration::from_secs(120)).await;
    let resumed = Instant::now();
    let ledger = writer.stop().await;
    let pause = ledger.longest_pause(killed_at, resumed);
    let stats = client.stats();
    println!(
        "{kind:?}: writer pause after SIGKILL of node {victim}: {} ms (client reconnects {}, replayed {}, last reconnect pause {:?}); {} writes acknowledged",
        pause.as_millis(),
        stats.reconnects,
        stats.replayed,
        stats.last_pause,
        ledger.acks
    );
    assert!(
        ledger.failures.is_empty(),
        "writes failed during failover: {:?}",
        &ledger.failures[..ledger.failures.len().min(5)]
    );

    let victim_id = {
        let v = cluster.get_volume(&vol.id).await;
        let mut id = 0;
        for r in &v.replicas {
            if cluster.index_of(r.node_id).await == victim {
                id = r.node_id;
            }
        }
        id
    };
    let after = cluster
        .wait_volume(&vol.id, Duration::from_secs(60), "a new leader", |v| {
            v.leader_node_id != 0 && v.leader_node_id != victim_id
        })
        .await;
    let new_leader = cluster.index_of(after.leader_node_id).await;
    println!("{kind:?}: new volume leader is node {new_leader}");
    assert_ne!(new_leader, victim);

    // Read back through a fresh connection to the new leader.
    let reader = cluster.nbd_client(&vol.id, &[new_leader], ClientOptions::default()).await;
    let written = verify(&*reader, &ledger, 0, BLOCKS).await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    assert!(written > 100, "the writer wrote only {written} blocks");
    reader.close().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_leader_sigkill_loses_no_acknowledged_write() {
    leader_killed_under_load(Victim::VolumeLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_leader_sigkill_loses_no_acknowledged_write() {
    leader_killed_under_load(Victim::CatalogLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_and_catalog_leader_sigkill_loses_no_acknowledged_write() {
    leader_killed_under_load(Victim::Both).await;
}

#[derive(Debug, Clone, Copy)]
enum Down {
    Kill,
    Stop,
}

/// One follower of three down: the other two are a majority and writes go
/// on; once it is back the volume is healthy again and everything verifies.
async fn one_follower_down(how: Down) {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("degraded", 64 << 20, 3).await;
    let leader = cluster.leader_index(&vol.id).await;
    let catalog = cluster.catalog_leader_index().await;
    // A follower that does not lead the catalog either, so the admin API
    // stays responsive while it is frozen.
    let follower = (0..3).find(|i| *i != leader && *i != catalog).expect("a plain follower");

    let client = cluster.nbd_client(&vol.id, &[leader], writer_options()).await;
    let writer = Writer::start(client.clone(), 0, BLOCKS, DEPTH, 0xde9_0000 + how as u64);
    writer.wait_acks(300, Duration::from_secs(60)).await;
    let down_at = Instant::now();
    match how {
        Down::Kill => cluster.kill(follower),
        Down::Stop => cluster.pause(follower),
    }
    writer.wait_acks(600, Duration::from_secs(120)).await;
    let pause = writer.ledger.lock().unwrap().longest_pause(down_at, Instant::now());
    println!("{how:?} of follower node {follower}: longest writer pause {} ms", pause.as_millis());
    // The catalog learns of the loss from missing heartbeats (a few
    // seconds); writes go on meanwhile.
    cluster
        .wait_volume(&vol.id, Duration::from_secs(60), "DEGRADED", |v| {
            v.state == pb::VolumeState::Degraded as i32
                && v.replicas.iter().filter(|r| r.state == pb::ReplicaState::Healthy as i32).count() == 2
        })
        .await;
    writer.wait_acks(100, Duration::from_secs(60)).await;

    match how {
        Down::Kill => cluster.restart(follower),
        Down::Stop => cluster.resume(follower),
    }
    writer.wait_acks(300, Duration::from_secs(120)).await;
    let ledger = writer.stop().await;
    assert!(ledger.failures.is_empty(), "writes failed: {:?}", &ledger.failures[..ledger.failures.len().min(5)]);
    cluster
        .wait_volume(&vol.id, Duration::from_secs(120), "healthy again", |v| {
            v.state == pb::VolumeState::Healthy as i32
                && v.replicas.len() == 3
                && v.replicas.iter().all(|r| r.state == pb::ReplicaState::Healthy as i32)
        })
        .await;
    verify(&*client, &ledger, 0, BLOCKS).await.unwrap_or_else(|e| panic!("{how:?}: {e}"));

    // The follower that was down must have caught up: make it serve a
    // majority with the old leader gone.
    cluster.kill(leader);
    let reader = cluster.nbd_client(&vol.id, &[follower], ClientOptions::default()).await;
    verify(&*reader, &ledger, 0, BLOCKS).await.unwrap_or_else(|e| panic!("{how:?}, read after the leader died: {e}"));
    reader.close().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_follower_sigkilled_writes_continue() {
    one_follower_down(Down::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_follower_sigstopped_writes_continue() {
    one_follower_down(Down::Stop).await;
}

/// Two of three replicas down: no write can be acknowledged (it would not
/// be on a majority); the client's requests time out with a clear error.
/// One node back: writes resume, and nothing acknowledged was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_three_down_stalls_then_resumes() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("stall", 64 << 20, 3).await;
    let leader = cluster.leader_index(&vol.id).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    let io_timeout = Duration::from_secs(8);
    let opts = ClientOptions { io_timeout, ..ClientOptions::default() };
    let client = cluster.nbd_client(&vol.id, &[leader], opts).await;
    let writer = Writer::start(client.clone(), 0, BLOCKS, DEPTH, 0x57a1);
    writer.wait_acks(300, Duration::from_secs(60)).await;

    for i in &others {
        cluster.kill(*i);
    }
    let down_at = Instant::now();
    // Writes already committed may still be acknowledged right after the
    // kills; after that, nothing may be.
    let settle = Duration::from_secs(3);
    let window = io_timeout + Duration::from_secs(4);
    tokio::time::sleep(settle + window).await;
    {
        let l = writer.ledger.lock().unwrap();
        let late = l.acks_between(down_at + settle, down_at + settle + window);
        assert_eq!(late, 0, "{late} writes were acknowledged with two of three replicas down");
        assert!(!l.failures.is_empty(), "requests should have timed out with two of three replicas down");
        for f in &l.failures {
            assert!(f.contains("did not complete within"), "unexpected failure: {f}");
        }
        println!(
            "with 2 of 3 down: {} writes failed after the client's {io_timeout:?} timeout, e.g. {}",
            l.failures.len(),
            l.failures[0]
        );
    }

    let back_at = Instant::now();
    cluster.restart(others[0]);
    writer.wait_acks(300, Duration::from_secs(180)).await;
    let first_ack = {
        let l = writer.ledger.lock().unwrap();
        l.longest_pause(back_at, Instant::now())
    };
    println!(
        "writes resumed after node {} came back (longest gap after restart {} ms)",
        others[0],
        first_ack.as_millis()
    );
    let ledger = writer.stop().await;
    let reader = cluster.nbd_client(&vol.id, &[leader], ClientOptions::default()).await;
    verify(&*reader, &ledger, 0, BLOCKS).await.unwrap_or_else(|e| panic!("{e}"));
    reader.close().await;
    client.close().await;
}

/// A catalog leader frozen (SIGSTOP) long enough to be replaced still
/// believes it leads when thawed, until it hears of the new term. It must
/// not answer the Admin API from its stale view meanwhile: here it also
/// led the volume, and its stale view would name itself as the volume's
/// leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thawed_catalog_leader_does_not_answer_from_a_stale_view() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("thaw", 16 << 20, 3).await;
    let leader = cluster.leader_index(&vol.id).await;
    let catalog = cluster.catalog_leader_index().await;
    assert_eq!(leader, catalog, "the first node forms both groups and leads them");
    let frozen_id = cluster.node_id(leader).await;

    cluster.pause(leader);
    let other = (0..3).find(|i| *i != leader).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut a = cluster.admin_of(other).await.expect("admin");
        if let Ok(v) = a.get_volume(pb::GetVolumeRequest { id_or_name: vol.id.clone() }).await {
            let v = v.into_inner();
            if v.leader_node_id != 0 && v.leader_node_id != frozen_id {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no new volume leader while node {leader} is frozen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ask the thawed node right away, before it has caught up.
    let mut a = cluster.admin_of(leader).await.expect("admin of the frozen node");
    cluster.resume(leader);
    let v = a.get_volume(pb::GetVolumeRequest { id_or_name: vol.id.clone() }).await.expect("get volume").into_inner();
    assert_ne!(v.leader_node_id, frozen_id, "the thawed node answered from its stale view: {v:#?}");
    assert_ne!(v.leader_node_id, 0, "{v:#?}");
}

/// The same for the data path: a volume leader frozen while another node
/// takes over and acknowledges a newer write must not answer a read from
/// its own (older) state once thawed — not on the lease it held before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thawed_volume_leader_never_serves_a_stale_read() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("stale-read", 16 << 20, 3).await;
    let leader = cluster.leader_index(&vol.id).await;
    let leader_id = cluster.node_id(leader).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    // One client bound to the leader's address alone, one to the others.
    let only_leader = std::sync::Arc::new(StaticEndpoints(vec![cluster.node(leader).nbd_addr()]));
    let pinned = NbdClient::connect(only_leader, vol.id.clone(), ClientOptions::default()).await.expect("connect");
    let elsewhere = cluster.nbd_client(&vol.id, &others, ClientOptions::default()).await;
    let old = Bytes::from(make_block(0, 1));
    pinned.write(0, old.clone(), false).await.expect("first write");
    assert_eq!(pinned.read(0, 4096).await.expect("read"), old);

    cluster.pause(leader);
    let mut a = cluster.admin_of(others[0]).await.expect("admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(v) = a.get_volume(pb::GetVolumeRequest { id_or_name: vol.id.clone() }).await {
            let v = v.into_inner();
            if v.leader_node_id != 0 && v.leader_node_id != leader_id {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no new volume leader while node {leader} is frozen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let new = Bytes::from(make_block(0, 2));
    elsewhere.write(0, new.clone(), false).await.expect("write through the new leader");

    cluster.resume(leader);
    let got = pinned.read(0, 4096).await.expect("read through the thawed node");
    assert!(got == new, "the thawed node served a stale block: {:?}", parse_block(&got));
    pinned.close().await;
    elsewhere.close().await;
}
