//! The node plugin against the real kernel: loop devices, mkfs, mounts,
//! bind mounts, statvfs, online grow. Run as root:
//! `cargo test -p volumed-csi-node --test node_on_loop`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use common::*;
use tonic::Code;
use volumed_csi::proto::{self as csi, volume_usage::Unit};

const VOL: &str = "0b7f6c1e-3f2a-4c1d-9e8f-000000000001";
const VOL2: &str = "0b7f6c1e-3f2a-4c1d-9e8f-000000000002";

fn usage(r: &csi::NodeGetVolumeStatsResponse, unit: Unit) -> csi::VolumeUsage {
    r.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stage_formats_only_blank_devices_and_keeps_data() {
    let b = Bench::start().await;
    let img = b.volumed.add_volume(VOL, 64 * MIB);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter, &["noatime", "nodev"], "");

    b.stage(VOL, "staging/v1", cap.clone()).await.unwrap();
    let m = b.mount_at("staging/v1").expect("staged mount");
    assert_eq!(m.fs_type, "ext4");
    assert!(
        m.has_option("noatime") && m.has_option("nodev"),
        "flags applied: {}",
        m.options
    );
    let uuid = fs_uuid(&img);
    assert!(!uuid.is_empty());

    b.publish(VOL, "staging/v1", "pods/p1/mount", cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(b.path("pods/p1/mount/hello.txt"), b"written before restage").unwrap();
    b.unpublish(VOL, "pods/p1/mount").await.unwrap();
    b.unstage(VOL, "staging/v1").await.unwrap();
    assert!(b.mount_at("staging/v1").is_none());
    assert!(loop_of(&img).is_empty(), "unstage detached the loop device");
    assert!(
        !b.path("pods/p1/mount").exists(),
        "unpublish removed the target dir"
    );

    // Staged again (a new loop device): the filesystem is reused, not remade.
    b.stage(VOL, "staging/v1", cap.clone()).await.unwrap();
    assert_eq!(fs_uuid(&img), uuid, "same filesystem UUID: not reformatted");
    assert_eq!(
        std::fs::read(b.path("staging/v1/hello.txt")).unwrap(),
        b"written before restage"
    );

    // Asking for another filesystem on a device holding data is refused.
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter, &[], "");
    let s = assert_code(
        b.stage(VOL, "staging/other", xfs).await,
        Code::FailedPrecondition,
    );
    assert!(
        s.message().contains("refusing to reformat"),
        "{}",
        s.message()
    );
    assert!(
        s.message().contains(VOL),
        "names the volume: {}",
        s.message()
    );
    assert_eq!(fs_type(&img), "ext4");
    assert_eq!(fs_uuid(&img), uuid);
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_is_made_when_asked_and_kept_when_unspecified() {
    let b = Bench::start().await;
    // mkfs.xfs wants at least 300 MiB.
    let img = b.volumed.add_volume(VOL, 320 * MIB);
    b.stage(
        VOL,
        "staging/x",
        mount_cap("xfs", Mode::SingleNodeWriter, &[], ""),
    )
    .await
    .unwrap();
    assert_eq!(b.mount_at("staging/x").unwrap().fs_type, "xfs");
    std::fs::write(b.path("staging/x/f"), b"x").unwrap();
    b.unstage(VOL, "staging/x").await.unwrap();
    // No fsType in the capability: whatever is on the device is mounted.
    b.stage(
        VOL,
        "staging/x",
        mount_cap("", Mode::SingleNodeWriter, &[], ""),
    )
    .await
    .unwrap();
    assert_eq!(b.mount_at("staging/x").unwrap().fs_type, "xfs");
    assert_eq!(std::fs::read(b.path("staging/x/f")).unwrap(), b"x");
    assert_eq!(fs_type(&img), "xfs");
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_data_is_never_formatted_over() {
    let b = Bench::start().await;
    let img = b.volumed.add_volume(VOL, 64 * MIB);
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(8192)).unwrap();
        f.write_all(&junk).unwrap();
    }
    let s = assert_code(
        b.stage(VOL, "staging/j", ext4()).await,
        Code::FailedPrecondition,
    );
    assert!(
        s.message().contains("refusing to format"),
        "{}",
        s.message()
    );
    let mut back = vec![0u8; 4096];
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(8192)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert_eq!(back, junk, "data untouched");
    assert!(
        loop_of(&img).is_empty(),
        "a failed first stage detaches again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_path_holding_something_else_is_an_error() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
    // A foreign mount at the staging path.
    let staging = b.path("staging/busy");
    std::fs::create_dir_all(&staging).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &staging,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let s = assert_code(
        b.stage(VOL, "staging/busy", ext4()).await,
        Code::FailedPrecondition,
    );
    assert!(
        s.message().contains(&staging.display().to_string()),
        "names the path: {}",
        s.message()
    );
    assert_eq!(
        b.mount_at("staging/busy").unwrap().fs_type,
        "tmpfs",
        "not mounted over"
    );
    // A staging directory with files in it.
    std::fs::create_dir_all(b.path("staging/full")).unwrap();
    std::fs::write(b.path("staging/full/keep"), b"mine").unwrap();
    assert_code(
        b.stage(VOL, "staging/full", ext4()).await,
        Code::FailedPrecondition,
    );
    assert_eq!(std::fs::read(b.path("staging/full/keep")).unwrap(), b"mine");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_idempotent_including_partial_cleanup() {
    let b = Bench::start().await;
    let img = b.volumed.add_volume(VOL, 64 * MIB);
    let cap = ext4();
    for _ in 0..2 {
        b.stage(VOL, "staging/i", cap.clone()).await.unwrap();
    }
    for _ in 0..2 {
        b.publish(VOL, "staging/i", "pods/a/mount", cap.clone(), false)
            .await
            .unwrap();
    }
    assert_eq!(b.mounts().len(), 2, "one staging mount, one publication");
    // Same target, different read-only-ness: incompatible.
    assert_code(
        b.publish(VOL, "staging/i", "pods/a/mount", cap.clone(), true)
            .await,
        Code::AlreadyExists,
    );
    // Unstage while published is refused: the device would go under the pod.
    let s = assert_code(b.unstage(VOL, "staging/i").await, Code::FailedPrecondition);
    assert!(s.message().contains("pods/a/mount"), "{}", s.message());
    for _ in 0..2 {
        b.unpublish(VOL, "pods/a/mount").await.unwrap();
    }
    // Partially cleaned: the target unmounted behind the plugin's back.
    b.publish(VOL, "staging/i", "pods/b/mount", cap.clone(), false)
        .await
        .unwrap();
    nix::mount::umount2(&b.path("pods/b/mount"), nix::mount::MntFlags::empty()).unwrap();
    b.unpublish(VOL, "pods/b/mount").await.unwrap();
    assert!(!b.path("pods/b/mount").exists());
    // Unpublishing a path that never existed.
    b.unpublish(VOL, "pods/never/mount").await.unwrap();
    for _ in 0..2 {
        b.unstage(VOL, "staging/i").await.unwrap();
    }
    assert!(loop_of(&img).is_empty());
    // Partially cleaned staging: unmounted by hand, device still attached.
    b.stage(VOL, "staging/i", cap.clone()).await.unwrap();
    nix::mount::umount2(&b.path("staging/i"), nix::mount::MntFlags::empty()).unwrap();
    b.unstage(VOL, "staging/i").await.unwrap();
    assert!(loop_of(&img).is_empty(), "still detached");
    assert!(b.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_publish_refuses_writes() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
    let cap = ext4();
    b.stage(VOL, "staging/r", cap.clone()).await.unwrap();
    std::fs::write(b.path("staging/r/existing"), b"data").unwrap();
    b.publish(VOL, "staging/r", "pods/ro/mount", cap.clone(), true)
        .await
        .unwrap();
    b.publish(VOL, "staging/r", "pods/rw/mount", cap.clone(), false)
        .await
        .unwrap();
    assert!(b.mount_at("pods/ro/mount").unwrap().read_only());
    let err = std::fs::write(b.path("pods/ro/mount/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(
        std::fs::read(b.path("pods/ro/mount/existing")).unwrap(),
        b"data"
    );
    std::fs::write(b.path("pods/rw/mount/new"), b"x").unwrap();
    assert!(
        b.path("pods/ro/mount/new").exists(),
        "same filesystem, read-only view"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_block_round_trip() {
    let b = Bench::start().await;
    let img = b.volumed.add_volume(VOL, 16 * MIB);
    let cap = block_cap(Mode::SingleNodeWriter);
    for _ in 0..2 {
        b.stage(VOL, "staging/blk", cap.clone()).await.unwrap();
        b.publish(VOL, "staging/blk", "pods/p/dev/vol", cap.clone(), false)
            .await
            .unwrap();
    }
    let target = b.path("pods/p/dev/vol");
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "target is the device node"
    );
    let dev = b.volumed.device(VOL).unwrap();
    assert_eq!(meta.rdev(), std::fs::metadata(&dev).unwrap().rdev());

    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    let mut back = vec![0u8; pattern.len()];
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert_eq!(
        back, pattern,
        "bytes written through the published device reach the volume"
    );

    let st = b.stats(VOL, "pods/p/dev/vol").await.unwrap();
    assert_eq!(usage(&st, Unit::Bytes).total, (16 * MIB) as i64);
    assert!(!st.volume_condition.unwrap().abnormal);

    for _ in 0..2 {
        b.unpublish(VOL, "pods/p/dev/vol").await.unwrap();
    }
    assert!(!target.exists(), "target file removed");
    for _ in 0..2 {
        b.unstage(VOL, "staging/blk").await.unwrap();
    }
    assert!(
        !b.path(&format!("staging/blk/{VOL}")).exists(),
        "staged device file removed"
    );
    assert!(loop_of(&img).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_attachment_makes_the_raw_device_read_only() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 16 * MIB);
    let cap = block_cap(Mode::SingleNodeReaderOnly);
    let ctx: HashMap<String, String> =
        [("volumed.dev/readonly".to_string(), "true".to_string())].into();
    b.stage_ctx(VOL, "staging/rob", cap.clone(), ctx)
        .await
        .unwrap();
    b.publish(VOL, "staging/rob", "pods/p/dev/ro", cap.clone(), true)
        .await
        .unwrap();
    let target = b.path("pods/p/dev/ro");
    assert!(b.mount_at("pods/p/dev/ro").unwrap().read_only());
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .and_then(|mut f| {
            f.write_all(&[1u8; 4096])?;
            f.sync_all()
        });
    assert!(err.is_err(), "writing a read-only attached device fails");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_report_bytes_inodes_and_condition() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
    b.volumed.add_volume(VOL2, 64 * MIB);
    let cap = ext4();
    b.stage(VOL, "staging/s", cap.clone()).await.unwrap();
    b.publish(VOL, "staging/s", "pods/s/mount", cap.clone(), false)
        .await
        .unwrap();
    let before = b.stats(VOL, "pods/s/mount").await.unwrap();
    let bytes = usage(&before, Unit::Bytes);
    let inodes = usage(&before, Unit::Inodes);
    assert!(
        bytes.total > (50 * MIB) as i64 && bytes.total <= (64 * MIB) as i64,
        "{bytes:?}"
    );
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
    let after = b.stats(VOL, "pods/s/mount").await.unwrap();
    assert!(usage(&after, Unit::Bytes).used >= bytes.used + (8 * MIB) as i64);
    assert!(usage(&after, Unit::Inodes).used >= inodes.used + 21);
    // The staging path answers too.
    b.stats(VOL, "staging/s").await.unwrap();

    // Unhealthy device: reported, with the reason.
    b.volumed
        .set_health(VOL, false, "leader unreachable for 12s");
    let sick = b.stats(VOL, "pods/s/mount").await.unwrap();
    let c = sick.volume_condition.unwrap();
    assert!(c.abnormal);
    assert!(c.message.contains("leader unreachable"), "{}", c.message);
    assert!(c.message.contains(VOL), "{}", c.message);

    // Not ours: a missing path, a plain directory, another volume's id.
    assert_code(b.stats(VOL, "pods/none/mount").await, Code::NotFound);
    std::fs::create_dir_all(b.path("pods/plain")).unwrap();
    assert_code(b.stats(VOL, "pods/plain").await, Code::NotFound);
    b.stage(VOL2, "staging/s2", cap.clone()).await.unwrap();
    let s = assert_code(b.stats(VOL2, "pods/s/mount").await, Code::NotFound);
    assert!(s.message().contains("pods/s/mount"), "{}", s.message());
    // Outside the kubelet dir.
    assert_code(
        b.node
            .clone()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: VOL.into(),
                volume_path: "/proc".into(),
                staging_target_path: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
}

async fn expand(
    b: &Bench,
    target: &str,
    staging: &str,
    required: u64,
) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
    b.node
        .clone()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: VOL.into(),
            volume_path: b.p(target),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: required as i64,
                limit_bytes: 0,
            }),
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
    b.volumed.add_volume(VOL, 320 * MIB);
    let cap = mount_cap("xfs", Mode::SingleNodeWriter, &[], "");
    b.stage(VOL, "staging/g", cap.clone()).await.unwrap();
    b.publish(VOL, "staging/g", "pods/g/mount", cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(b.path("pods/g/mount/keep"), b"k").unwrap();
    let before = usage(&b.stats(VOL, "pods/g/mount").await.unwrap(), Unit::Bytes).total;

    // Asking before the device grew: a clear precondition error.
    let s = assert_code(
        expand(&b, "pods/g/mount", "staging/g", 640 * MIB).await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("has not grown"), "{}", s.message());

    b.volumed.grow(VOL, 640 * MIB);
    let r = expand(&b, "pods/g/mount", "staging/g", 640 * MIB)
        .await
        .unwrap();
    assert_eq!(r.capacity_bytes, (640 * MIB) as i64);
    let after = usage(&b.stats(VOL, "pods/g/mount").await.unwrap(), Unit::Bytes).total;
    assert!(
        after > before + (250 * MIB) as i64,
        "grew from {before} to {after}"
    );
    assert_eq!(std::fs::read(b.path("pods/g/mount/keep")).unwrap(), b"k");
    // Again: nothing to do, same answer.
    let r = expand(&b, "pods/g/mount", "staging/g", 640 * MIB)
        .await
        .unwrap();
    assert_eq!(r.capacity_bytes, (640 * MIB) as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_online_grow_fails_cleanly_without_the_privilege() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
    let cap = ext4();
    b.stage(VOL, "staging/e", cap.clone()).await.unwrap();
    b.publish(VOL, "staging/e", "pods/e/mount", cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(b.path("pods/e/mount/keep"), b"k").unwrap();
    let before = usage(&b.stats(VOL, "pods/e/mount").await.unwrap(), Unit::Bytes).total;
    b.volumed.grow(VOL, 128 * MIB);
    let res = tokio::time::timeout(
        Duration::from_secs(120),
        expand(&b, "pods/e/mount", "staging/e", 128 * MIB),
    )
    .await
    .expect("NodeExpandVolume must not hang");
    let after = usage(&b.stats(VOL, "pods/e/mount").await.unwrap(), Unit::Bytes).total;
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
            assert!(s.message().contains(VOL), "{}", s.message());
            assert_eq!(after, before, "filesystem size unchanged");
        }
    }
    assert_eq!(std::fs::read(b.path("pods/e/mount/keep")).unwrap(), b"k");
    assert!(b.mount_at("staging/e").is_some(), "still mounted");
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_mount_group_is_applied() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter, &[], "4321");
    b.stage(VOL, "staging/fg", cap.clone()).await.unwrap();
    let root = std::fs::metadata(b.path("staging/fg")).unwrap();
    assert_eq!(root.gid(), 4321);
    assert_eq!(
        root.mode() & 0o2070,
        0o2070,
        "setgid + group rwx: {:o}",
        root.mode()
    );
    let lost = std::fs::metadata(b.path("staging/fg/lost+found")).unwrap();
    assert_eq!(lost.gid(), 4321);
    b.publish(VOL, "staging/fg", "pods/fg/mount", cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(b.path("pods/fg/mount/new"), b"n").unwrap();
    assert_eq!(
        std::fs::metadata(b.path("pods/fg/mount/new"))
            .unwrap()
            .gid(),
        4321,
        "inherited via setgid"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn single_node_single_writer_allows_one_publication() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
    let cap = mount_cap("ext4", Mode::SingleNodeSingleWriter, &[], "");
    b.stage(VOL, "staging/w", cap.clone()).await.unwrap();
    b.publish(VOL, "staging/w", "pods/one/mount", cap.clone(), false)
        .await
        .unwrap();
    b.publish(VOL, "staging/w", "pods/one/mount", cap.clone(), false)
        .await
        .unwrap();
    let s = assert_code(
        b.publish(VOL, "staging/w", "pods/two/mount", cap.clone(), false)
            .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("pods/one/mount"), "{}", s.message());
    // SINGLE_NODE_MULTI_WRITER: several workloads on this node are fine.
    let multi = mount_cap("ext4", Mode::SingleNodeMultiWriter, &[], "");
    b.publish(VOL, "staging/w", "pods/three/mount", multi.clone(), false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_before_touching_anything() {
    let b = Bench::start().await;
    b.volumed.add_volume(VOL, 64 * MIB);
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
                volume_id: VOL.into(),
                staging_target_path: p.clone(),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        let s = assert_code(r, Code::InvalidArgument);
        assert!(
            s.message().contains("staging_target_path"),
            "{p}: {}",
            s.message()
        );
        let r = b
            .node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: VOL.into(),
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
                    volume_id: VOL.into(),
                    target_path: p.clone(),
                })
                .await,
            Code::InvalidArgument,
        );
    }
    // Unsupported fsType, structural mount flag, unknown access mode.
    let s = assert_code(
        b.stage(
            VOL,
            "staging/b",
            mount_cap("btrfs", Mode::SingleNodeWriter, &[], ""),
        )
        .await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("btrfs"));
    assert_code(
        b.stage(
            VOL,
            "staging/b",
            mount_cap("ext4", Mode::SingleNodeWriter, &["bind"], ""),
        )
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        b.stage(VOL, "staging/b", mount_cap("ext4", Mode::Unknown, &[], ""))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        b.stage(
            VOL,
            "staging/b",
            mount_cap("ext4", Mode::SingleNodeWriter, &[], "staff"),
        )
        .await,
        Code::InvalidArgument,
    );
    // Multi-node writers cannot share ext4.
    assert_code(
        b.stage(
            VOL,
            "staging/b",
            mount_cap("ext4", Mode::MultiNodeMultiWriter, &[], ""),
        )
        .await,
        Code::InvalidArgument,
    );
    // Malformed and missing volume ids.
    for id in ["", "../escape", "a/b", ".."] {
        assert_code(
            b.stage(id, "staging/b", ext4()).await,
            Code::InvalidArgument,
        );
        assert_code(b.unstage(id, "staging/b").await, Code::InvalidArgument);
    }
    // Missing capability, missing staging path in publish.
    assert_code(
        b.node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: VOL.into(),
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
                volume_id: VOL.into(),
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
            volume_id: VOL.into(),
            staging_target_path: b.p("staging/b"),
            volume_capability: Some(ext4()),
            volume_context: [("volumed.dev/kind".to_string(), "tape".to_string())].into(),
            ..Default::default()
        })
        .await;
    let s = assert_code(r, Code::InvalidArgument);
    assert!(s.message().contains("volumed.dev/kind"));
    // An unknown volume: volumed's NOT_FOUND, with the volume named.
    let s = assert_code(b.stage(VOL2, "staging/b", ext4()).await, Code::NotFound);
    assert!(s.message().contains(VOL2), "{}", s.message());
    // Publish before stage.
    let s = assert_code(
        b.publish(VOL, "staging/b", "pods/x/mount", ext4(), false)
            .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("not staged"), "{}", s.message());
    assert!(b.mounts().is_empty(), "nothing was mounted");
    assert!(b.volumed.device(VOL).is_none(), "nothing was attached");
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_and_node_info_over_the_socket() {
    let b = Bench::start().await;
    let info = b
        .identity
        .clone()
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.volumed.dev");
    assert!(!info.vendor_version.is_empty());
    let probe = b
        .identity
        .clone()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = b
        .identity
        .clone()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 3);
    let ni = b
        .node
        .clone()
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, NODE_ID.to_string());
    assert_eq!(ni.max_volumes_per_node, 16);
    let topo = ni.accessible_topology.unwrap().segments;
    assert_eq!(topo.len(), 1, "only topology labels: {topo:?}");
    assert_eq!(topo["topology.kubernetes.io/zone"], "zone-a");
    let nc = b
        .node
        .clone()
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::node_service_capability::{rpc::Type, Type as T};
    let types: Vec<i32> = nc
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|T::Rpc(r)| r.r#type))
        .collect();
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
