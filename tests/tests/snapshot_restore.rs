//! Snapshots, restore and clone (issue 5), end to end on a real cluster:
//! a restored volume holds exactly the data of its snapshot's point, a
//! clone of a live volume exactly the data of the moment it was cloned;
//! both are independent of their source afterwards; deleting a snapshot
//! frees what only it held; deleting a volume that has snapshots keeps
//! them (and every clone) readable.

mod support;

use std::time::{Duration, Instant};

use tonic::Code;
use volumed_nbd::client::ClientOptions;
use volumed_nbd::BlockDevice;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::workload::{fill, verify, BLOCK};

const MIB: u64 = 1 << 20;

async fn wait_volume_space(cluster: &Cluster, key: &str, what: &str, pred: impl Fn(&pb::Volume) -> bool) -> pb::Volume {
    cluster.wait_volume(key, Duration::from_secs(30), what, pred).await
}

async fn retained(cluster: &Cluster, id: &str) -> Option<pb::Volume> {
    let mut c = cluster.admin().await;
    let all = c
        .list_volumes(pb::ListVolumesRequest { include_retained: true, ..Default::default() })
        .await
        .expect("list volumes")
        .into_inner()
        .volumes;
    all.into_iter().find(|v| v.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_and_clone_hold_their_point_and_stay_independent() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("src", 64 * MIB, 3).await;
    let n = 2048u64; // 8 MiB of known data
    let dev = cluster.nbd_client(&vol.id, &[], ClientOptions::default()).await;

    // Pattern A, snapshot, pattern B over all of it.
    let a = fill(&dev, 0, n, 64, 8).await;
    let snap = cluster.create_snapshot("snap-a", "src").await;
    assert!(snap.ready_to_use, "{snap:?}");
    assert_eq!(snap.total_bytes, n * BLOCK as u64, "data at the cut");
    assert_eq!(snap.restore_size_bytes, 64 * MIB);
    assert_eq!(snap.source_volume_id, vol.id);
    assert_eq!(snap.exclusive_bytes, 0, "nothing is overwritten yet");
    let b = fill(&dev, 0, n, 64, 8).await;

    // Every version of A is now held by the snapshot alone.
    let held =
        wait_volume_space(&cluster, "src", "snapshot space reported", |v| v.snapshot_bytes == n * BLOCK as u64).await;
    assert_eq!(held.snapshot_count, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.get_snapshot("snap-a").await.expect("get snapshot");
        if s.exclusive_bytes == n * BLOCK as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "exclusive bytes never reached {}: {s:?}", n * BLOCK as u64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Restore (size 0: the snapshot's size): reads A; the source reads B.
    let restored = cluster.restore("from-a", "snap-a", false, 0).await;
    assert_eq!(restored.size_bytes, 64 * MIB);
    assert_eq!(restored.source_snapshot_id, snap.id);
    assert_eq!(restored.state, pb::VolumeState::Healthy as i32, "{restored:#?}");
    assert_eq!(restored.restore_bytes_done, restored.restore_bytes_total);
    let rdev = cluster.nbd_client(&restored.id, &[], ClientOptions::default()).await;
    verify(rdev.as_ref(), &a, 0, n).await.expect("the restored volume holds pattern A");
    verify(dev.as_ref(), &b, 0, n).await.expect("the source holds pattern B");

    // A clone of the live volume, larger than its source: B, then zeros.
    let clone = cluster.restore("clone-b", "src", true, 128 * MIB).await;
    assert_eq!(clone.size_bytes, 128 * MIB);
    assert_eq!(clone.source_volume_id, vol.id);
    let cdev = cluster.nbd_client(&clone.id, &[], ClientOptions::default()).await;
    verify(cdev.as_ref(), &b, 0, n).await.expect("the clone holds pattern B");
    let tail = cdev.read(100 * MIB, 1 << 20).await.expect("read beyond the source's size");
    assert!(tail.iter().all(|x| *x == 0), "space beyond the source reads as zeros");
    // Its implicit snapshot goes once the copy is done; it is never listed.
    let mut admin = cluster.admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = cluster.get_volume("src").await;
        if v.snapshot_count == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "implicit snapshot not released: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = admin
        .list_snapshots(pb::ListSnapshotsRequest { source_volume: "src".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .snapshots;
    assert_eq!(listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), vec!["snap-a"]);

    // Independent afterwards: writes to one never show in another.
    let r2 = fill(&rdev, 0, 16, 16, 1).await;
    let s2 = fill(&dev, 100, 16, 16, 1).await;
    verify(rdev.as_ref(), &r2, 0, 16).await.expect("restored volume takes writes");
    verify(rdev.as_ref(), &a, 16, n - 16).await.expect("restored volume keeps A elsewhere");
    verify(dev.as_ref(), &b, 0, 100).await.expect("source unchanged by the restored volume's writes");
    verify(dev.as_ref(), &s2, 100, 16).await.expect("source takes writes");
    verify(cdev.as_ref(), &b, 0, n).await.expect("clone unchanged by either");

    // Deleting the snapshot frees what only it held (swept on every replica).
    let before = cluster.get_volume("src").await;
    let t = Instant::now();
    let d = admin.delete_snapshot(pb::DeleteSnapshotRequest { id_or_name: "snap-a".into() }).await.expect("delete");
    assert!(d.into_inner().existed);
    let after = wait_volume_space(&cluster, "src", "snapshot space freed", |v| {
        v.snapshot_bytes == 0 && !v.sweep_pending && v.reclaimed_bytes >= before.reclaimed_bytes + n * BLOCK as u64
    })
    .await;
    println!(
        "SPACE: snapshot held {} bytes exclusively; delete freed {} bytes on the leader's replica in {} ms",
        n * BLOCK as u64,
        after.reclaimed_bytes - before.reclaimed_bytes,
        t.elapsed().as_millis()
    );
    let again = admin.delete_snapshot(pb::DeleteSnapshotRequest { id_or_name: snap.id.clone() }).await.expect("again");
    assert!(!again.into_inner().existed, "delete is idempotent");
    assert_eq!(cluster.get_snapshot(&snap.id).await.unwrap_err().code(), Code::NotFound);
    verify(rdev.as_ref(), &a, 16, n - 16).await.expect("the restored volume does not need its snapshot");

    // Deleting a volume that has snapshots: hidden, name free, data kept.
    let s2snap = cluster.create_snapshot("snap-b", "src").await;
    let d = admin.delete_volume(pb::DeleteVolumeRequest { id_or_name: "src".into() }).await.expect("delete volume");
    assert!(d.into_inner().existed);
    let e = admin.get_volume(pb::GetVolumeRequest { id_or_name: "src".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin.get_volume(pb::GetVolumeRequest { id_or_name: vol.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "a retained volume is gone for its users");
    let kept = retained(&cluster, &vol.id).await.expect("listed with include_retained");
    assert!(kept.retained && kept.state == pb::VolumeState::Deleting as i32, "{kept:?}");
    let plain = admin.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner().volumes;
    assert!(plain.iter().all(|v| v.id != vol.id), "hidden from plain lists");
    let newsrc = cluster.create_volume("src", 16 * MIB, 3).await;
    assert_ne!(newsrc.id, vol.id, "the name is free again");
    let snap_b = cluster.get_snapshot("snap-b").await.expect("the snapshot outlives its volume");
    assert_eq!(snap_b.source_volume_id, vol.id);
    assert_eq!(snap_b.source_volume_name, "", "its volume is gone");
    let from_b = cluster.restore("from-b", &s2snap.id, false, 64 * MIB).await;
    let fdev = cluster.nbd_client(&from_b.id, &[], ClientOptions::default()).await;
    verify(fdev.as_ref(), &b, 0, 100).await.expect("restored from a deleted volume's snapshot");
    verify(fdev.as_ref(), &s2, 100, 16).await.expect("with the writes before that snapshot");

    // Its last snapshot gone, the retained volume goes too.
    admin.delete_snapshot(pb::DeleteSnapshotRequest { id_or_name: "snap-b".into() }).await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(30);
    while retained(&cluster, &vol.id).await.is_some() {
        assert!(Instant::now() < deadline, "retained volume not dropped after its last snapshot");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and the clones never needed it.
    verify(cdev.as_ref(), &b, 0, n).await.expect("clone intact after its source is gone");
    verify(rdev.as_ref(), &a, 16, n - 16).await.expect("restored volume intact after its source is gone");
    for c in [dev, rdev, cdev, fdev] {
        c.close().await;
    }
}

/// Snapshot creation is a log entry: it writes no block data, whatever
/// the volume holds. Counted on a stopped replica's RocksDB before and
/// after; times printed (the 1 GiB / 8 GiB comparison is the benchmark
/// below).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_creation_copies_no_data() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let empty = cluster.create_volume("empty", 1 << 30, 3).await;
    let full = cluster.create_volume("full", 256 * MIB, 3).await;
    let dev = cluster.nbd_client(&full.id, &[], ClientOptions::default()).await;
    let blocks = 128 * MIB / BLOCK as u64;
    fill(&dev, 0, blocks, 256, 8).await;
    dev.close().await;
    let mut times = Vec::new();
    for (name, vol) in [("empty", &empty), ("full", &full)] {
        let t = Instant::now();
        let s = cluster.create_snapshot(&format!("t-{name}"), &vol.id).await;
        times.push((name, t.elapsed()));
        assert!(s.ready_to_use);
    }
    println!("snapshot creation: {times:?}");

    // A follower of the full volume, stopped before and after a snapshot.
    let leader = cluster.leader_index(&full.id).await;
    let catalog = cluster.catalog_leader_index().await;
    let mut follower = None;
    for r in &full.replicas {
        let i = cluster.index_of(r.node_id).await;
        if i != leader && i != catalog {
            follower = Some(i);
        }
    }
    let f = follower.expect("a follower that leads nothing");
    let data_dir = cluster.node(f).data_dir.clone();
    cluster.stop(f);
    let before = support::block_keys(&data_dir, &full.id);
    assert!(before as u64 >= blocks, "the follower holds the data: {before} keys");
    cluster.restart(f);
    cluster.wait_ready(3, Duration::from_secs(60)).await;
    let s = cluster.create_snapshot("while-counted", "full").await;
    // Wait until the follower applied it (it serves it), then count again.
    let end = 256 * MIB / BLOCK as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.read_snapshot_on(f, &full.id, s.log_index, end).await.is_err() {
        assert!(Instant::now() < deadline, "follower never applied the snapshot");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.stop(f);
    let after = support::block_keys(&data_dir, &full.id);
    assert_eq!(before, after, "a snapshot must not write block data");
    cluster.restart(f);
    let v = cluster.get_volume("full").await;
    assert_eq!(v.snapshot_bytes, 0, "nothing is held until data is overwritten");
}

/// Bad input gets the right code; every call is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_and_idempotency() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut c = cluster.admin().await;
    let v = cluster.create_volume("v", 16 * MIB, 3).await;
    let w = cluster.create_volume("w", 32 * MIB, 3).await;
    let code = |r: Result<tonic::Response<pb::Snapshot>, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    let snap = |name: &str, src: &str| pb::CreateSnapshotRequest { name: name.into(), source_volume: src.into() };

    // CreateSnapshot.
    assert_eq!(code(c.create_snapshot(snap("", "v")).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap("a/b", "v")).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap(&v.id, "v")).await), Code::InvalidArgument, "ids are not names");
    assert_eq!(code(c.create_snapshot(snap("s", "")).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap("s", "nope")).await), Code::NotFound);
    let s1 = c.create_snapshot(snap("s", "v")).await.expect("create").into_inner();
    let again = c.create_snapshot(snap("s", &v.id)).await.expect("again").into_inner();
    assert_eq!((again.id.as_str(), again.log_index), (s1.id.as_str(), s1.log_index), "idempotent by name");
    assert_eq!(code(c.create_snapshot(snap("s", "w")).await), Code::AlreadyExists);

    // GetSnapshot.
    assert_eq!(code(c.get_snapshot(pb::GetSnapshotRequest { id_or_name: " ".into() }).await), Code::InvalidArgument);
    assert_eq!(code(c.get_snapshot(pb::GetSnapshotRequest { id_or_name: "nope".into() }).await), Code::NotFound);
    let got = c.get_snapshot(pb::GetSnapshotRequest { id_or_name: s1.id.clone() }).await.expect("get").into_inner();
    assert_eq!(got.name, "s");

    // ListSnapshots: by id, by source, in pages.
    for i in 0..4 {
        c.create_snapshot(snap(&format!("w{i}"), "w")).await.expect("create");
    }
    let list = |r: pb::ListSnapshotsRequest| {
        let mut c = c.clone();
        async move { c.list_snapshots(r).await }
    };
    let by_id =
        list(pb::ListSnapshotsRequest { snapshot_id: s1.id.clone(), ..Default::default() }).await.expect("list");
    assert_eq!(by_id.into_inner().snapshots.len(), 1);
    let none =
        list(pb::ListSnapshotsRequest { snapshot_id: "no-such".into(), ..Default::default() }).await.expect("list");
    assert!(none.into_inner().snapshots.is_empty(), "an unknown id lists nothing");
    let none =
        list(pb::ListSnapshotsRequest { source_volume: "no-such".into(), ..Default::default() }).await.expect("list");
    assert!(none.into_inner().snapshots.is_empty());
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = list(pb::ListSnapshotsRequest {
            source_volume: "w".into(),
            max_entries: 3,
            starting_token: token.clone(),
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
        assert!(r.snapshots.len() <= 3);
        seen.extend(r.snapshots.into_iter().map(|s| s.name));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    seen.sort();
    assert_eq!((pages, seen), (2, vec!["w0".to_string(), "w1".into(), "w2".into(), "w3".into()]));
    let bad = list(pb::ListSnapshotsRequest { starting_token: "zz".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), Code::Aborted, "CSI: an unknown starting token is ABORTED");

    // DeleteSnapshot.
    let del = |k: &str| pb::DeleteSnapshotRequest { id_or_name: k.into() };
    assert_eq!(c.delete_snapshot(del("")).await.unwrap_err().code(), Code::InvalidArgument);
    assert!(!c.delete_snapshot(del("nope")).await.expect("unknown").into_inner().existed);

    // CreateVolume with a content source.
    let vreq = |name: &str, size: u64, snap: &str, vol: &str| pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        replica_count: 3,
        source_snapshot: snap.into(),
        source_volume: vol.into(),
        ..Default::default()
    };
    let vcode = |r: Result<tonic::Response<pb::Volume>, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(vcode(c.create_volume(vreq("r", 0, "s", "v")).await), Code::InvalidArgument, "two sources");
    assert_eq!(vcode(c.create_volume(vreq("r", 0, "nope", "")).await), Code::NotFound);
    assert_eq!(vcode(c.create_volume(vreq("r", 0, "", "nope")).await), Code::NotFound);
    assert_eq!(vcode(c.create_volume(vreq("r", 8 * MIB, "s", "")).await), Code::OutOfRange);
    assert_eq!(vcode(c.create_volume(vreq("r", 8 * MIB, "", "w")).await), Code::OutOfRange);
    let r1 = c.create_volume(vreq("r", 16 * MIB, "s", "")).await.expect("restore").into_inner();
    let r2 = c.create_volume(vreq("r", 16 * MIB, &s1.id, "")).await.expect("again").into_inner();
    assert_eq!(r1.id, r2.id, "idempotent by name and source");
    assert_eq!(vcode(c.create_volume(vreq("r", 16 * MIB, "w0", "")).await), Code::AlreadyExists, "other source");
    assert_eq!(vcode(c.create_volume(vreq("r", 16 * MIB, "", "v")).await), Code::AlreadyExists, "clone vs restore");
    assert_eq!(vcode(c.create_volume(vreq("v", 16 * MIB, "s", "")).await), Code::AlreadyExists, "plain volume");
    let k1 = c.create_volume(vreq("k", 0, "", "w")).await.expect("clone").into_inner();
    let k2 = c.create_volume(vreq("k", 0, "", &w.id)).await.expect("clone again").into_inner();
    assert_eq!((k1.id.as_str(), k1.size_bytes), (k2.id.as_str(), 32 * MIB));
    // A snapshot used by a restore can be deleted; it is gone for users at once.
    assert!(c.delete_snapshot(del("s")).await.expect("delete").into_inner().existed);
    assert!(!c.delete_snapshot(del(&s1.id)).await.expect("again").into_inner().existed);
    assert_eq!(vcode(c.create_volume(vreq("r2", 0, "s", "")).await), Code::NotFound);

    // Group snapshots.
    let g = |name: &str, vols: &[&str]| pb::CreateGroupSnapshotRequest {
        name: name.into(),
        source_volumes: vols.iter().map(|s| s.to_string()).collect(),
    };
    let gcode = |r: Result<tonic::Response<pb::GroupSnapshot>, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(gcode(c.create_group_snapshot(g("", &["v"])).await), Code::InvalidArgument);
    assert_eq!(gcode(c.create_group_snapshot(g("g", &[])).await), Code::InvalidArgument);
    assert_eq!(gcode(c.create_group_snapshot(g("g", &["v", "v"])).await), Code::InvalidArgument);
    assert_eq!(gcode(c.create_group_snapshot(g("g", &["v", "nope"])).await), Code::NotFound);
    let g1 = c.create_group_snapshot(g("g", &["v", "w"])).await.expect("group").into_inner();
    let g2 = c.create_group_snapshot(g("g", &["w", &v.id])).await.expect("again").into_inner();
    assert_eq!(g1.id, g2.id);
    let get = |k: &str| pb::GetGroupSnapshotRequest { id_or_name: k.into() };
    assert_eq!(gcode(c.get_group_snapshot(get("")).await), Code::InvalidArgument);
    assert_eq!(gcode(c.get_group_snapshot(get("nope")).await), Code::NotFound);
    assert_eq!(c.get_group_snapshot(get("g")).await.expect("get").into_inner().snapshots.len(), 2);
    let gdel = |k: &str| pb::DeleteGroupSnapshotRequest { id_or_name: k.into() };
    assert_eq!(c.delete_group_snapshot(gdel("")).await.unwrap_err().code(), Code::InvalidArgument);
    assert!(c.delete_group_snapshot(gdel("g")).await.expect("delete").into_inner().existed);
    assert!(!c.delete_group_snapshot(gdel(&g1.id)).await.expect("again").into_inner().existed);
}
