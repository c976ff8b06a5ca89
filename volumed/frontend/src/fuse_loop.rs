//! FUSE + loop frontend: the volume is the file `disk` of a FUSE mount at
//! `<run_dir>/fuse/<volume_id>/`, and a loop device (direct I/O, the
//! device's block size, autoclear) is bound to it.
//!
//! Teardown order matters: the loop device holds the FUSE file open, so it
//! must be released before the FUSE filesystem can be unmounted.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, INodeNo, MountOption, Notifier, Session, SessionACL};
use volumed_nbd::BlockDevice;

use crate::fuse_fs::{DiskFs, DISK_INO, DISK_NAME};
use crate::loopdev::{self, LoopDevice, LoopOptions};
use crate::{exposed_block_size, mountinfo, AttachOptions, FrontendError, FrontendKind};

/// Session threads reading /dev/fuse. They only decode and hand requests to
/// tokio, so a few are enough to keep the kernel's queue drained.
const FUSE_THREADS: usize = 4;
/// How long detach waits for other openers of the loop device to close it.
const DETACH_WAIT: Duration = Duration::from_secs(10);
/// How long a drop without detach waits.
const DROP_WAIT: Duration = Duration::from_secs(2);

/// What teardown still has to undo. Every field is cleared as its step
/// succeeds, which makes teardown idempotent and retryable.
#[derive(Default)]
struct State {
    loopdev: Option<Arc<LoopDevice>>,
    /// A loop device we cleared that the kernel has not released yet.
    pending_loop: Option<u32>,
    mounted: bool,
    session: Option<JoinHandle<io::Result<()>>>,
    dir_created: bool,
}

pub(crate) struct FuseLoop {
    device: Arc<dyn BlockDevice>,
    size: Arc<AtomicU64>,
    block_size: u32,
    mountpoint: PathBuf,
    disk_path: PathBuf,
    loop_path: PathBuf,
    notifier: Option<Notifier>,
    direct_io: bool,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock leaves the state as accurate as the
    // last completed step; keep going with it.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FrontendError> + Send + 'static,
) -> Result<T, FrontendError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| FrontendError::io("blocking task", io::Error::other(e)))?
}

impl FuseLoop {
    pub(crate) async fn attach(
        device: Arc<dyn BlockDevice>,
        opts: &AttachOptions,
        span: &tracing::Span,
    ) -> Result<Self, FrontendError> {
        let unavailable = |reason: String| FrontendError::Unavailable { kind: FrontendKind::FuseLoop, reason };
        loopdev::available().map_err(unavailable)?;
        if !Path::new("/dev/fuse").exists() {
            return Err(unavailable("/dev/fuse is missing (no FUSE driver)".into()));
        }
        let size = device.size();
        let block_size = exposed_block_size(&*device);
        if size == 0 || !size.is_multiple_of(block_size as u64) {
            return Err(FrontendError::InvalidArgument(format!(
                "device size {size} must be a non-zero multiple of its block size {block_size}"
            )));
        }
        if !opts.readonly && device.read_only() {
            return Err(FrontendError::InvalidArgument(
                "the block device is read-only; attach it with readonly".into(),
            ));
        }
        let mountpoint = opts.run_dir.join("fuse").join(&opts.volume_id);
        let mut this = FuseLoop {
            device,
            size: Arc::new(AtomicU64::new(size)),
            block_size,
            disk_path: mountpoint.join(DISK_NAME),
            mountpoint,
            loop_path: PathBuf::new(),
            notifier: None,
            direct_io: false,
            state: Arc::new(Mutex::new(State::default())),
        };
        if let Err(e) = this.setup(opts, span).await {
            tracing::warn!(parent: span, error = %e, "attach failed; undoing");
            let state = this.state.clone();
            let (mp, disk) = (this.mountpoint.clone(), this.disk_path.clone());
            let span2 = span.clone();
            let undo = blocking(move || teardown(&state, &mp, &disk, DROP_WAIT, &span2)).await;
            if let Err(u) = undo {
                tracing::error!(parent: span, error = %u, "undoing a failed attach left something behind");
            }
            return Err(e);
        }
        Ok(this)
    }

    async fn setup(&mut self, opts: &AttachOptions, span: &tracing::Span) -> Result<(), FrontendError> {
        let read_only = opts.readonly;
        let size = self.size.load(Ordering::Acquire);

        // 1. The mount point.
        let state = self.state.clone();
        let mp = self.mountpoint.clone();
        blocking(move || {
            let parent = mp.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent)
                .map_err(|e| FrontendError::io(format!("create {}", parent.display()), e))?;
            match std::fs::create_dir(&mp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if mountinfo::is_mount_point(&mp) {
                        return Err(FrontendError::Busy {
                            device: mp.clone(),
                            reason: "a FUSE mount of an earlier run is still there; \
                                     run recover_stale or detach it first"
                                .into(),
                        });
                    }
                    let empty = std::fs::read_dir(&mp).map(|mut d| d.next().is_none()).unwrap_or(false);
                    if !empty {
                        return Err(FrontendError::InvalidArgument(format!(
                            "{} exists and is not empty",
                            mp.display()
                        )));
                    }
                }
                Err(e) => return Err(FrontendError::io(format!("create {}", mp.display()), e)),
            }
            lock(&state).dir_created = true;
            Ok(())
        })
        .await?;

        // 2. The FUSE mount, served by session threads that hand the data
        //    requests to this runtime.
        let fs = DiskFs::new(
            self.device.clone(),
            self.size.clone(),
            read_only,
            tokio::runtime::Handle::current(),
            span.clone(),
        );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("volumed:{}", opts.volume_id)),
            MountOption::Subtype("volumed".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
            if read_only { MountOption::RO } else { MountOption::RW },
            MountOption::CUSTOM(format!("max_read={}", crate::fuse_fs::MAX_IO)),
        ];
        // Only root (the loop driver's workers run as root) and the owner.
        config.acl = SessionACL::Owner;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let state = self.state.clone();
        let mp = self.mountpoint.clone();
        let span2 = span.clone();
        let notifier = blocking(move || {
            let session = Session::new(fs, &mp, &config)
                .map_err(|e| FrontendError::io(format!("mount FUSE at {}", mp.display()), e))?;
            let notifier = session.notifier();
            let mut st = lock(&state);
            st.mounted = true;
            let handle = std::thread::Builder::new()
                .name("volumed-fuse".into())
                .spawn(move || {
                    let _enter = span2.enter();
                    let res = session.run();
                    if let Err(e) = &res {
                        tracing::error!(error = %e, "FUSE session ended with an error");
                    }
                    res
                })
                .map_err(|e| FrontendError::io("spawn FUSE session thread", e))?;
            st.session = Some(handle);
            Ok(notifier)
        })
        .await?;
        self.notifier = Some(notifier);

        // 3. The loop device, with direct I/O on the FUSE file.
        let state = self.state.clone();
        let disk = self.disk_path.clone();
        let block_size = self.block_size;
        let span2 = span.clone();
        let (loop_path, direct_io) = blocking(move || {
            let backing = open_backing(&disk, read_only)?;
            let len = backing.metadata().map_err(|e| FrontendError::io(format!("stat {}", disk.display()), e))?.len();
            if len != size {
                return Err(FrontendError::io(
                    format!("stat {}", disk.display()),
                    io::Error::other(format!("FUSE file shows {len} bytes, expected {size}")),
                ));
            }
            let dev = LoopDevice::bind(
                &backing,
                &disk,
                LoopOptions { read_only, direct_io: true, block_size, autoclear: true },
            )
            .map_err(|e| FrontendError::io("bind a loop device", e))?;
            let dev = Arc::new(dev);
            lock(&state).loopdev = Some(dev.clone());
            // The loop driver holds its own reference to the file now.
            drop(backing);
            let mut dio = dev.direct_io();
            if !dio {
                if let Err(e) = dev.set_direct_io(true) {
                    tracing::debug!(parent: &span2, error = %e, "LOOP_SET_DIRECT_IO failed");
                }
                dio = dev.direct_io();
            }
            if !dio {
                tracing::warn!(parent: &span2, device = %dev.path().display(),
                    "loop device runs without direct I/O (buffered through the FUSE file)");
            }
            match dev.size() {
                Some(s) if s == size => {}
                other => {
                    return Err(FrontendError::io(
                        format!("check size of {}", dev.path().display()),
                        io::Error::other(format!("loop device shows {other:?} bytes, expected {size}")),
                    ))
                }
            }
            Ok((dev.path().to_path_buf(), dio))
        })
        .await?;
        self.loop_path = loop_path;
        self.direct_io = direct_io;
        Ok(())
    }

    pub(crate) fn device_path(&self) -> &Path {
        &self.loop_path
    }

    pub(crate) fn disk_path(&self) -> &Path {
        &self.disk_path
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn direct_io(&self) -> bool {
        self.direct_io
    }

    pub(crate) async fn resize(&self, new_size: u64, span: &tracing::Span) -> Result<(), FrontendError> {
        let cur = self.size();
        if new_size == cur {
            return Ok(());
        }
        if new_size < cur {
            return Err(FrontendError::InvalidArgument(format!(
                "shrinking from {cur} to {new_size} bytes is not supported"
            )));
        }
        if !new_size.is_multiple_of(self.block_size as u64) {
            return Err(FrontendError::InvalidArgument(format!(
                "new size {new_size} is not a multiple of the block size {}",
                self.block_size
            )));
        }
        let dev_size = self.device.size();
        if dev_size < new_size {
            return Err(FrontendError::InvalidArgument(format!(
                "the volume is only {dev_size} bytes; grow it before growing the device to {new_size}"
            )));
        }
        let Some(dev) = lock(&self.state).loopdev.clone() else {
            return Err(FrontendError::InvalidArgument("the device is detached".into()));
        };
        self.size.store(new_size, Ordering::Release);
        let notifier = self.notifier.clone();
        let disk = self.disk_path.clone();
        let span2 = span.clone();
        let res = blocking(move || {
            // The loop driver reads the size from the cached inode: make
            // the kernel fetch fresh attributes first.
            if let Some(n) = &notifier {
                if let Err(e) = n.inval_inode(INodeNo(DISK_INO), -1, 0) {
                    tracing::debug!(parent: &span2, error = %e, "FUSE inode invalidation failed");
                }
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let len = std::fs::metadata(&disk)
                    .map_err(|e| FrontendError::io(format!("stat {}", disk.display()), e))?
                    .len();
                if len == new_size {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(FrontendError::io(
                        format!("stat {}", disk.display()),
                        io::Error::other(format!("kernel still sees {len} bytes, expected {new_size}")),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            dev.set_capacity()
                .map_err(|e| FrontendError::io(format!("LOOP_SET_CAPACITY on {}", dev.path().display()), e))?;
            match dev.size() {
                Some(s) if s == new_size => Ok(()),
                other => Err(FrontendError::io(
                    format!("check size of {}", dev.path().display()),
                    io::Error::other(format!("loop device shows {other:?} bytes, expected {new_size}")),
                )),
            }
        })
        .await;
        match res {
            Ok(()) => {
                tracing::info!(parent: span, from = cur, to = new_size, "device resized");
                Ok(())
            }
            Err(e) => {
                self.size.store(cur, Ordering::Release);
                Err(e)
            }
        }
    }

    pub(crate) async fn detach(&mut self, span: &tracing::Span) -> Result<(), FrontendError> {
        // Write out what is cached above the device and make it durable
        // before the device goes away: fsync on the loop device writes its
        // dirty pages and sends a flush down to the FUSE file.
        let dev = lock(&self.state).loopdev.clone();
        if let Some(dev) = dev {
            let path = dev.path().to_path_buf();
            blocking(move || {
                let f = File::open(&path).map_err(|e| FrontendError::io(format!("open {}", path.display()), e))?;
                f.sync_all().map_err(|e| FrontendError::io(format!("fsync {}", path.display()), e))
            })
            .await?;
        }
        self.device.flush().await?;
        let state = self.state.clone();
        let (mp, disk) = (self.mountpoint.clone(), self.disk_path.clone());
        let span2 = span.clone();
        blocking(move || teardown(&state, &mp, &disk, DETACH_WAIT, &span2)).await
    }

    pub(crate) fn teardown_blocking(&mut self, span: &tracing::Span) {
        if let Err(e) = teardown(&self.state, &self.mountpoint, &self.disk_path, DROP_WAIT, span) {
            tracing::error!(parent: span, error = %e, "teardown left the device in place");
        }
    }
}

fn open_backing(disk: &Path, read_only: bool) -> Result<File, FrontendError> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(disk)
        .map_err(|e| FrontendError::io(format!("open {} with O_DIRECT", disk.display()), e))
}

/// Whether someone holds `dev` exclusively (a mounted filesystem does).
pub(crate) fn claimed_exclusively(dev: &Path) -> bool {
    match OpenOptions::new().read(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(dev) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Undoes whatever `state` says is still in place: loop device, FUSE
/// mount, session thread, mount point directory.
fn teardown(
    state: &Mutex<State>,
    mountpoint: &Path,
    disk: &Path,
    wait: Duration,
    span: &tracing::Span,
) -> Result<(), FrontendError> {
    let mut st = lock(state);
    if let Some(dev) = st.loopdev.take() {
        if claimed_exclusively(dev.path()) {
            let path = dev.path().to_path_buf();
            st.loopdev = Some(dev);
            return Err(FrontendError::Busy {
                device: path,
                reason: "it is mounted or held open exclusively; unmount it first".into(),
            });
        }
        if let Err(e) = dev.clear() {
            let path = dev.path().to_path_buf();
            st.loopdev = Some(dev);
            return Err(FrontendError::io(format!("LOOP_CLR_FD on {}", path.display()), e));
        }
        st.pending_loop = Some(dev.number());
        tracing::debug!(parent: span, device = %dev.path().display(), "loop device cleared");
        // Our handle counts as an opener: the kernel releases the device
        // once it is closed.
        drop(dev);
    }
    if let Some(n) = st.pending_loop {
        if !loopdev::wait_released(n, disk, wait) {
            return Err(FrontendError::Busy {
                device: loopdev::device_path(n),
                reason: "another process still has it open; it is released at its last close".into(),
            });
        }
        st.pending_loop = None;
    }
    if st.mounted {
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) => {}
            // Not mounted (any more).
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(nix::errno::Errno::EBUSY) => {
                return Err(FrontendError::Busy {
                    device: mountpoint.to_path_buf(),
                    reason: "the FUSE file is still open".into(),
                })
            }
            Err(e) => return Err(FrontendError::io(format!("unmount {}", mountpoint.display()), io::Error::from(e))),
        }
        st.mounted = false;
        tracing::debug!(parent: span, mountpoint = %mountpoint.display(), "FUSE unmounted");
    }
    if let Some(handle) = st.session.take() {
        // The unmount aborted the connection: the session threads see
        // ENODEV and stop.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(parent: span, error = %e, "FUSE session ended with an error")
                }
                Err(_) => tracing::warn!(parent: span, "FUSE session thread panicked"),
            }
        } else {
            tracing::warn!(parent: span, "FUSE session thread did not stop; leaving it");
        }
    }
    if st.dir_created {
        match std::fs::remove_dir(mountpoint) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FrontendError::io(format!("remove {}", mountpoint.display()), e)),
        }
        st.dir_created = false;
    }
    Ok(())
}
