//! Shared file volumes (issue 7): two nodes mount the same R=3 volume
//! through their own volumed and see each other's changes — data, names,
//! links, modes, owners, times, xattrs — with `ls -l` identical on both;
//! mounts come back after volumed restarts.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::files::{get_xattr, ls_l, mount_dir, set_xattr, ATTR_TTL};
use volumed_tests::tools::random_file;

fn write_file(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn read_file(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())).read_to_end(&mut v).expect("read");
    v
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_one_file_volume() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("shared", 256 << 20, 3).await;
    let a = mount_dir(&cluster, "a");
    let b = mount_dir(&cluster, "b");
    cluster.mount(0, "shared", &a).await.expect("mount on node 0");
    cluster.mount(1, "shared", &b).await.expect("mount on node 1");
    // Idempotent: the same mount again answers the same.
    cluster.mount(1, "shared", &b).await.expect("mount again");

    let (a2, b2) = (a.clone(), b.clone());
    blocking(move || {
        let (a, b) = (a2, b2);
        // A writes, B reads (close-to-open).
        write_file(&a.join("hello.txt"), b"hello from a\n");
        assert_eq!(read_file(&b.join("hello.txt")), b"hello from a\n");
        // B writes a bigger file (several write batches), A reads it.
        random_file(&b.join("big.bin"), 5 << 20 | 123, 7);
        assert!(read_file(&a.join("big.bin")) == read_file(&b.join("big.bin")), "big.bin differs across nodes");
        assert_eq!(std::fs::metadata(a.join("big.bin")).expect("stat").len(), 5 << 20 | 123);

        // Directories and rename (one command: the name moves atomically).
        std::fs::create_dir_all(a.join("dir/sub")).expect("mkdir");
        std::fs::rename(a.join("hello.txt"), a.join("dir/sub/renamed.txt")).expect("rename");
        std::thread::sleep(ATTR_TTL);
        assert!(!b.join("hello.txt").exists(), "old name still visible on b");
        assert_eq!(read_file(&b.join("dir/sub/renamed.txt")), b"hello from a\n");

        // Hard link on B, seen on A.
        std::fs::hard_link(b.join("big.bin"), b.join("dir/big-link")).expect("link");
        std::thread::sleep(ATTR_TTL);
        let (m1, m2) = (
            std::fs::metadata(a.join("big.bin")).expect("stat"),
            std::fs::metadata(a.join("dir/big-link")).expect("stat"),
        );
        assert_eq!((m1.ino(), m1.nlink()), (m2.ino(), 2));

        // Symlink on A, read on B.
        std::os::unix::fs::symlink("sub/renamed.txt", a.join("dir/sym")).expect("symlink");
        assert_eq!(std::fs::read_link(b.join("dir/sym")).expect("readlink"), Path::new("sub/renamed.txt"));
        assert_eq!(read_file(&b.join("dir/sym")), b"hello from a\n");

        // chmod, chown, utimes on B; xattr on A.
        std::fs::set_permissions(b.join("big.bin"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
        nix::unistd::chown(&b.join("dir/sub"), Some(1234.into()), Some(4321.into())).expect("chown");
        let t = nix::sys::time::TimeSpec::new(1_000_000_000, 123_456_789);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &b.join("dir/sub/renamed.txt"),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .expect("utimes");
        set_xattr(&a.join("big.bin"), "user.origin", b"node-a").expect("setxattr");
        std::thread::sleep(ATTR_TTL);
        let m = std::fs::metadata(a.join("big.bin")).expect("stat");
        assert_eq!(m.mode() & 0o7777, 0o640);
        let m = std::fs::metadata(a.join("dir/sub")).expect("stat");
        assert_eq!((m.uid(), m.gid()), (1234, 4321));
        let m = std::fs::metadata(a.join("dir/sub/renamed.txt")).expect("stat");
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));
        assert_eq!(get_xattr(&b.join("big.bin"), "user.origin").expect("getxattr"), b"node-a");

        // Unlink on A: gone on B.
        std::fs::remove_file(a.join("dir/big-link")).expect("unlink");
        std::thread::sleep(ATTR_TTL);
        assert!(!b.join("dir/big-link").exists());
        assert_eq!(std::fs::metadata(b.join("big.bin")).expect("stat").nlink(), 1);

        std::thread::sleep(ATTR_TTL);
        let (la, lb) = (ls_l(&a), ls_l(&b));
        assert_eq!(la, lb, "ls -l differs between the nodes");
        assert!(la.contains("renamed.txt") && la.contains("sym -> sub/renamed.txt"), "{la}");
    })
    .await;

    // statfs reports the volume's size.
    let out = volumed_tests::tools::run("df", &["-B1", "--output=size", a.to_str().expect("utf-8")]);
    let size: u64 =
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df size");
    assert_eq!(size, 256 << 20);

    assert_eq!(cluster.local_mounts(0).await.len(), 1);
    assert!(cluster.unmount(0, &a).await.expect("unmount"));
    assert!(cluster.unmount(1, &b).await.expect("unmount"));
    assert!(!cluster.unmount(1, &b).await.expect("unmount again"), "a second unmount finds nothing");
    assert!(cluster.local_mounts(0).await.is_empty());
    assert!(volumed_tests::tools::mounts_below(cluster.path()).is_empty(), "mounts left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn block_volumes_are_not_mounted_and_bad_targets_are_refused() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_volume("blk", 64 << 20, 3).await;
    let t = mount_dir(&cluster, "x");
    let e = cluster.mount(0, "blk", &t).await.expect_err("a block volume cannot be mounted");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = cluster.mount(0, "missing", &t).await.expect_err("unknown volume");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    cluster.create_file_volume("f", 64 << 20, 3).await;
    let e = cluster.mount(0, "f", Path::new("relative/path")).await.expect_err("relative target");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // A file volume is not attached as a block device either.
    let e = cluster
        .attach(0, "f", volumed_proto::volumed::v1::AccessMode::SingleNodeWriter, false)
        .await
        .expect_err("attach");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounts_come_back_after_volumed_restarts() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("persist", 128 << 20, 3).await;
    let m = mount_dir(&cluster, "m");
    cluster.mount(1, "persist", &m).await.expect("mount");
    let m2 = m.clone();
    blocking(move || write_file(&m2.join("before"), b"written before the restart")).await;

    // SIGKILL: the FUSE connection dies with the process; the restarted
    // volumed detaches the dead mount and mounts again at the same path.
    cluster.kill(1);
    let m2 = m.clone();
    let err = blocking(move || std::fs::metadata(m2.join("before")).expect_err("dead mount")).await;
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    cluster.restart(1);
    cluster.wait_mount_healthy(1, &m, Duration::from_secs(90)).await;
    let m2 = m.clone();
    blocking(move || {
        assert_eq!(read_file(&m2.join("before")), b"written before the restart");
        write_file(&m2.join("after"), b"written after the restart");
    })
    .await;

    // Graceful stop and start: the same.
    assert!(cluster.stop(1).expect("exit status").success(), "{}", cluster.logs_tail(20));
    cluster.restart(1);
    cluster.wait_mount_healthy(1, &m, Duration::from_secs(90)).await;
    let m2 = m.clone();
    blocking(move || assert_eq!(read_file(&m2.join("after")), b"written after the restart")).await;
    assert!(cluster.unmount(1, &m).await.expect("unmount"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_removed_behind_volumeds_back_is_reported_and_made_again() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("lost", 64 << 20, 3).await;
    let m = mount_dir(&cluster, "lost");
    cluster.mount(2, "lost", &m).await.expect("mount");
    let m2 = m.clone();
    blocking(move || write_file(&m2.join("kept"), b"kept")).await;
    volumed_tests::tools::run("umount", &[m.to_str().expect("utf-8")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = cluster.local_mounts(2).await;
        if l.iter().any(|x| !x.healthy && x.reason.contains("session ended")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a lost mount must be reported: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Asking again (as NodeStage does after a retry) mounts it again.
    cluster.mount(2, "lost", &m).await.expect("mount again");
    cluster.wait_mount_healthy(2, &m, Duration::from_secs(10)).await;
    let m2 = m.clone();
    blocking(move || assert_eq!(read_file(&m2.join("kept")), b"kept")).await;
    assert!(cluster.unmount(2, &m).await.expect("unmount"));
}
