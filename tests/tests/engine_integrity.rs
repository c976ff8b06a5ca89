//! Bit rot: block values flipped on disk behind the daemon's back (the node
//! stopped, its RocksDB edited with volumed's own key codec) are detected
//! by their CRC32, never returned, repaired from a healthy replica and
//! counted — on the read path of a leader and by ScrubVolume on a follower.

mod support;

use std::time::Duration;

use volumed_nbd::client::NbdClient;
use volumed_nbd::client::{ClientOptions, StaticEndpoints};
use volumed_nbd::BlockDevice;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::workload::{fill, make_block, verify, Ledger};

const FILLED: u64 = 256;

/// A three-replica volume with 1 MiB of known data, applied everywhere.
async fn volume_with_data(cluster: &Cluster, name: &str) -> (pb::Volume, Ledger) {
    let vol = cluster.create_volume(name, 16 << 20, 3).await;
    let client = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;
    let ledger = fill(&client, 0, FILLED, 16, 4).await;
    client.flush().await.expect("flush");
    client.close().await;
    wait_caught_up(cluster, &vol.id).await;
    (vol, ledger)
}

/// Waits until every replica applied what the leader has.
async fn wait_caught_up(cluster: &Cluster, id: &str) {
    cluster
        .wait_volume(id, Duration::from_secs(60), "all replicas caught up", |v| {
            let leader = v.replicas.iter().find(|r| r.role == pb::ReplicaRole::Leader as i32);
            leader
                .is_some_and(|l| v.replicas.len() == 3 && v.replicas.iter().all(|r| r.applied_index >= l.applied_index))
        })
        .await;
}

/// Stops node `i`, corrupts `blocks` of the volume in its store, starts it
/// again and waits until it is back in the group.
async fn rot(cluster: &mut Cluster, i: usize, volume: &str, blocks: &[u64]) {
    let status = cluster.stop(i).expect("running");
    assert!(status.success(), "node {i} exited with {status}");
    for b in blocks {
        let version = support::corrupt_block(&cluster.node(i).data_dir, volume, *b);
        println!("corrupted block {b} (version {version}) on node {i}");
    }
    let restarted = std::time::Instant::now();
    cluster.restart(i);
    cluster.wait_ready(3, Duration::from_secs(60)).await;
    cluster.wait_heard_from(i, restarted, Duration::from_secs(60)).await;
    wait_caught_up(cluster, volume).await;
}

/// Moves the volume's leadership to node `want` (of three). Freeze the
/// leader L: `want` or the third node T takes over. If T does, `want` gets
/// T's first entry (T needs it for its majority) while L, frozen, does not;
/// freezing T and thawing L then leaves `want` the only node L can vote for.
async fn make_leader(cluster: &mut Cluster, volume: &str, want: usize) {
    let want_id = cluster.node_id(want).await;
    for round in 0..10 {
        let leader = cluster.leader_index(volume).await;
        if leader == want {
            // A thawed node may still disturb the term: check it held.
            tokio::time::sleep(Duration::from_secs(2)).await;
            if cluster.leader_index(volume).await == want {
                println!("node {want} leads after {round} round(s)");
                return;
            }
            continue;
        }
        let third = (0..3).find(|i| *i != want && *i != leader).expect("three nodes");
        let (leader_id, third_id) = (cluster.node_id(leader).await, cluster.node_id(third).await);
        let before = cluster.get_volume(volume).await.replicas.iter().map(|r| r.applied_index).max().unwrap_or(0);
        cluster.pause(leader);
        let v = cluster
            .wait_volume(volume, Duration::from_secs(60), "a new leader", |v| {
                v.leader_node_id != 0 && v.leader_node_id != leader_id
            })
            .await;
        println!("round {round}: froze node {leader}, node {} took over", cluster.index_of(v.leader_node_id).await);
        if v.leader_node_id == third_id {
            cluster
                .wait_volume(volume, Duration::from_secs(60), "the wanted node caught up with the new leader", |v| {
                    let applied = |id| v.replicas.iter().find(|r| r.node_id == id).map(|r| r.applied_index);
                    // T's own first entry (past `before`) is applied on T
                    // and on the wanted node.
                    v.leader_node_id == third_id
                        && applied(third_id) > Some(before)
                        && applied(want_id) >= applied(third_id)
                })
                .await;
            cluster.pause(third);
            cluster.resume(leader);
            cluster
                .wait_volume(volume, Duration::from_secs(60), "a leader after the swap", |v| {
                    v.leader_node_id != 0 && v.leader_node_id != third_id
                })
                .await;
            let resumed = std::time::Instant::now();
            cluster.resume(third);
            cluster.wait_heard_from(third, resumed, Duration::from_secs(60)).await;
        } else {
            let resumed = std::time::Instant::now();
            cluster.resume(leader);
            cluster.wait_heard_from(leader, resumed, Duration::from_secs(60)).await;
        }
    }
    panic!("node {want} never became the leader of {volume}");
}

async fn crc_repairs(cluster: &Cluster, volume: &str, node: usize) -> (u64, u64) {
    let v = cluster.get_volume(volume).await;
    let name = &cluster.node(node).name;
    let nodes = cluster.admin().await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let on_node = nodes.iter().find(|n| &n.name == name).map(|n| n.crc_repairs).unwrap_or(0);
    (v.crc_repairs, on_node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotten_blocks_on_the_leader_are_repaired_on_read() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let (vol, ledger) = volume_with_data(&cluster, "rot-read").await;
    let leader = cluster.leader_index(&vol.id).await;
    let catalog = cluster.catalog_leader_index().await;
    // Rot a node that leads nothing, so stopping it disturbs least.
    let victim = (0..3).find(|i| *i != leader && *i != catalog).unwrap_or((leader + 1) % 3);
    let rotten = [3u64, 100, 255];
    rot(&mut cluster, victim, &vol.id, &rotten).await;
    assert_eq!(crc_repairs(&cluster, &vol.id, victim).await, (0, 0), "nothing read the rotten blocks yet");

    make_leader(&mut cluster, &vol.id, victim).await;
    // Read through the rotten node only: it leads, so it serves the read
    // from its own store.
    let only_victim = std::sync::Arc::new(StaticEndpoints(vec![cluster.node(victim).nbd_addr()]));
    let client = NbdClient::connect(only_victim, vol.id.clone(), ClientOptions::default()).await.expect("connect");
    assert!(cluster.leader_index(&vol.id).await == victim, "leadership moved away before the read");
    verify(&*client, &ledger, 0, FILLED).await.unwrap_or_else(|e| panic!("read with rotten blocks: {e}"));

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let counted = loop {
        let c = crc_repairs(&cluster, &vol.id, victim).await;
        if c.0 >= rotten.len() as u64 && c.1 >= rotten.len() as u64 || std::time::Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("crc_repairs: volume {}, node {}", counted.0, counted.1);
    assert_eq!(
        counted,
        (rotten.len() as u64, rotten.len() as u64),
        "every rotten block repaired once, counted on the volume and the node"
    );

    // The repair was written back: reading again repairs nothing more.
    verify(&*client, &ledger, 0, FILLED).await.unwrap_or_else(|e| panic!("second read: {e}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(crc_repairs(&cluster, &vol.id, victim).await.0, rotten.len() as u64);
    client.close().await;

    // And on disk the blocks are intact again.
    cluster.stop(victim);
    let db = support::open(&cluster.node(victim).data_dir);
    for b in rotten {
        let stored = support::stored_block(&db, &vol.id, b).expect("block stored");
        assert_eq!(stored, Ok(make_block(b, ledger.blocks[&b].acked.unwrap())), "block {b} after repair");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_finds_and_repairs_rot_on_a_follower() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let (vol, ledger) = volume_with_data(&cluster, "rot-scrub").await;
    let leader = cluster.leader_index(&vol.id).await;
    let catalog = cluster.catalog_leader_index().await;
    let victim = (0..3).find(|i| *i != leader && *i != catalog).unwrap_or((leader + 1) % 3);
    let rotten = [0u64, 17];
    rot(&mut cluster, victim, &vol.id, &rotten).await;
    assert_ne!(cluster.leader_index(&vol.id).await, victim, "the rotten node must stay a follower");

    let mut admin = cluster.admin().await;
    let r =
        admin.scrub_volume(pb::ScrubVolumeRequest { id_or_name: vol.id.clone() }).await.expect("scrub").into_inner();
    println!("scrub: {r:?}");
    assert_eq!(r.blocks_repaired, rotten.len() as u64, "{r:?}");
    assert_eq!(r.blocks_unrepairable, 0, "{r:?}");
    assert!(r.blocks_checked >= 3 * FILLED, "every replica's blocks are checked: {r:?}");

    let again =
        admin.scrub_volume(pb::ScrubVolumeRequest { id_or_name: vol.id.clone() }).await.expect("scrub").into_inner();
    assert_eq!((again.blocks_repaired, again.blocks_unrepairable), (0, 0), "second scrub: {again:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = crc_repairs(&cluster, &vol.id, victim).await;
        if c == (rotten.len() as u64, rotten.len() as u64) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "crc_repairs not reported: {c:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The follower's store holds the right data again.
    cluster.stop(victim);
    let db = support::open(&cluster.node(victim).data_dir);
    for b in 0..FILLED {
        let stored = support::stored_block(&db, &vol.id, b).expect("block stored");
        assert_eq!(stored, Ok(make_block(b, ledger.blocks[&b].acked.unwrap())), "block {b} on the scrubbed follower");
    }
}
