//! FUSE+loop frontend against real kernel objects (root required): loop
//! devices, FUSE, ext4/xfs, e2fsck/xfs_repair, fio.

mod common;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use volumed_frontend::{attach, AttachOptions, FrontendError, FrontendKind};
use volumed_nbd::BlockDevice;

const MIB: u64 = 1 << 20;

async fn attach_fuse(dev: Arc<FileDevice>, run_dir: &Path, id: &str) -> DeviceGuard {
    let opts = AttachOptions::new(id, run_dir);
    let d = attach(FrontendKind::FuseLoop, dev as Arc<dyn BlockDevice>, opts).await.unwrap();
    DeviceGuard(Some(d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ext4_data_survives_and_detach_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 256 * MIB);
    let mut g = attach_fuse(dev.clone(), &run_dir, "ext4-vol").await;
    let loop_dev = g.dev().device_path().to_path_buf();
    assert_eq!(g.dev().kind(), FrontendKind::FuseLoop);
    assert!(g.dev().direct_io());
    assert_eq!(g.dev().size(), 256 * MIB);

    let (name, dio, log_sec, back) = losetup_info(&loop_dev).unwrap();
    assert_eq!(Path::new(&name), loop_dev);
    assert_eq!(dio, "1", "loop device must use direct I/O");
    assert_eq!(log_sec, "4096");
    let disk = run_dir.canonicalize().unwrap().join("fuse/ext4-vol/disk");
    assert_eq!(Path::new(&back), disk);
    assert_eq!(g.dev().backing_file(), Some(run_dir.join("fuse/ext4-vol/disk").as_path()));
    assert_eq!(blockdev_size(&loop_dev), 256 * MIB);

    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&loop_dev));
    let src = tmp.path().join("src");
    let manifest = write_tree(&src);
    let mnt_path = tmp.path().join("mnt");
    {
        let mut m = MountGuard::mount(&loop_dev, mnt_path.clone(), "rw");
        run_ok(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&m.path));
        run_ok(&mut Command::new("sync"));
        check_tree(&m.path, &manifest);
        m.unmount();
    }
    run_ok(Command::new("e2fsck").args(["-f", "-n"]).arg(&loop_dev));
    // Read back through a fresh mount: the data comes from the device now.
    {
        let mut m = MountGuard::mount(&loop_dev, mnt_path.clone(), "ro");
        check_tree(&m.path, &manifest);
        m.unmount();
    }
    assert!(dev.writes.load(Ordering::SeqCst) > 0);
    g.detach().await;
    assert_nothing_left(&run_dir, "ext4-vol", &loop_dev);

    // Everything reached the device: its image is a clean ext4 with the tree.
    run_ok(Command::new("e2fsck").args(["-f", "-n"]).arg(&dev.path));
    let img_loop = run_ok(Command::new("losetup").args(["-f", "--show", "-r"]).arg(&dev.path));
    let img_loop = img_loop.trim().to_string();
    struct Release(String);
    impl Drop for Release {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _release = Release(img_loop.clone());
    let mut m = MountGuard::mount(Path::new(&img_loop), tmp.path().join("img"), "ro");
    check_tree(&m.path, &manifest);
    m.unmount();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xfs_grows_online_after_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 512 * MIB);
    let mut g = attach_fuse(dev.clone(), &run_dir, "xfs-vol").await;
    let loop_dev = g.dev().device_path().to_path_buf();
    run_ok(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&loop_dev));
    let src = tmp.path().join("src");
    let manifest = write_tree(&src);
    {
        let mut m = MountGuard::mount(&loop_dev, tmp.path().join("mnt"), "rw");
        run_ok(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&m.path));

        // Growing the device beyond the volume is refused, shrinking too.
        let err = g.dev().resize(1024 * MIB).await.unwrap_err();
        assert!(matches!(err, FrontendError::InvalidArgument(_)), "{err}");
        let err = g.dev().resize(256 * MIB).await.unwrap_err();
        assert!(matches!(err, FrontendError::InvalidArgument(_)), "{err}");
        assert_eq!(blockdev_size(&loop_dev), 512 * MIB);

        dev.grow(1024 * MIB);
        g.dev().resize(1024 * MIB).await.unwrap();
        assert_eq!(g.dev().size(), 1024 * MIB);
        assert_eq!(blockdev_size(&loop_dev), 1024 * MIB);
        run_ok(Command::new("xfs_growfs").arg(&m.path));
        let df = run_ok(Command::new("df").args(["-B1", "--output=size"]).arg(&m.path));
        let fs_size: u64 = df.lines().nth(1).unwrap().trim().parse().unwrap();
        assert!(fs_size > 900 * MIB, "filesystem did not grow: {fs_size}");
        // New space is usable: fill some of it past the old end.
        run_ok(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=1M", "count=600", "conv=fsync"])
                .arg(format!("of={}/big", m.path.display())),
        );
        check_tree(&m.path, &manifest);
        m.unmount();
    }
    run_ok(Command::new("xfs_repair").arg("-n").arg(&loop_dev));
    g.detach().await;
    assert_nothing_left(&run_dir, "xfs-vol", &loop_dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsync_in_the_filesystem_flushes_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 128 * MIB);
    let mut g = attach_fuse(dev.clone(), &run_dir, "fsync-vol").await;
    let loop_dev = g.dev().device_path().to_path_buf();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&loop_dev));
    {
        let mut m = MountGuard::mount(&loop_dev, tmp.path().join("mnt"), "rw");
        let path = m.path.join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&pattern(7, 100_000)).unwrap();
        let writes_before = dev.writes.load(Ordering::SeqCst);
        let flushes_before = dev.flushes.load(Ordering::SeqCst);
        // Offloaded: the fsync waits on FUSE requests served by this runtime.
        let f = tokio::task::spawn_blocking(move || {
            f.sync_all().unwrap();
            f
        })
        .await
        .unwrap();
        drop(f);
        assert!(dev.writes.load(Ordering::SeqCst) > writes_before, "fsync wrote nothing");
        assert!(dev.flushes.load(Ordering::SeqCst) > flushes_before, "fsync did not reach BlockDevice::flush");
        m.unmount();
    }
    g.detach().await;
    assert_nothing_left(&run_dir, "fsync-vol", &loop_dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_errors_reach_direct_io_as_eio() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 64 * MIB);
    let mut g = attach_fuse(dev.clone(), &run_dir, "err-vol").await;
    let loop_dev = g.dev().device_path().to_path_buf();
    let dd = |args: &[&str]| {
        let mut c = Command::new("dd");
        c.args(args);
        run(&mut c)
    };
    let of = format!("of={}", loop_dev.display());
    let iff = format!("if={}", loop_dev.display());
    // Big sequential writes arrive as big requests (FUSE's default without
    // max_pages negotiation is 128 KiB).
    tokio::task::block_in_place(|| {
        run_ok(
            Command::new("dd")
                .args(["if=/dev/zero", "bs=4M", "count=2", "oflag=direct"])
                .arg(format!("of={}", loop_dev.display()))
                .arg("seek=4"),
        )
    });
    let max_write = dev.max_write.load(Ordering::SeqCst);
    eprintln!("largest write request: {max_write} bytes");
    assert!(max_write > 128 << 10, "largest write was {max_write} bytes");

    dev.fail.store(true, Ordering::SeqCst);
    let out = tokio::task::spawn_blocking({
        let of = of.clone();
        move || dd(&["if=/dev/zero", &of, "bs=4k", "count=1", "oflag=direct"])
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Input/output error"), "{err}");
    let out = tokio::task::spawn_blocking({
        let iff = iff.clone();
        move || dd(&[&iff, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"])
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"));

    // The device recovers: I/O works again and returns what was written.
    dev.fail.store(false, Ordering::SeqCst);
    let data = pattern(3, 8192);
    let path = loop_dev.clone();
    let d2 = data.clone();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
        // O_DIRECT needs an aligned buffer.
        let mut buf = AlignedBuf::new(8192);
        buf.as_mut().copy_from_slice(&d2);
        f.write_all_at(buf.as_ref(), 4096 * 10).unwrap();
        let mut back = AlignedBuf::new(8192);
        f.read_exact_at(back.as_mut(), 4096 * 10).unwrap();
        assert_eq!(back.as_ref(), &d2[..]);
    })
    .await
    .unwrap();
    let mut img = vec![0u8; 8192];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&dev.path).unwrap(), &mut img, 4096 * 10).unwrap();
    assert_eq!(img, data);
    g.detach().await;
    assert_nothing_left(&run_dir, "err-vol", &loop_dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discard_and_zeroout_reach_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 64 * MIB);
    let mut g = attach_fuse(dev.clone(), &run_dir, "trim-vol").await;
    let loop_dev = g.dev().device_path().to_path_buf();
    let fill = |off_mib: u64| {
        run_ok(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=1M", "count=4", "oflag=direct"])
                .arg(format!("seek={off_mib}"))
                .arg(format!("of={}", loop_dev.display())),
        );
    };
    let zeros_at = |off: u64| {
        let mut buf = vec![1u8; 4 * MIB as usize];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&dev.path).unwrap(), &mut buf, off).unwrap();
        buf.iter().all(|b| *b == 0)
    };
    let ld = loop_dev.clone();
    let (trims, zeroes) = (dev.trims.load(Ordering::SeqCst), dev.zeroes.load(Ordering::SeqCst));
    tokio::task::block_in_place(|| {
        fill(8);
        assert!(!zeros_at(8 * MIB));
        run_ok(Command::new("blkdiscard").args(["-o", &(8 * MIB).to_string(), "-l", &(4 * MIB).to_string()]).arg(&ld));
    });
    assert!(dev.trims.load(Ordering::SeqCst) > trims, "discard did not reach trim");
    assert!(zeros_at(8 * MIB));

    tokio::task::block_in_place(|| {
        fill(16);
        assert!(!zeros_at(16 * MIB));
        run_ok(
            Command::new("blkdiscard")
                .args(["-z", "-o", &(16 * MIB).to_string(), "-l", &(4 * MIB).to_string()])
                .arg(&ld),
        );
    });
    let after = dev.trims.load(Ordering::SeqCst) + dev.zeroes.load(Ordering::SeqCst);
    assert!(after > trims + zeroes + 1, "zero-out did not reach the device");
    assert!(zeros_at(16 * MIB));
    g.detach().await;
    assert_nothing_left(&run_dir, "trim-vol", &loop_dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_detach_hands_the_device_back() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 64 * MIB);
    let mut g = attach_fuse(dev.clone(), &run_dir, "busy-vol").await;
    let loop_dev = g.dev().device_path().to_path_buf();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&loop_dev));
    let mut m = MountGuard::mount(&loop_dev, tmp.path().join("mnt"), "rw");
    std::fs::write(m.path.join("x"), b"hello").unwrap();

    let d = g.0.take().unwrap();
    let back = d.detach().await.unwrap_err();
    assert!(matches!(back.error, FrontendError::Busy { .. }), "{}", back.error);
    g.0 = Some(back.device);
    // Still fully working.
    assert_eq!(losetup_info(&loop_dev).unwrap().1, "1");
    std::fs::write(m.path.join("y"), b"world").unwrap();

    // A second attach of the same volume must fail without touching the first.
    let err =
        attach(FrontendKind::FuseLoop, dev.clone() as Arc<dyn BlockDevice>, AttachOptions::new("busy-vol", &run_dir))
            .await
            .unwrap_err();
    assert!(matches!(err, FrontendError::Busy { .. }), "{err}");
    assert_eq!(std::fs::read(m.path.join("x")).unwrap(), b"hello");

    m.unmount();
    run_ok(Command::new("e2fsck").args(["-f", "-n"]).arg(&loop_dev));
    g.detach().await;
    assert_nothing_left(&run_dir, "busy-vol", &loop_dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 64 * MIB);

    let err =
        attach(FrontendKind::FuseLoop, dev.clone() as Arc<dyn BlockDevice>, AttachOptions::new("../escape", &run_dir))
            .await
            .unwrap_err();
    assert!(matches!(err, FrontendError::InvalidArgument(_)), "{err}");

    // A leftover non-empty directory is not ours to mount over.
    let mp = run_dir.join("fuse/occupied");
    std::fs::create_dir_all(&mp).unwrap();
    std::fs::write(mp.join("keep"), b"x").unwrap();
    let err =
        attach(FrontendKind::FuseLoop, dev.clone() as Arc<dyn BlockDevice>, AttachOptions::new("occupied", &run_dir))
            .await
            .unwrap_err();
    assert!(matches!(err, FrontendError::InvalidArgument(_)), "{err}");
    assert!(mp.join("keep").exists());

    // Odd sizes cannot be a 4 KiB block device.
    let odd_dir = tmp.path().join("odd");
    std::fs::create_dir(&odd_dir).unwrap();
    let odd = FileDevice::create(&odd_dir, 64 * MIB);
    odd.grow(64 * MIB + 512);
    let err = attach(FrontendKind::FuseLoop, odd as Arc<dyn BlockDevice>, AttachOptions::new("odd", &run_dir))
        .await
        .unwrap_err();
    assert!(matches!(err, FrontendError::InvalidArgument(_)), "{err}");
    assert!(!run_dir.join("fuse/odd").exists());

    // No nbd driver here: a clear Unavailable error.
    if !Path::new("/sys/module/nbd").exists() {
        let err = attach(FrontendKind::KernelNbd, dev as Arc<dyn BlockDevice>, AttachOptions::new("nbd-vol", &run_dir))
            .await
            .unwrap_err();
        assert!(matches!(err, FrontendError::Unavailable { kind: FrontendKind::KernelNbd, .. }), "{err}");
        assert_eq!(volumed_frontend::detect(), FrontendKind::FuseLoop);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readonly_attach_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 64 * MIB);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&dev.path).unwrap(),
        &pattern(9, 4096),
        0,
    )
    .unwrap();
    let mut opts = AttachOptions::new("ro-vol", &run_dir);
    opts.readonly = true;
    let d = attach(FrontendKind::FuseLoop, dev.clone() as Arc<dyn BlockDevice>, opts).await.unwrap();
    let mut g = DeviceGuard(Some(d));
    let loop_dev = g.dev().device_path().to_path_buf();
    let writes = dev.writes.load(Ordering::SeqCst);
    tokio::task::block_in_place(|| {
        assert_eq!(run_ok(Command::new("blockdev").arg("--getro").arg(&loop_dev)).trim(), "1");
        let out = run(Command::new("dd")
            .args(["if=/dev/zero", "bs=4k", "count=1", "oflag=direct"])
            .arg(format!("of={}", loop_dev.display())));
        assert!(!out.status.success());
        let back = run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!("dd if={} bs=4k count=1 iflag=direct status=none | sha256sum", loop_dev.display())),
        );
        let want = run_ok(Command::new("sh").arg("-c").arg(format!("head -c 4096 {} | sha256sum", dev.path.display())));
        assert_eq!(back, want);
        let err = std::fs::OpenOptions::new().write(true).open(g.dev().backing_file().unwrap()).unwrap_err();
        assert!(matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)), "{err}");
    });
    assert_eq!(dev.writes.load(Ordering::SeqCst), writes);
    g.detach().await;
    assert_nothing_left(&run_dir, "ro-vol", &loop_dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_without_detach_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 64 * MIB);
    let d = attach(FrontendKind::FuseLoop, dev as Arc<dyn BlockDevice>, AttachOptions::new("drop-vol", &run_dir))
        .await
        .unwrap();
    let loop_dev = d.device_path().to_path_buf();
    tokio::task::block_in_place(|| {
        run_ok(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=64k", "count=16", "oflag=direct"])
                .arg(format!("of={}", loop_dev.display())),
        );
        drop(d);
    });
    assert_nothing_left(&run_dir, "drop-vol", &loop_dev);
}

/// A page-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
