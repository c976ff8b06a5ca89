//! The node plugin against a real volumed and the real kernel: volumes
//! made through the Admin API, attached by the node's volumed (FUSE+loop),
//! mkfs, mounts, bind mounts, statvfs, online grow, and a volume made
//! unreachable by stopping its replicas. Run as root, after building the
//! daemon: `cargo build -p volumed --bin volumed && cargo test -p
//! volumed-csi-node --test node_on_loop`.

mod common;

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use volumed_csi::proto::{self as csi, volume_usage::Unit};

fn usage(r: &csi::NodeGetVolumeStatsResponse, unit: Unit) -> csi::VolumeUsage {
    r.usage.iter().find(|u| u.unit == unit as i32).cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stage_formats_only_blank_devices_and_keeps_data() {
    let b = Bench::start().await;
    let vol = &b.create_volume("stage-keeps-data", 64 * MIB).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter, &["noatime", "nodev"], "");

    b.stage(vol, "staging/v1", cap.clone()).await.unwrap();
    let m = b.mount_at("staging/v1").expect("staged mount");
    assert_eq!(m.fs_type, "ext4");
    assert!(m.has_option("noatime") && m.has_option("nodev"), "flags applied: {}", m.options);
    let att = b.attachment(vol).await.expect("attached by volumed");
    assert_eq!(att.frontend, "fuse-loop");
    let dev = std::path::PathBuf::from(&att.device);
    assert_eq!(m.dev(), rdev(&dev), "the staged filesystem lives on volumed's device {}", dev.display());
    let uuid = fs_uuid(&dev);
    assert!(!uuid.is_empty());

    b.publish(vol, "staging/v1", "pods/p1/mount", cap.clone(), false).await.unwrap();
    std::fs::write(b.path("pods/p1/mount/hello.txt"), b"written before restage").unwrap();
    b.unpublish(vol, "pods/p1/mount").await.unwrap();
    b.unstage(vol, "staging/v1").await.unwrap();
    assert!(b.mount_at("staging/v1").is_none());
    b.assert_detached(vol).await;
    assert!(!b.path("pods/p1/mount").exists(), "unpublish removed the target dir");

    // Staged again (a new attachment): the filesystem is reused, not remade,
    // and what was written reached the volume.
    b.stage(vol, "staging/v1", cap.clone()).await.unwrap();
    let dev = b.device(vol).await.expect("attached again");
    assert_eq!(fs_uuid(&dev), uuid, "same filesystem UUID: not reformatted");
    assert_eq!(std::fs::read(b.path("staging/v1/hello.txt")).unwrap(), b"written before restage");

    // Asking for another filesystem on a device holding data is refused.
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter, &[], "");
    let s = assert_code(b.stage(vol, "staging/other", xfs).await, Code::FailedPrecondition);
    assert!(s.message().contains("refusing to reformat"), "{}", s.message());
    assert!(s.message().contains(vol.as_str()), "names the volume: {}", s.message());
    assert_eq!(fs_type(&dev), "ext4");
    assert_eq!(fs_uuid(&dev), uuid);
    assert!(b.mount_at("staging/v1").is_some(), "the first staging is untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_is_made_when_asked_and_kept_when_unspecified() {
    let b = Bench::start().await;
    // mkfs.xfs wants at least 300 MiB.
    let vol = &b.create_volume("xfs-made-kept", 320 * MIB).await;
    b.stage(vol, "staging/x", mount_cap("xfs", Mode::SingleNodeWriter, &[], "")).await.unwrap();
    assert_eq!(b.mount_at("staging/x").unwrap().fs_type, "xfs");
    std::fs::write(b.path("staging/x/f"), b"x").unwrap();
    b.unstage(vol, "staging/x").await.unwrap();
    b.assert_detached(vol).await;
    // No fsType in the capability: whatever is on the device is mounted.
    b.stage(vol, "staging/x", mount_cap("", Mode::SingleNodeWriter, &[], "")).await.unwrap();
    assert_eq!(b.mount_at("staging/x").unwrap().fs_type, "xfs");
    assert_eq!(std::fs::read(b.path("staging/x/f")).unwrap(), b"x");
    assert_eq!(fs_type(&b.device(vol).await.unwrap()), "xfs");
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_data_is_never_formatted_over() {
    let b = Bench::start().await;
    let vol = &b.create_volume("foreign-data", 64 * MIB).await;
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    b.write_volume(vol, 8192, &junk).await;
    let s = assert_code(b.stage(vol, "staging/j", ext4()).await, Code::FailedPrecondition);
    assert!(s.message().contains("refusing to format"), "{}", s.message());
    assert_eq!(b.read_volume(vol, 8192, 4096).await, junk, "data untouched");
    // A failed first stage detaches again.
    b.assert_detached(vol).await;
    assert!(b.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_path_holding_something_else_is_an_error() {
    let b = Bench::start().await;
    let vol = &b.create_volume("staging-busy", 64 * MIB).await;
    // A foreign mount at the staging path.
    let staging = b.path("staging/busy");
    std::fs::create_dir_all(&staging).unwrap();
    nix::mount::mount(Some("tmpfs"), &staging, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).unwrap();
    let s = assert_code(b.stage(vol, "staging/busy", ext4()).await, Code::FailedPrecondition);
    assert!(s.message().contains(&staging.display().to_string()), "names the path: {}", s.message());
    assert_eq!(b.mount_at("staging/busy").unwrap().fs_type, "tmpfs", "not mounted over");
    b.assert_detached(vol).await;
    // A staging directory with files in it.
    std::fs::create_dir_all(b.path("staging/full")).unwrap();
    std::fs::write(b.path("staging/full/keep"), b"mine").unwrap();
    assert_code(b.stage(vol, "staging/full", ext4()).await, Code::FailedPrecondition);
    assert_eq!(std::fs::read(b.path("staging/full/keep")).unwrap(), b"mine");
    b.assert_detached(vol).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_idempotent_including_partial_cleanup() {
    let b = Bench::start().await;
    let vol = &b.create_volume("idempotent", 64 * MIB).await;
    let cap = ext4();
    for _ in 0..2 {
        b.stage(vol, "staging/i", cap.clone()).await.unwrap();
    }
    for _ in 0..2 {
        b.publish(vol, "staging/i", "pods/a/mount", cap.clone(), false).await.unwrap();
    }
    assert_eq!(b.mounts().len(), 2, "one staging mount, one publication");
    // Same target, different read-only-ness: incompatible.
    assert_code(b.publish(vol, "staging/i", "pods/a/mount", cap.clone(), true).await, Code::AlreadyExists);
    // Unstage while published is refused: the device would go under the pod.
    let s = assert_code(b.unstage(vol, "staging/i").await, Code::FailedPrecondition);
    assert!(s.message().contains("pods/a/mount"), "{}", s.message());
    assert!(b.attachment(vol).await.is_some(), "still attached");
    for _ in 0..2 {
        b.unpublish(vol, "pods/a/mount").await.unwrap();
    }
    // Partially cleaned: the target unmounted behind the plugin's back.
    b.publish(vol, "staging/i", "pods/b/mount", cap.clone(), false).await.unwrap();
    nix::mount::umount2(&b.path("pods/b/mount"), nix::mount::MntFlags::empty()).unwrap();
    b.unpublish(vol, "pods/b/mount").await.unwrap();
    assert!(!b.path("pods/b/mount").exists());
    // Unpublishing a path that never existed.
    b.unpublish(vol, "pods/never/mount").await.unwrap();
    for _ in 0..2 {
        b.unstage(vol, "staging/i").await.unwrap();
    }
    b.assert_detached(vol).await;
    // Partially cleaned staging: unmounted by hand, device still attached.
    b.stage(vol, "staging/i", cap.clone()).await.unwrap();
    nix::mount::umount2(&b.path("staging/i"), nix::mount::MntFlags::empty()).unwrap();
    assert!(b.attachment(vol).await.is_some());
    b.unstage(vol, "staging/i").await.unwrap();
    b.assert_detached(vol).await;
    assert!(b.mounts().is_empty());
    // Unstaging what is already gone, again.
    b.unstage(vol, "staging/i").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_publish_refuses_writes() {
    let b = Bench::start().await;
    let vol = &b.create_volume("ro-publish", 64 * MIB).await;
    let cap = ext4();
    b.stage(vol, "staging/r", cap.clone()).await.unwrap();
    std::fs::write(b.path("staging/r/existing"), b"data").unwrap();
    b.publish(vol, "staging/r", "pods/ro/mount", cap.clone(), true).await.unwrap();
    b.publish(vol, "staging/r", "pods/rw/mount", cap.clone(), false).await.unwrap();
    assert!(b.mount_at("pods/ro/mount").unwrap().read_only());
    let err = std::fs::write(b.path("pods/ro/mount/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(std::fs::read(b.path("pods/ro/mount/existing")).unwrap(), b"data");
    std::fs::write(b.path("pods/rw/mount/new"), b"x").unwrap();
    assert!(b.path("pods/ro/mount/new").exists(), "same filesystem, read-only view");
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_block_round_trip() {
    let b = Bench::start().await;
    let vol = &b.create_volume("raw-block", 16 * MIB).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    for _ in 0..2 {
        b.stage(vol, "staging/blk", cap.clone()).await.unwrap();
        b.publish(vol, "staging/blk", "pods/p/dev/vol", cap.clone(), false).await.unwrap();
    }
    let target = b.path("pods/p/dev/vol");
    let meta = std::fs::metadata(&target).unwrap();
    assert!(meta.file_type().is_block_device(), "target is the device node");
    let dev = b.device(vol).await.unwrap();
    assert_eq!(meta.rdev(), rdev(&dev));

    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        b.read_volume(vol, MIB, pattern.len() as u32).await,
        pattern,
        "bytes written through the published device reach the volume"
    );

    let st = b.stats(vol, "pods/p/dev/vol").await.unwrap();
    assert_eq!(usage(&st, Unit::Bytes).total, (16 * MIB) as i64);
    assert!(!st.volume_condition.unwrap().abnormal);

    for _ in 0..2 {
        b.unpublish(vol, "pods/p/dev/vol").await.unwrap();
    }
    assert!(!target.exists(), "target file removed");
    for _ in 0..2 {
        b.unstage(vol, "staging/blk").await.unwrap();
    }
    assert!(!b.path(&format!("staging/blk/{vol}")).exists(), "staged device file removed");
    b.assert_detached(vol).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_attachment_makes_the_raw_device_read_only() {
    let b = Bench::start().await;
    let vol = &b.create_volume("ro-attach", 16 * MIB).await;
    let cap = block_cap(Mode::SingleNodeReaderOnly);
    let ctx: HashMap<String, String> = [("volumed.dev/readonly".to_string(), "true".to_string())].into();
    b.stage_ctx(vol, "staging/rob", cap.clone(), ctx).await.unwrap();
    assert!(b.attachment(vol).await.unwrap().readonly, "volumed attached it read-only");
    b.publish(vol, "staging/rob", "pods/p/dev/ro", cap.clone(), true).await.unwrap();
    let target = b.path("pods/p/dev/ro");
    assert!(b.mount_at("pods/p/dev/ro").unwrap().read_only());
    let err = std::fs::OpenOptions::new().write(true).open(&target).and_then(|mut f| {
        f.write_all(&[1u8; 4096])?;
        f.sync_all()
    });
    assert!(err.is_err(), "writing a read-only attached device fails");
    assert_eq!(b.read_volume(vol, 0, 4096).await, vec![0u8; 4096], "nothing reached the volume");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_report_bytes_inodes_and_condition() {
    let b = Bench::start().await;
    let vol = &b.create_volume("stats-1", 64 * MIB).await;
    let vol2 = &b.create_volume("stats-2", 64 * MIB).await;
    let cap = ext4();
    b.stage(vol, "staging/s", cap.clone()).await.unwrap();
    b.publish(vol, "staging/s", "pods/s/mount", cap.clone(), false).await.unwrap();
    let before = b.stats(vol, "pods/s/mount").await.unwrap();
    let bytes = usage(&before, Unit::Bytes);
    let inodes = usage(&before, Unit::Inodes);
    assert!(bytes.total > (50 * MIB) as i64 && bytes.total <= (64 * MIB) as i64, "{bytes:?}");
    assert!(bytes.available > 0 && bytes.used > 0 && bytes.available < bytes.total);
    assert!(inodes.total > 1000 && inodes.used > 0);
    assert!(!before.volume_condition.clone().unwrap().abnormal);

    let data = vec![0x5au8; 8 * MIB as usize];
    let mut f = std::fs::File::create(b.path("pods/s/mount/big")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    for i in 0..20 {
        std::fs::write(b.path(&format!("pods/s/mount/small{i}")), b"s").unwrap();
    }
    let after = b.stats(vol, "pods/s/mount").await.unwrap();
    assert!(usage(&after, Unit::Bytes).used >= bytes.used + (8 * MIB) as i64);
    assert!(usage(&after, Unit::Inodes).used >= inodes.used + 21);
    assert!(!after.volume_condition.unwrap().abnormal);
    // The staging path answers too.
    b.stats(vol, "staging/s").await.unwrap();

    // Not ours: a missing path, a plain directory, another volume's id.
    assert_code(b.stats(vol, "pods/none/mount").await, Code::NotFound);
    std::fs::create_dir_all(b.path("pods/plain")).unwrap();
    assert_code(b.stats(vol, "pods/plain").await, Code::NotFound);
    b.stage(vol2, "staging/s2", cap.clone()).await.unwrap();
    let s = assert_code(b.stats(vol2, "pods/s/mount").await, Code::NotFound);
    assert!(s.message().contains("pods/s/mount"), "{}", s.message());
    // Outside the kubelet dir.
    assert_code(
        b.node
            .clone()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: vol.clone(),
                volume_path: "/proc".into(),
                staging_target_path: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
}

/// Polls NodeGetVolumeStats until the condition is what `abnormal` says.
async fn wait_condition(b: &Bench, vol: &str, path: &str, abnormal: bool, timeout: Duration) -> csi::VolumeCondition {
    let deadline = Instant::now() + timeout;
    loop {
        let c = b.stats(vol, path).await.unwrap().volume_condition.unwrap();
        if c.abnormal == abnormal {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "condition of {vol} not abnormal={abnormal} after {timeout:?}: {c:?}\n{}",
            b.cluster.logs_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_condition_reports_an_unreachable_volume() {
    // Three nodes, a replica on each; the plugin runs on node 0.
    let b = Bench::start_alone(3).await;
    let vol = &b.create_volume("unreachable", 64 * MIB).await;
    let cap = ext4();
    b.stage(vol, "staging/h", cap.clone()).await.unwrap();
    b.publish(vol, "staging/h", "pods/h/mount", cap.clone(), false).await.unwrap();
    std::fs::write(b.path("pods/h/mount/before"), b"b").unwrap();
    let healthy = wait_condition(&b, vol, "pods/h/mount", false, Duration::from_secs(30)).await;
    assert_eq!(healthy.message, "healthy");

    // The other two replicas stop answering: no majority, so whichever node
    // led the volume, a write cannot complete.
    let frozen = Frozen::nodes(&b.cluster, &[1, 2]);
    let file = b.path("pods/h/mount/during");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::File::create(&file).and_then(|mut f| {
            f.write_all(&[7u8; 256 << 10])?;
            f.sync_all()
        });
        let _ = done_tx.send(r);
    });
    let sick = wait_condition(&b, vol, "pods/h/mount", true, Duration::from_secs(60)).await;
    eprintln!("condition with two of three replicas frozen: {}", sick.message);
    assert!(sick.message.contains(vol.as_str()), "{}", sick.message);
    assert!(sick.message.contains("unhealthy") && sick.message.contains("leader"), "says why: {}", sick.message);
    assert!(done_rx.try_recv().is_err(), "the write cannot have completed without a majority");
    // The stats themselves still answer (statvfs needs no I/O).
    let st = b.stats(vol, "pods/h/mount").await.unwrap();
    assert!(usage(&st, Unit::Bytes).total > 0);

    drop(frozen);
    let written = done_rx.recv_timeout(Duration::from_secs(120)).expect("the write completes once the replicas answer");
    written.expect("the write succeeded after the pause");
    let c = wait_condition(&b, vol, "pods/h/mount", false, Duration::from_secs(60)).await;
    assert_eq!(c.message, "healthy");
    assert_eq!(std::fs::read(b.path("pods/h/mount/during")).unwrap().len(), 256 << 10);
    b.unpublish(vol, "pods/h/mount").await.unwrap();
    b.unstage(vol, "staging/h").await.unwrap();
    b.assert_detached(vol).await;
}

async fn expand(
    b: &Bench,
    vol: &str,
    target: &str,
    staging: &str,
    required: u64,
) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
    b.node
        .clone()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: vol.into(),
            volume_path: b.p(target),
            capacity_range: Some(csi::CapacityRange { required_bytes: required as i64, limit_bytes: 0 }),
            staging_target_path: b.p(staging),
            volume_capability: None,
            secrets: HashMap::new(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_grows_online() {
    let b = Bench::start().await;
    let vol = &b.create_volume("xfs-grow", 320 * MIB).await;
    let cap = mount_cap("xfs", Mode::SingleNodeWriter, &[], "");
    b.stage(vol, "staging/g", cap.clone()).await.unwrap();
    b.publish(vol, "staging/g", "pods/g/mount", cap.clone(), false).await.unwrap();
    std::fs::write(b.path("pods/g/mount/keep"), b"k").unwrap();
    let before = usage(&b.stats(vol, "pods/g/mount").await.unwrap(), Unit::Bytes).total;
    let dev = b.device(vol).await.unwrap();
    assert_eq!(device_size(&dev), 320 * MIB);

    // ControllerExpandVolume grows the volume; NodeExpandVolume follows at
    // once, before volumed's attachment watcher may have grown the device:
    // it waits for that, then grows the filesystem.
    b.resize(vol, 640 * MIB).await;
    let r = expand(&b, vol, "pods/g/mount", "staging/g", 640 * MIB).await.unwrap();
    assert_eq!(r.capacity_bytes, (640 * MIB) as i64);
    assert_eq!(device_size(&dev), 640 * MIB, "volumed grew the attached device");
    let after = usage(&b.stats(vol, "pods/g/mount").await.unwrap(), Unit::Bytes).total;
    assert!(after > before + (250 * MIB) as i64, "grew from {before} to {after}");
    assert_eq!(std::fs::read(b.path("pods/g/mount/keep")).unwrap(), b"k");
    // Again: nothing to do, same answer.
    let r = expand(&b, vol, "pods/g/mount", "staging/g", 640 * MIB).await.unwrap();
    assert_eq!(r.capacity_bytes, (640 * MIB) as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_online_grow_fails_cleanly_without_the_privilege() {
    let b = Bench::start().await;
    let vol = &b.create_volume("ext4-grow", 64 * MIB).await;
    let cap = ext4();
    b.stage(vol, "staging/e", cap.clone()).await.unwrap();
    b.publish(vol, "staging/e", "pods/e/mount", cap.clone(), false).await.unwrap();
    std::fs::write(b.path("pods/e/mount/keep"), b"k").unwrap();
    let before = usage(&b.stats(vol, "pods/e/mount").await.unwrap(), Unit::Bytes).total;
    b.resize(vol, 128 * MIB).await;
    let res = tokio::time::timeout(Duration::from_secs(120), expand(&b, vol, "pods/e/mount", "staging/e", 128 * MIB))
        .await
        .expect("NodeExpandVolume must not hang");
    assert_eq!(device_size(&b.device(vol).await.unwrap()), 128 * MIB, "the device grew either way");
    let after = usage(&b.stats(vol, "pods/e/mount").await.unwrap(), Unit::Bytes).total;
    match res {
        // Where the kernel allows online ext4 resize, it must really grow.
        Ok(r) => {
            assert_eq!(r.capacity_bytes, (128 * MIB) as i64);
            assert!(after > before, "grew from {before} to {after}");
        }
        // Here (no CAP_SYS_RESOURCE) resize2fs gets EPERM: a clear error.
        Err(s) => {
            eprintln!("ext4 online grow refused as expected here: {}", s.message());
            assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
            assert!(s.message().contains("resize2fs"), "{}", s.message());
            assert!(s.message().contains(vol.as_str()), "{}", s.message());
            assert_eq!(after, before, "filesystem size unchanged");
        }
    }
    assert_eq!(std::fs::read(b.path("pods/e/mount/keep")).unwrap(), b"k");
    assert!(b.mount_at("staging/e").is_some(), "still mounted");
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_mount_group_is_applied() {
    let b = Bench::start().await;
    let vol = &b.create_volume("mount-group", 64 * MIB).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter, &[], "4321");
    b.stage(vol, "staging/fg", cap.clone()).await.unwrap();
    let root = std::fs::metadata(b.path("staging/fg")).unwrap();
    assert_eq!(root.gid(), 4321);
    assert_eq!(root.mode() & 0o2070, 0o2070, "setgid + group rwx: {:o}", root.mode());
    let lost = std::fs::metadata(b.path("staging/fg/lost+found")).unwrap();
    assert_eq!(lost.gid(), 4321);
    b.publish(vol, "staging/fg", "pods/fg/mount", cap.clone(), false).await.unwrap();
    std::fs::write(b.path("pods/fg/mount/new"), b"n").unwrap();
    assert_eq!(std::fs::metadata(b.path("pods/fg/mount/new")).unwrap().gid(), 4321, "inherited via setgid");
}

#[tokio::test(flavor = "multi_thread")]
async fn single_node_single_writer_allows_one_publication() {
    let b = Bench::start().await;
    let vol = &b.create_volume("single-writer", 64 * MIB).await;
    let cap = mount_cap("ext4", Mode::SingleNodeSingleWriter, &[], "");
    b.stage(vol, "staging/w", cap.clone()).await.unwrap();
    b.publish(vol, "staging/w", "pods/one/mount", cap.clone(), false).await.unwrap();
    b.publish(vol, "staging/w", "pods/one/mount", cap.clone(), false).await.unwrap();
    let s =
        assert_code(b.publish(vol, "staging/w", "pods/two/mount", cap.clone(), false).await, Code::FailedPrecondition);
    assert!(s.message().contains("pods/one/mount"), "{}", s.message());
    // SINGLE_NODE_MULTI_WRITER: several workloads on this node are fine.
    let multi = mount_cap("ext4", Mode::SingleNodeMultiWriter, &[], "");
    b.publish(vol, "staging/w", "pods/three/mount", multi.clone(), false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_before_touching_anything() {
    let b = Bench::start().await;
    let vol = &b.create_volume("bad-input", 64 * MIB).await;
    let outside = b.dir.path().join("outside").to_string_lossy().into_owned();
    let kube = b.kubelet.to_string_lossy().into_owned();
    let bad_paths = [
        format!("{kube}/../outside"),
        format!("{kube}/staging/./x"),
        "relative/staging".to_string(),
        outside.clone(),
        "/etc".to_string(),
        kube.clone(),
    ];
    for p in &bad_paths {
        let r = b
            .node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: p.clone(),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        let s = assert_code(r, Code::InvalidArgument);
        assert!(s.message().contains("staging_target_path"), "{p}: {}", s.message());
        let r = b
            .node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: b.p("staging/ok"),
                target_path: p.clone(),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        assert_code(r, Code::InvalidArgument);
        assert_code(
            b.node
                .clone()
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: vol.clone(),
                    target_path: p.clone(),
                })
                .await,
            Code::InvalidArgument,
        );
    }
    // Unsupported fsType, structural mount flag, unknown access mode.
    let s = assert_code(
        b.stage(vol, "staging/b", mount_cap("btrfs", Mode::SingleNodeWriter, &[], "")).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("btrfs"));
    assert_code(
        b.stage(vol, "staging/b", mount_cap("ext4", Mode::SingleNodeWriter, &["bind"], "")).await,
        Code::InvalidArgument,
    );
    assert_code(b.stage(vol, "staging/b", mount_cap("ext4", Mode::Unknown, &[], "")).await, Code::InvalidArgument);
    assert_code(
        b.stage(vol, "staging/b", mount_cap("ext4", Mode::SingleNodeWriter, &[], "staff")).await,
        Code::InvalidArgument,
    );
    // Multi-node writers cannot share ext4.
    assert_code(
        b.stage(vol, "staging/b", mount_cap("ext4", Mode::MultiNodeMultiWriter, &[], "")).await,
        Code::InvalidArgument,
    );
    // Malformed and missing volume ids.
    for id in ["", "../escape", "a/b", ".."] {
        assert_code(b.stage(id, "staging/b", ext4()).await, Code::InvalidArgument);
        assert_code(b.unstage(id, "staging/b").await, Code::InvalidArgument);
    }
    // Missing capability, missing staging path in publish.
    assert_code(
        b.node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: b.p("staging/b"),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        b.node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.clone(),
                target_path: b.p("pods/x/mount"),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    // Malformed volume context.
    let r = b
        .node
        .clone()
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: b.p("staging/b"),
            volume_capability: Some(ext4()),
            volume_context: [("volumed.dev/kind".to_string(), "tape".to_string())].into(),
            ..Default::default()
        })
        .await;
    let s = assert_code(r, Code::InvalidArgument);
    assert!(s.message().contains("volumed.dev/kind"));
    // A volume the cluster does not know: volumed's NOT_FOUND, with the
    // volume named.
    let s = assert_code(b.stage(MISSING_VOLUME, "staging/b", ext4()).await, Code::NotFound);
    assert!(s.message().contains(MISSING_VOLUME), "{}", s.message());
    // Publish before stage.
    let s = assert_code(b.publish(vol, "staging/b", "pods/x/mount", ext4(), false).await, Code::FailedPrecondition);
    assert!(s.message().contains("not staged"), "{}", s.message());
    assert!(b.mounts().is_empty(), "nothing was mounted");
    b.assert_detached(vol).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_and_node_info_over_the_socket() {
    let b = Bench::start().await;
    let info = b.identity.clone().get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.volumed.dev");
    assert!(!info.vendor_version.is_empty());
    let probe = b.identity.clone().probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true), "ready: the local volumed answers");
    let caps =
        b.identity.clone().get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::plugin_capability::{service::Type as Svc, volume_expansion::Type as Exp, Type as P};
    let svcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(P::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(svcs.contains(&(Svc::VolumeAccessibilityConstraints as i32)), "topology-aware: {caps:?}");
    assert!(
        caps.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(P::VolumeExpansion(e)) if e.r#type == Exp::Online as i32)),
        "online expansion: {caps:?}"
    );
    assert_eq!(caps.capabilities, volumed_csi::caps::PluginFeatures::current().capabilities(), "the shared table");
    let ni = b.node.clone().node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(ni.node_id, b.cluster.node_id(b.node_index).await.to_string(), "the volumed node id");
    assert_eq!(ni.max_volumes_per_node, i64::from(MAX_VOLUMES));
    let topo = ni.accessible_topology.unwrap().segments;
    assert_eq!(topo.len(), 1, "only topology labels: {topo:?}");
    assert_eq!(topo[ZONE_KEY], ZONE);
    let nc = b.node.clone().node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::node_service_capability::{rpc::Type, Type as T};
    let types: Vec<i32> = nc.capabilities.iter().filter_map(|c| c.r#type.as_ref().map(|T::Rpc(r)| r.r#type)).collect();
    for t in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::ExpandVolume,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
        Type::VolumeMountGroup,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?}");
    }
}
