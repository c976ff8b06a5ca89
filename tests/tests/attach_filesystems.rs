//! Attaching volumes on a node (issue 3): real FUSE+loop devices, real
//! filesystems, fsck, detach cleanliness, the node-local API's answers.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tonic::Code;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::node_local::{self, assert_no_devices_left, verify_tree, write_tree, Cleanup};
use volumed_tests::tools::{self, run, try_run};

const RWO: pb::AccessMode = pb::AccessMode::SingleNodeWriter;

fn require_fs_tools() {
    tools::require("mkfs.ext4", "e2fsprogs");
    tools::require("e2fsck", "e2fsprogs");
    tools::require("mkfs.xfs", "xfsprogs");
    tools::require("xfs_repair", "xfsprogs");
    tools::require("losetup", "mount");
}

fn blockdev_size(dev: &str) -> u64 {
    String::from_utf8_lossy(&run("blockdev", &["--getsize64", dev]).stdout).trim().parse().expect("size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ext4_and_xfs_survive_attach_fsck_detach_reattach() {
    let _serial = serial();
    require_fs_tools();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let cleanup = Cleanup::new(&cluster);
    for (fs, seed) in [("ext4", 1u64), ("xfs", 2)] {
        let name = format!("fs-{fs}");
        let vol = cluster.create_volume(&name, 512 << 20, 3).await;
        let a = cluster.attach(0, &name, RWO, false).await.expect("attach");
        assert!(a.device.starts_with("/dev/loop"), "{a:?}");
        assert_eq!(a.frontend, "fuse-loop");
        assert_eq!(a.volume_id, vol.id);
        assert_eq!(a.size_bytes, 512 << 20);
        assert!(a.generation > 0, "{a:?}");
        assert_eq!(blockdev_size(&a.device), 512 << 20);

        // Idempotent: same volume, same device, same generation.
        let again = cluster.attach(0, &vol.id, RWO, false).await.expect("attach again");
        assert_eq!((again.device.as_str(), again.generation), (a.device.as_str(), a.generation));
        let l = cluster.wait_attachment(0, &name, Duration::from_secs(10), "healthy", |x| x.healthy).await;
        assert_eq!(
            (l.state.as_str(), l.device.as_str(), l.frontend.as_str()),
            ("attached", a.device.as_str(), "fuse-loop")
        );
        // GetVolume shows where it is attached and in what state.
        cluster
            .wait_volume(&name, Duration::from_secs(10), "attachment reported by the node", |v| {
                v.attachments.iter().any(|x| x.device == a.device && x.state == "attached" && x.frontend == "fuse-loop")
            })
            .await;

        let mnt = cluster.path().join(format!("mnt-{fs}"));
        match fs {
            "ext4" => run("mkfs.ext4", &["-q", "-F", &a.device]),
            _ => run("mkfs.xfs", &["-q", "-f", &a.device]),
        };
        cleanup.mount(&a.device, &mnt, &[]);
        let tree = write_tree(&mnt, 120, 256 << 10, seed);
        run("sync", &[]);

        // Detaching a mounted device is refused and names the mount.
        let e = cluster.detach(0, &name).await.expect_err("detach while mounted");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(mnt.to_str().unwrap()), "{}", e.message());
        assert!(std::path::Path::new(&a.device).exists());

        cleanup.umount(&mnt);
        match fs {
            "ext4" => run("e2fsck", &["-fn", &a.device]),
            _ => run("xfs_repair", &["-n", &a.device]),
        };
        assert!(cluster.detach(0, &name).await.expect("detach"), "detach must report the attachment existed");
        assert_no_devices_left(&cluster, 0);
        // Detach unpublishes; the node's report of the device follows with
        // its next heartbeat.
        cluster.wait_volume(&name, Duration::from_secs(10), "no attachments", |v| v.attachments.is_empty()).await;

        // Attach again (possibly another loop device): the data is there.
        let b = cluster.attach(0, &name, RWO, false).await.expect("re-attach");
        assert!(b.generation > a.generation, "a new attachment gets a new generation");
        node_local::drop_caches();
        cleanup.mount(&b.device, &mnt, &["ro"]);
        verify_tree(&mnt, &tree);
        cleanup.umount(&mnt);
        assert!(cluster.detach(0, &name).await.expect("detach"));
        assert_no_devices_left(&cluster, 0);
    }
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_local_api_answers_and_refuses_clearly() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let _cleanup = Cleanup::new(&cluster);
    let sock = cluster.local_socket(1);
    let mode = std::fs::metadata(&sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the node-local socket is for root only");
    let mut c = cluster.local(1).await;

    let info = c.node_info(pb::NodeInfoRequest {}).await.expect("node info").into_inner();
    assert_eq!(info.node_id, cluster.node_id(1).await);
    assert_eq!(info.node_name, cluster.nodes[1].name);
    assert_eq!(info.max_volumes, 64);
    assert_eq!(info.api_addr, cluster.nodes[1].api);
    assert_eq!(info.frontend, "fuse-loop", "this kernel has no nbd driver");
    assert!(info.frontend_reason.contains("nbd"), "{}", info.frontend_reason);

    let e = c
        .mount(pb::MountRequest { volume: "x".into(), target: "/tmp/x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().contains("volume x"), "{}", e.message());

    // Unknown volumes: detach succeeds, health says not attached, attach says not found.
    let d = c.detach(pb::DetachRequest { volume: "no-such-volume".into() }).await.expect("detach unknown").into_inner();
    assert!(!d.existed);
    let h = c
        .device_health(pb::DeviceHealthRequest { volume: "no-such-volume".into() })
        .await
        .expect("health")
        .into_inner();
    assert!(!h.attached && !h.healthy && h.reason.contains("not attached"), "{h:?}");
    let e = cluster.attach(1, "no-such-volume", RWO, false).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = cluster.attach(1, " ", RWO, false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Read-only attach gives a read-only device.
    let vol = cluster.create_volume("ro", 64 << 20, 3).await;
    let ro = c
        .attach(pb::AttachRequest {
            volume: "ro".into(),
            mode: RWO as i32,
            readonly: true,
            force: false,
            frontend: pb::Frontend::FuseLoop as i32,
        })
        .await
        .expect("read-only attach")
        .into_inner();
    let getro = String::from_utf8_lossy(&run("blockdev", &["--getro", &ro.device]).stdout).trim().to_string();
    assert_eq!(getro, "1", "read-only attachment must give a read-only device");
    let w = try_run("dd", &["if=/dev/zero", &format!("of={}", ro.device), "bs=4096", "count=1", "oflag=direct"]);
    assert!(!w.status.success(), "a write to a read-only device must fail");
    let h = c.device_health(pb::DeviceHealthRequest { volume: vol.id.clone() }).await.expect("health").into_inner();
    assert!(h.attached && h.healthy, "{h:?}");
    // Same volume, other mode: refused, the attachment stays as it is.
    let e = cluster.attach(1, "ro", RWO, false).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("detach it"), "{}", e.message());
    let list = cluster.attachments(1).await;
    assert_eq!(list.len(), 1);
    assert!(list[0].readonly);
    assert!(cluster.detach(1, "ro").await.expect("detach"));
    assert_no_devices_left(&cluster, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attached_device_grows_with_the_volume() {
    let _serial = serial();
    tools::require("xfs_growfs", "xfsprogs");
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let cleanup = Cleanup::new(&cluster);
    cluster.create_volume("grow", 320 << 20, 3).await;
    let a = cluster.attach(2, "grow", RWO, false).await.expect("attach");
    run("mkfs.xfs", &["-q", "-f", &a.device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&a.device, &mnt, &[]);
    let tree = write_tree(&mnt, 20, 64 << 10, 9);
    let mut admin = cluster.admin().await;
    admin
        .resize_volume(pb::ResizeVolumeRequest { id_or_name: "grow".into(), size_bytes: 640 << 20 })
        .await
        .expect("resize volume");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while blockdev_size(&a.device) != 640 << 20 {
        assert!(std::time::Instant::now() < deadline, "device did not grow\n{}", cluster.logs_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run("xfs_growfs", &[mnt.to_str().unwrap()]);
    let l = cluster.attachments(2).await;
    assert_eq!(l[0].size_bytes, 640 << 20);
    verify_tree(&mnt, &tree);
    cleanup.umount(&mnt);
    run("xfs_repair", &["-n", &a.device]);
    assert!(cluster.detach(2, "grow").await.expect("detach"));
    assert_no_devices_left(&cluster, 2);
}
