//! What a snapshot taken under load holds (issue 5). Writers keep a
//! history of every write (issued when, acknowledged when); the restored
//! images must show one point in time: nothing in the cut was issued after
//! something outside it had been acknowledged — within one volume for a
//! snapshot, across three volumes for a group snapshot. A snapshot of a
//! mounted ext4 under load restores to a filesystem that is clean once its
//! journal is replayed and holds every file fsynced before the cut.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use tonic::Code;
use volumed_nbd::client::ClientOptions;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::node_local::{self, Cleanup};
use volumed_tests::tools::{self, run, try_run};
use volumed_tests::workload::{check_cut, read_image, Image, Writer};

const MIB: u64 = 1 << 20;
const BLOCKS: u64 = 1024;

async fn image_of(cluster: &Cluster, name: &str, snapshot: &str) -> Image {
    let v = cluster.restore(name, snapshot, false, 0).await;
    let dev = cluster.nbd_client(&v.id, &[], ClientOptions::default()).await;
    let img = read_image(dev.as_ref(), 0, BLOCKS).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    dev.close().await;
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_under_writers_are_one_point_in_time() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut admin = cluster.admin().await;
    let mut ids = Vec::new();
    let mut writers = Vec::new();
    let mut devs = Vec::new();
    for i in 0..3u64 {
        let v = cluster.create_volume(&format!("g{i}"), 32 * MIB, 3).await;
        let dev = cluster.nbd_client(&v.id, &[], ClientOptions::default()).await;
        writers.push(Writer::start(dev.clone(), 0, BLOCKS, 4, 100 + i));
        devs.push(dev);
        ids.push(v.id);
    }
    for w in &writers {
        w.wait_acks(300, Duration::from_secs(60)).await;
    }
    // One volume alone, then all three as a group, writers running.
    let solo = cluster.create_snapshot("solo", "g0").await;
    for w in &writers {
        w.wait_acks(100, Duration::from_secs(60)).await;
    }
    let req = pb::CreateGroupSnapshotRequest {
        name: "cut".into(),
        source_volumes: vec!["g0".into(), ids[1].clone(), "g2".into()],
    };
    let group = admin.create_group_snapshot(req.clone()).await.expect("group snapshot").into_inner();
    assert!(group.ready_to_use, "{group:?}");
    assert_eq!(group.snapshots.len(), 3);
    for w in &writers {
        w.wait_acks(300, Duration::from_secs(60)).await;
    }
    let mut ledgers = Vec::new();
    for w in writers {
        ledgers.push(w.stop().await);
    }
    for d in devs {
        d.close().await;
    }

    // Idempotent by name and volume set; another set is a conflict.
    let again = admin.create_group_snapshot(req).await.expect("again").into_inner();
    assert_eq!(again.id, group.id);
    let ids_of = |g: &pb::GroupSnapshot| {
        let mut v: Vec<String> = g.snapshots.iter().map(|s| s.id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids_of(&again), ids_of(&group));
    let e = admin
        .create_group_snapshot(pb::CreateGroupSnapshotRequest { name: "cut".into(), source_volumes: vec!["g0".into()] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // The cuts.
    let mut images = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let member = group.snapshots.iter().find(|s| s.source_volume_id == *id).expect("a member per volume");
        assert_eq!(member.group_snapshot_id, group.id);
        images.push(image_of(&cluster, &format!("cut-{i}"), &member.id).await);
    }
    let parts: Vec<(&Image, &[_])> = images.iter().zip(&ledgers).map(|(i, l)| (i, l.events.as_slice())).collect();
    let (inside, outside) = check_cut(&parts).unwrap_or_else(|e| panic!("group snapshot: {e}"));
    println!("group snapshot: {inside} writes in the cut, {outside} acknowledged writes after it");
    assert!(inside > 900 && outside > 900, "the cut must fall inside the workload: {inside} in, {outside} out");
    // The check has teeth: a volume's cut taken later, combined with the
    // group's cuts of the others, is not one point in time.
    let late = cluster.create_snapshot("late", &ids[1]).await;
    let late_img = image_of(&cluster, "late-r", &late.id).await;
    let mixed = [(&images[0], ledgers[0].events.as_slice()), (&late_img, ledgers[1].events.as_slice())];
    assert!(check_cut(&mixed).is_err(), "cuts taken at different times must not pass as one");
    let solo_img = image_of(&cluster, "solo-r", &solo.id).await;
    let (inside, outside) =
        check_cut(&[(&solo_img, ledgers[0].events.as_slice())]).unwrap_or_else(|e| panic!("snapshot: {e}"));
    println!("snapshot: {inside} writes in the cut, {outside} after it");
    assert!(inside > 300 && outside > 100, "{inside} in, {outside} out");

    // Members go with their group only.
    let e = admin
        .delete_snapshot(pb::DeleteSnapshotRequest { id_or_name: group.snapshots[0].id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let d =
        admin.delete_group_snapshot(pb::DeleteGroupSnapshotRequest { id_or_name: "cut".into() }).await.expect("delete");
    assert!(d.into_inner().existed);
    let d = admin
        .delete_group_snapshot(pb::DeleteGroupSnapshotRequest { id_or_name: group.id.clone() })
        .await
        .expect("again");
    assert!(!d.into_inner().existed);
    let e = admin.get_group_snapshot(pb::GetGroupSnapshotRequest { id_or_name: group.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    for s in &group.snapshots {
        assert_eq!(cluster.get_snapshot(&s.id).await.unwrap_err().code(), Code::NotFound);
    }
}

/// Files written and fsynced (with their directory) in a loop; the names
/// and checksums of those durable so far.
struct FileLoad {
    stop: Arc<AtomicBool>,
    durable: Arc<Mutex<Vec<(PathBuf, u32)>>>,
    thread: std::thread::JoinHandle<()>,
}

fn start_files(dir: &Path) -> FileLoad {
    let stop = Arc::new(AtomicBool::new(false));
    let durable = Arc::new(Mutex::new(Vec::new()));
    let (s, d, dir) = (stop.clone(), durable.clone(), dir.to_path_buf());
    let thread = std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut pending = Vec::new();
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let sub = dir.join(format!("d{}", i % 5));
            std::fs::create_dir_all(&sub).expect("mkdir");
            let path = sub.join(format!("f{i}"));
            let mut data = vec![0u8; 16 << 10 << (i % 3)];
            rng.fill_bytes(&mut data);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o644)
                .open(&path)
                .expect("create");
            f.write_all(&data).expect("write");
            f.sync_all().expect("fsync");
            pending.push((path, crc32fast::hash(&data)));
            if i % 4 == 3 {
                for n in 0..5 {
                    if let Ok(dh) = std::fs::File::open(dir.join(format!("d{n}"))) {
                        dh.sync_all().expect("fsync dir");
                    }
                }
                std::fs::File::open(&dir).expect("open dir").sync_all().expect("fsync dir");
                d.lock().unwrap().append(&mut pending);
            }
            i += 1;
        }
    });
    FileLoad { stop, durable, thread }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_of_a_busy_ext4_restores_clean_with_its_fsynced_files() {
    let _serial = serial();
    tools::require("mkfs.ext4", "e2fsprogs");
    tools::require("e2fsck", "e2fsprogs");
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let cleanup = Cleanup::new(&cluster);
    cluster.create_volume("fs", 256 * MIB, 3).await;
    let a = cluster.attach(0, "fs", pb::AccessMode::SingleNodeWriter, false).await.expect("attach");
    run("mkfs.ext4", &["-q", "-F", &a.device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&a.device, &mnt, &[]);

    let load = start_files(&mnt);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while load.durable.lock().unwrap().len() < 40 {
        assert!(std::time::Instant::now() < deadline, "the file workload makes no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before: Vec<(PathBuf, u32)> = load.durable.lock().unwrap().clone();
    let snap = cluster.create_snapshot("busy", "fs").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop.store(true, Ordering::Relaxed);
    load.thread.join().expect("file workload");
    let total = load.durable.lock().unwrap().len();
    cleanup.umount(&mnt);
    assert!(cluster.detach(0, "fs").await.expect("detach"));
    println!("{} files durable before the snapshot, {total} at the end", before.len());

    let r = cluster.restore("fs-restored", &snap.id, false, 0).await;
    let b = cluster.attach(1, &r.name, pb::AccessMode::SingleNodeWriter, false).await.expect("attach restored");
    // The image is crash-consistent: its journal may need replaying, then
    // the filesystem must be clean.
    let replay = try_run("e2fsck", &["-E", "journal_only", "-y", &b.device]);
    assert!(replay.status.code().is_some_and(|c| c <= 1), "journal replay: {replay:?}");
    let check = try_run("e2fsck", &["-f", "-n", &b.device]);
    assert!(
        check.status.success(),
        "e2fsck after journal replay is not clean:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    node_local::drop_caches();
    let rmnt = cluster.path().join("restored");
    cleanup.mount(&b.device, &rmnt, &["ro"]);
    for (path, crc) in &before {
        let rel = path.strip_prefix(&mnt).expect("below the mount");
        let data = std::fs::read(rmnt.join(rel))
            .unwrap_or_else(|e| panic!("{} fsynced before the snapshot: {e}", rel.display()));
        assert_eq!(crc32fast::hash(&data), *crc, "{} differs", rel.display());
    }
    cleanup.umount(&rmnt);
    assert!(cluster.detach(1, &r.name).await.expect("detach restored"));
    drop(cleanup);
}
