//! volumed restarts on the attaching node (issue 3): an idle device comes
//! back by itself (graceful stop and SIGKILL); a device that was mounted
//! cannot survive its FUSE connection and is reported broken, clearly, until
//! it is unmounted; fsynced data is never lost.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use tonic::Code;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::node_local::{self, assert_no_devices_left, verify_tree, write_tree, Cleanup};
use volumed_tests::tools::{run, try_run};

const RWO: pb::AccessMode = pb::AccessMode::SingleNodeWriter;
const CHUNK: usize = 1 << 20;

fn pattern(n: usize) -> Vec<u8> {
    (0..CHUNK).map(|i| ((i * 31 + n * 7) % 251) as u8).collect()
}

/// Writes `count` chunks (O_DIRECT) and fsyncs.
fn write_chunks(dev: &str, from: usize, count: usize) {
    let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dev).expect("open device");
    let mut raw = vec![0u8; CHUNK + 4096];
    let off = (4096 - raw.as_ptr() as usize % 4096) % 4096;
    for n in from..from + count {
        raw[off..off + CHUNK].copy_from_slice(&pattern(n));
        f.write_all_at(&raw[off..off + CHUNK], (n * CHUNK) as u64).expect("write chunk");
    }
    f.sync_all().expect("fsync device");
}

fn check_chunks(dev: &str, count: usize) {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev).expect("open device");
    let mut raw = vec![0u8; CHUNK + 4096];
    let off = (4096 - raw.as_ptr() as usize % 4096) % 4096;
    for n in 0..count {
        f.read_exact_at(&mut raw[off..off + CHUNK], (n * CHUNK) as u64).expect("read chunk");
        assert!(raw[off..off + CHUNK] == pattern(n)[..], "chunk {n} of {dev} differs after the restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_device_comes_back_after_volumed_restarts() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let _cleanup = Cleanup::new(&cluster);
    cluster.create_volume("idle", 128 << 20, 3).await;
    let a = cluster.attach(0, "idle", RWO, false).await.expect("attach");
    write_chunks(&a.device, 0, 16);

    // Graceful stop: the device is released and re-created at start.
    assert!(cluster.stop(0).expect("exit status").success(), "volumed must stop cleanly\n{}", cluster.logs_tail(20));
    assert_no_devices_left(&cluster, 0);
    cluster.restart(0);
    let back = cluster.wait_attachment(0, "idle", Duration::from_secs(60), "restored", |x| x.healthy).await;
    assert_eq!((back.generation, back.state.as_str()), (a.generation, "attached"));
    check_chunks(&back.device, 16);
    write_chunks(&back.device, 16, 8);

    // SIGKILL: the earlier run's FUSE mount and loop device are cleaned up
    // and the device re-created.
    cluster.kill(0);
    cluster.restart(0);
    let again = cluster.wait_attachment(0, "idle", Duration::from_secs(60), "restored", |x| x.healthy).await;
    assert_eq!(again.generation, a.generation);
    let loops = node_local::loops_below(&cluster.nodes[0].run_dir);
    assert_eq!(loops.len(), 1, "exactly the restored device is left: {loops:?}");
    check_chunks(&again.device, 24);
    let mut c = cluster.local(0).await;
    let h = c.device_health(pb::DeviceHealthRequest { volume: "idle".into() }).await.expect("health").into_inner();
    assert!(h.attached && h.healthy, "{h:?}");

    assert!(cluster.detach(0, "idle").await.expect("detach"));
    assert_no_devices_left(&cluster, 0);
    // Nothing comes back after the next restart.
    cluster.restart(0);
    let _ = cluster.local(0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(cluster.attachments(0).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounted_device_is_reported_broken_after_a_crash_and_no_fsynced_data_is_lost() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let cleanup = Cleanup::new(&cluster);
    cluster.create_volume("busy", 256 << 20, 3).await;
    let a = cluster.attach(0, "busy", RWO, false).await.expect("attach");
    run("mkfs.ext4", &["-q", "-F", &a.device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&a.device, &mnt, &[]);
    let tree = write_tree(&mnt, 60, 128 << 10, 3);
    run("sync", &[]);

    cluster.kill(0);
    cluster.restart(0);
    let broken = cluster.wait_attachment(0, "busy", Duration::from_secs(60), "broken", |x| x.state == "broken").await;
    assert!(!broken.healthy);
    assert!(
        broken.reason.contains(mnt.to_str().unwrap()) && broken.reason.contains("Unmount"),
        "the reason must say where it is mounted and what to do: {}",
        broken.reason
    );
    let mut c = cluster.local(0).await;
    let h = c.device_health(pb::DeviceHealthRequest { volume: "busy".into() }).await.expect("health").into_inner();
    assert!(h.attached && !h.healthy && h.reason.starts_with("broken"), "{h:?}");
    cluster
        .wait_volume("busy", Duration::from_secs(20), "broken attachment reported", |v| {
            v.attachments.iter().any(|x| x.state.starts_with("broken"))
        })
        .await;
    // Neither attach nor detach while the dead device is still mounted.
    for e in [
        cluster.attach(0, "busy", RWO, false).await.expect_err("attach over a mounted broken device"),
        cluster.detach(0, "busy").await.expect_err("detach of a mounted device"),
    ] {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(mnt.to_str().unwrap()), "{}", e.message());
    }

    // The workload lets go of it; attaching again gives a working device
    // with every fsynced file intact.
    if !try_run("umount", &[mnt.to_str().unwrap()]).status.success() {
        run("umount", &["-l", mnt.to_str().unwrap()]);
    }
    let b = cluster.attach(0, "busy", RWO, false).await.expect("attach after unmount");
    assert_eq!(b.generation, a.generation, "same node, same catalog attachment");
    let fsck = try_run("e2fsck", &["-fy", &b.device]);
    assert!(fsck.status.code().is_some_and(|c| c <= 1), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    cleanup.mount(&b.device, &mnt, &[]);
    verify_tree(&mnt, &tree);
    cleanup.umount(&mnt);
    run("e2fsck", &["-fn", &b.device]);
    assert!(cluster.detach(0, "busy").await.expect("detach"));
    assert_no_devices_left(&cluster, 0);
}
