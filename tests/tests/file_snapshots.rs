//! Snapshots of file volumes: a snapshot is a cut of the whole tree; a
//! restore rebuilds exactly that tree (content, modes, times, links,
//! xattrs) in a new file volume, independent of its source; a clone of a
//! live file volume copies its current tree. Files unlinked while open on
//! the source (kept only for its mount session) do not reach the copy.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::files::{get_xattr, ls_l, mount_dir, set_xattr, sha_tree, ATTR_TTL};
use volumed_tests::tools::random_file;

fn write_file(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Everything the comparison looks at: `ls -lAnR` (modes, owners, sizes,
/// link counts, mtimes, symlink targets), content hashes, the xattrs and
/// the hard link.
#[derive(Debug, PartialEq, Eq)]
struct Tree {
    ls: String,
    sha: String,
    xattrs: Vec<(String, Vec<u8>)>,
    hard_link_shared: bool,
}

fn tree(root: PathBuf) -> Tree {
    let xattrs = ["small.txt", "d1", "f1.bin"]
        .iter()
        .filter_map(|n| get_xattr(&root.join(n), "user.tag").ok().map(|v| (n.to_string(), v)))
        .collect();
    let hard_link_shared = match (std::fs::metadata(root.join("f1.bin")), std::fs::metadata(root.join("d1/hl"))) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.nlink() == 2,
        _ => false,
    };
    Tree { ls: ls_l(&root), sha: sha_tree(&root), xattrs, hard_link_shared }
}

fn used_inodes(root: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(root).expect("statvfs");
    (s.files() - s.files_free()) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_and_clone_of_file_volumes() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("src", 256 << 20, 3).await;
    let a = mount_dir(&cluster, "src");
    cluster.mount(0, "src", &a).await.expect("mount src on node 0");

    // Tree A, plus a file unlinked while this process holds it open.
    let a2 = a.clone();
    let (tree_a, ghost) = blocking(move || {
        let a = a2;
        std::fs::create_dir_all(a.join("d1/d2")).expect("mkdir");
        random_file(&a.join("f1.bin"), (1 << 20) + 77, 11);
        random_file(&a.join("d1/d2/deep.bin"), 300_000, 12);
        write_file(&a.join("small.txt"), b"small file\n");
        write_file(&a.join("d1/x.txt"), b"to be renamed\n");
        std::fs::set_permissions(a.join("d1/x.txt"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
        nix::unistd::chown(&a.join("d1/d2"), Some(1234.into()), Some(4321.into())).expect("chown");
        std::os::unix::fs::symlink("../small.txt", a.join("d1/sym")).expect("symlink");
        std::fs::hard_link(a.join("f1.bin"), a.join("d1/hl")).expect("link");
        set_xattr(&a.join("small.txt"), "user.tag", b"v-small").expect("setxattr");
        set_xattr(&a.join("d1"), "user.tag", b"v-dir").expect("setxattr");
        random_file(&a.join("ghost.bin"), 200_000, 13);
        let ghost = std::fs::File::open(a.join("ghost.bin")).expect("open ghost");
        std::fs::remove_file(a.join("ghost.bin")).expect("unlink ghost");
        std::thread::sleep(ATTR_TTL);
        (tree(a), ghost)
    })
    .await;
    assert!(tree_a.hard_link_shared && tree_a.xattrs.len() == 2, "tree A incomplete: {tree_a:?}");

    // Inode counters in the Volume message: the orphan counts on the source.
    let src = cluster.get_volume("src").await;
    let a3 = a.clone();
    let statfs_a = blocking(move || used_inodes(&a3)).await;
    assert!(src.file_max_inodes >= 256 << 20 >> 12, "file_max_inodes {}", src.file_max_inodes);
    assert_eq!(src.file_inodes, statfs_a, "GetVolume and statfs disagree on inodes in use");
    // d1, d2, f1 (+hl), deep, small, x, sym, ghost, besides the root.
    assert!(src.file_inodes >= 9, "file_inodes {}", src.file_inodes);

    let snap = cluster.create_snapshot("snap-a", "src").await;
    assert!(snap.ready_to_use, "snapshot not ready: {snap:?}");

    // A block volume cannot come from a file snapshot.
    let mut c = cluster.admin().await;
    let refused = c
        .create_volume(pb::CreateVolumeRequest {
            name: "wrong-kind".into(),
            size_bytes: 256 << 20,
            replica_count: 3,
            kind: pb::VolumeKind::Block as i32,
            source_snapshot: "snap-a".into(),
            ..Default::default()
        })
        .await
        .expect_err("a block volume from a file snapshot must be refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("kind=file"), "{}", refused.message());

    // Tree B: modify, delete, rename, add; the orphan goes away with its handle.
    let a4 = a.clone();
    let tree_b = blocking(move || {
        let a = a4;
        drop(ghost);
        let mut f = std::fs::OpenOptions::new().write(true).open(a.join("f1.bin")).expect("open f1");
        f.write_all(b"changed after the snapshot").expect("write f1");
        f.sync_all().expect("fsync f1");
        drop(f);
        std::fs::remove_file(a.join("small.txt")).expect("rm small");
        std::fs::rename(a.join("d1/x.txt"), a.join("d1/y.txt")).expect("rename");
        write_file(&a.join("d1/d2/new.txt"), b"only in B\n");
        std::thread::sleep(ATTR_TTL);
        tree(a)
    })
    .await;
    assert_ne!(tree_a, tree_b);

    // Restore the snapshot (kind left unspecified: taken from the source).
    let restored = cluster.restore("restored", "snap-a", false, 0).await;
    assert_eq!(restored.kind, pb::VolumeKind::File as i32, "{restored:?}");
    let r = mount_dir(&cluster, "restored");
    cluster.mount(1, "restored", &r).await.expect("mount restored on node 1");
    let r2 = r.clone();
    let (got, statfs_r) = blocking(move || (tree(r2.clone()), used_inodes(&r2))).await;
    assert_eq!(got, tree_a, "the restored tree differs from the snapshot");
    // The orphan of the source's session did not come along.
    let rv = cluster.get_volume("restored").await;
    assert_eq!(
        (rv.file_inodes, statfs_r),
        (src.file_inodes - 1, src.file_inodes - 1),
        "the restored volume counts the source's orphan"
    );

    // The source is still B; writes to the copy stay there.
    let (a5, r3) = (a.clone(), r.clone());
    let (src_now, clone_extra_in_src) = blocking(move || {
        write_file(&r3.join("clone-only.txt"), b"clone\n");
        std::fs::remove_file(r3.join("d1/hl")).expect("rm in clone");
        std::thread::sleep(ATTR_TTL);
        (tree(a5.clone()), a5.join("clone-only.txt").exists())
    })
    .await;
    assert_eq!(src_now, tree_b, "the source changed");
    assert!(!clone_extra_in_src, "a write to the restored volume shows in the source");

    // Clone the live source: its current tree B.
    let clone = cluster.restore("clone-b", "src", true, 0).await;
    assert_eq!(clone.kind, pb::VolumeKind::File as i32);
    let cb = mount_dir(&cluster, "clone-b");
    cluster.mount(2, "clone-b", &cb).await.expect("mount clone on node 2");
    let (cb2, a6) = (cb.clone(), a.clone());
    let (got_b, src_after) = blocking(move || {
        let got = tree(cb2.clone());
        write_file(&cb2.join("d1/d2/new.txt"), b"rewritten in the clone\n");
        std::thread::sleep(ATTR_TTL);
        (got, std::fs::read(a6.join("d1/d2/new.txt")).expect("read source"))
    })
    .await;
    assert_eq!(got_b, tree_b, "the clone differs from its live source");
    assert_eq!(src_after, b"only in B\n");
    let a7 = a.clone();
    let src_inodes_b = blocking(move || used_inodes(&a7)).await;
    assert_eq!(cluster.get_volume("clone-b").await.file_inodes, src_inodes_b);

    for (i, t) in [(0, &a), (1, &r), (2, &cb)] {
        cluster.unmount(i, t).await.expect("unmount");
    }
}
