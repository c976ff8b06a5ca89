//! POSIX behaviour of a file volume mount (issue 7), table-driven over a
//! real FUSE mount of an R=3 volume: open flags, O_APPEND, O_TRUNC,
//! O_EXCL, sparse files, truncate, rename over files and directories,
//! ENOTEMPTY / EISDIR / ENOTDIR / EEXIST, permission checks as a non-root
//! user (default_permissions + allow_other), ENOSPC and its recovery, and
//! unlink while open (space freed at the last close).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::files::mount_dir;
use volumed_tests::tools::try_run;

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("the call must fail").raw_os_error().expect("an OS error")
}

fn used_bytes(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    (s.blocks() - s.blocks_free()) * s.fragment_size()
}

/// Runs `sh -c script` as uid/gid 1000 (no supplementary groups).
fn as_user(script: &str) -> (bool, String) {
    let out = try_run("setpriv", &["--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c", script]);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn posix_table(m: &Path) {
    let p = |n: &str| -> PathBuf { m.join(n) };

    // O_CREAT|O_EXCL on an existing file; O_EXCL alone creates.
    std::fs::OpenOptions::new().write(true).create_new(true).open(p("excl")).expect("create_new");
    assert_eq!(errno_of(std::fs::OpenOptions::new().write(true).create_new(true).open(p("excl"))), libc::EEXIST);

    // O_TRUNC empties; O_APPEND appends whatever the offset.
    std::fs::write(p("t"), b"0123456789").expect("write");
    std::fs::OpenOptions::new().write(true).truncate(true).open(p("t")).expect("O_TRUNC");
    assert_eq!(std::fs::metadata(p("t")).expect("stat").len(), 0);
    std::fs::write(p("app"), b"abc").expect("write");
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(p("app")).expect("O_APPEND");
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.write_all(b"def").expect("append");
    }
    assert_eq!(std::fs::read(p("app")).expect("read"), b"abcdef");

    // Opening a missing file without O_CREAT; a directory for writing.
    assert_eq!(errno_of(std::fs::File::open(p("missing"))), libc::ENOENT);
    std::fs::create_dir(p("d")).expect("mkdir");
    assert_eq!(errno_of(std::fs::OpenOptions::new().write(true).open(p("d"))), libc::EISDIR);
    assert_eq!(errno_of(std::fs::File::open(p("t/x"))), libc::ENOTDIR);
    assert_eq!(errno_of(std::fs::create_dir(p("d"))), libc::EEXIST);

    // Sparse: a hole reads as zeros and takes no space.
    {
        let f = std::fs::File::create(p("sparse")).expect("create");
        std::os::unix::fs::FileExt::write_all_at(&f, b"end", 64 << 20).expect("write past a hole");
        f.sync_all().expect("fsync");
    }
    let md = std::fs::metadata(p("sparse")).expect("stat");
    assert_eq!(md.len(), (64 << 20) + 3);
    assert!(md.blocks() <= 8 * 2, "a sparse file allocates only what was written: {} blocks", md.blocks());
    let mut f = std::fs::File::open(p("sparse")).expect("open");
    let mut buf = vec![1u8; 1 << 20];
    f.seek(SeekFrom::Start(32 << 20)).expect("seek");
    f.read_exact(&mut buf).expect("read hole");
    assert!(buf.iter().all(|b| *b == 0), "hole reads as zeros");

    // truncate down zeroes the tail; truncate up reads zeros.
    std::fs::write(p("tr"), vec![9u8; 10000]).expect("write");
    let f = std::fs::OpenOptions::new().write(true).open(p("tr")).expect("open");
    f.set_len(5000).expect("shrink");
    f.set_len(9000).expect("grow");
    drop(f);
    let data = std::fs::read(p("tr")).expect("read");
    assert_eq!(data.len(), 9000);
    assert!(data[..5000].iter().all(|b| *b == 9) && data[5000..].iter().all(|b| *b == 0));

    // Rename over an existing file replaces it atomically.
    std::fs::write(p("r1"), b"new").expect("write");
    std::fs::write(p("r2"), b"old").expect("write");
    std::fs::rename(p("r1"), p("r2")).expect("rename over a file");
    assert_eq!(std::fs::read(p("r2")).expect("read"), b"new");
    assert!(!p("r1").exists());
    // Directories: over an empty one works, over a non-empty one does not;
    // file over directory and directory over file are refused.
    std::fs::create_dir_all(p("da/inner")).expect("mkdir");
    std::fs::create_dir(p("db")).expect("mkdir");
    std::fs::rename(p("da"), p("db")).expect("rename over an empty directory");
    assert!(p("db/inner").is_dir());
    std::fs::create_dir_all(p("dc/x")).expect("mkdir");
    assert_eq!(errno_of(std::fs::rename(p("dc"), p("db"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(std::fs::rename(p("r2"), p("db"))), libc::EISDIR);
    assert_eq!(errno_of(std::fs::rename(p("dc"), p("r2"))), libc::ENOTDIR);
    assert_eq!(errno_of(std::fs::rename(p("db"), p("db/inner/below"))), libc::EINVAL);
    assert_eq!(errno_of(std::fs::remove_dir(p("dc"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(std::fs::remove_file(p("dc"))), libc::EISDIR);
    assert_eq!(errno_of(std::fs::remove_dir(p("r2"))), libc::ENOTDIR);
    // Directory link counts follow subdirectories.
    assert_eq!(std::fs::metadata(p("dc")).expect("stat").nlink(), 3);
    std::fs::remove_dir(p("dc/x")).expect("rmdir");
    assert_eq!(std::fs::metadata(p("dc")).expect("stat").nlink(), 2);

    // Permissions, checked by the kernel from the modes (default_permissions).
    std::fs::set_permissions(m, std::fs::Permissions::from_mode(0o755)).expect("chmod root");
    std::fs::write(p("secret"), b"root only").expect("write");
    std::fs::set_permissions(p("secret"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::create_dir(p("open")).expect("mkdir");
    std::fs::set_permissions(p("open"), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let q = |n: &str| p(n).display().to_string();
    let (ok, err) = as_user(&format!("echo x > '{}'", q("user-file")));
    assert!(!ok && err.contains("Permission denied"), "create in a 0755 root directory: {err}");
    let (ok, err) = as_user(&format!("cat '{}'", q("secret")));
    assert!(!ok && err.contains("Permission denied"), "read a 0600 root file: {err}");
    let (ok, err) =
        as_user(&format!("echo mine > '{}' && chmod 600 '{}' && cat '{}'", q("open/u"), q("open/u"), q("open/u")));
    assert!(ok, "a user works in a 0777 directory: {err}");
    let md = std::fs::metadata(p("open/u")).expect("stat");
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o777), (1000, 1000, 0o600), "owner is the creating user");
    let (ok, err) = as_user(&format!("chmod 644 '{}'", q("secret")));
    assert!(!ok && err.contains("not permitted"), "chmod of root's file: {err}");
    let (ok, _) = as_user(&format!("rm -f '{}'", q("t")));
    assert!(!ok, "unlink in a directory the user cannot write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn posix_semantics_on_a_mount() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("posix", 256 << 20, 3).await;
    let m = mount_dir(&cluster, "posix");
    cluster.mount(1, "posix", &m).await.expect("mount");
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || posix_table(&m2)).await.expect("posix table");
    assert!(cluster.unmount(1, &m).await.expect("unmount"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_is_enforced_and_freed_space_comes_back() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("small", 16 << 20, 3).await;
    let m = mount_dir(&cluster, "small");
    cluster.mount(0, "small", &m).await.expect("mount");
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || {
        let m = m2;
        // ENOSPC: from a write or at the latest from fsync/close.
        let fill = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(m.join("fill"))?;
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..24 {
                f.write_all(&chunk)?;
            }
            f.sync_all()
        };
        assert_eq!(errno_of(fill()), libc::ENOSPC, "a 24 MiB file does not fit a 16 MiB volume");
        let used = used_bytes(&m);
        assert!(used > (12 << 20) && used <= 16 << 20, "the volume is (nearly) full: {used}");
        // Freed space is usable again.
        std::fs::remove_file(m.join("fill")).expect("unlink");
        assert!(used_bytes(&m) < 1 << 20, "unlink frees the blocks");
        std::fs::write(m.join("fits"), vec![1u8; 8 << 20]).expect("8 MiB fit after the unlink");

        // Unlinked while open: readable through the open handle; the space
        // returns at the last close.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.join("tmp"))
            .expect("create");
        f.write_all(&vec![3u8; 4 << 20]).expect("write");
        f.sync_all().expect("fsync");
        let before = used_bytes(&m);
        std::fs::remove_file(m.join("tmp")).expect("unlink while open");
        assert!(!m.join("tmp").exists());
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut back = Vec::new();
        f.read_to_end(&mut back).expect("read an unlinked open file");
        assert!(back.len() == 4 << 20 && back.iter().all(|b| *b == 3));
        assert!(used_bytes(&m) >= before, "an open unlinked file keeps its space");
        drop(f);
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_bytes(&m) > before - (3 << 20) {
            assert!(
                Instant::now() < deadline,
                "space of the unlinked file not freed at close: {} of {before}",
                used_bytes(&m)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Inodes are limited too (statfs reports them).
        let s = nix::sys::statvfs::statvfs(&m).expect("statvfs");
        assert_eq!(s.files(), (16 << 20) / 4096);
        assert!(s.files_free() < s.files());
    })
    .await
    .expect("capacity checks");
    // Online growth: the new quota shows at once.
    let mut admin = cluster.admin().await;
    admin
        .resize_volume(volumed_proto::volumed::v1::ResizeVolumeRequest {
            id_or_name: "small".into(),
            size_bytes: 32 << 20,
        })
        .await
        .expect("resize");
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = nix::sys::statvfs::statvfs(&m2).expect("statvfs");
            if s.blocks() * s.fragment_size() == 32 << 20 {
                break;
            }
            assert!(Instant::now() < deadline, "statfs still shows {} blocks", s.blocks());
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::write(m2.join("more"), vec![2u8; 20 << 20]).expect("20 MiB more after growing");
    })
    .await
    .expect("growth");
    assert!(cluster.unmount(0, &m).await.expect("unmount"));
}
