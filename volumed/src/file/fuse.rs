//! The FUSE filesystem of one mounted file volume, served by volumed on
//! the consuming node.
//!
//! Session threads only decode requests; each is handed to a tokio task
//! that asks the volume's leader (see [`FileClient`]) and replies when the
//! answer comes, so many requests are in flight at once.
//!
//! Consistency is close-to-open: `open` fetches the inode from the leader
//! (and drops what the kernel cached if it changed); writes are buffered
//! per inode and sent in batches of up to 1 MiB, several in flight, and
//! `close`/`fsync` wait for them (fsync also for a majority's fsync).
//! Attributes and entries are cached by the kernel for [`TTL`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn, Instrument};

use super::client::{ClientError, FileClient};
use super::layout::MAX_NAME;
use super::ops::{Attr, FileOp, FileResult};
use super::service::{FileRequest, FileResponse};
use crate::volume::command::BLOCK_SIZE;

/// How long the kernel may cache attributes and names.
pub const TTL: Duration = Duration::from_secs(1);
/// Largest read/write request from the kernel.
const MAX_IO: u32 = 1 << 20;
/// Buffered writes of one inode are sent once this much accumulated.
const FLUSH_AT: usize = 1 << 20;
/// Write batches of one inode in flight to the leader.
const MAX_INFLIGHT: usize = 8;
const MAX_BACKGROUND: u16 = 64;

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn to_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks * (BLOCK_SIZE / 512),
        atime: to_time(a.atime),
        mtime: to_time(a.mtime),
        ctime: to_time(a.ctime),
        crtime: to_time(a.ctime),
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        // Tools size their buffers by this (cp, stdio): big requests.
        blksize: MAX_IO,
        flags: 0,
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

/// Writes of one inode buffered on this mount.
#[derive(Default)]
struct Dirty {
    st: Mutex<DirtyState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct DirtyState {
    /// Buffered extents (offset, data), in arrival order.
    extents: Vec<(u64, Vec<u8>)>,
    buffered: usize,
    /// Batches taken from the buffer and not yet applied: (batch sequence,
    /// byte range). Reserved when taken, under the same lock, so a later
    /// batch always sees the earlier ones it must not overtake.
    inflight: Vec<(u64, u64, u64)>,
    next_seq: u64,
    /// The first failure of a background send, reported at the next
    /// write, flush, fsync or close.
    error: Option<i32>,
}

/// A batch of buffered writes: its sequence number and (offset, data).
type Batch = (u64, Vec<(u64, Vec<u8>)>);

impl DirtyState {
    /// Takes the buffered extents as the next batch and reserves its ranges.
    fn take_batch(&mut self) -> Option<Batch> {
        if self.extents.is_empty() {
            return None;
        }
        self.buffered = 0;
        let extents = std::mem::take(&mut self.extents);
        self.next_seq += 1;
        let seq = self.next_seq;
        for (o, v) in &extents {
            self.inflight.push((seq, *o, *o + v.len() as u64));
        }
        Some((seq, extents))
    }

    /// Whether batch `seq` may go: few enough earlier batches in flight,
    /// and none of them overlapping it (overlapping batches must apply in
    /// order; the others commute).
    fn may_send(&self, seq: u64) -> bool {
        let mine: Vec<(u64, u64)> = self.inflight.iter().filter(|x| x.0 == seq).map(|x| (x.1, x.2)).collect();
        let mut earlier: Vec<u64> = self.inflight.iter().filter(|x| x.0 < seq).map(|x| x.0).collect();
        earlier.dedup();
        earlier.len() < MAX_INFLIGHT
            && !self.inflight.iter().any(|(q, s, e)| *q < seq && mine.iter().any(|(s2, e2)| s < e2 && s2 < e))
    }
}

/// State of one mount, shared by the session threads and the tasks.
pub struct MountFs {
    pub client: Arc<FileClient>,
    rt: tokio::runtime::Handle,
    /// This mount's session in the volume's open-handle records.
    pub session: u64,
    readonly: bool,
    span: tracing::Span,
    next_fh: AtomicU64,
    op_seq: AtomicU64,
    /// Open handles per inode on this mount; the volume only learns the
    /// first open and the last close.
    opens: Mutex<HashMap<u64, u32>>,
    ino_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    dirty: Mutex<HashMap<u64, Arc<Dirty>>>,
    /// (size, mtime) last given to the kernel, per inode.
    told: Mutex<HashMap<u64, (u64, i64)>>,
    pub notifier: OnceLock<Notifier>,
    pub errors: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MountFs {
    pub fn new(
        client: Arc<FileClient>,
        rt: tokio::runtime::Handle,
        session: u64,
        readonly: bool,
        span: tracing::Span,
    ) -> Arc<MountFs> {
        Arc::new(MountFs {
            client,
            rt,
            session,
            readonly,
            span,
            next_fh: AtomicU64::new(1),
            op_seq: AtomicU64::new(1),
            opens: Mutex::new(HashMap::new()),
            ino_locks: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashMap::new()),
            told: Mutex::new(HashMap::new()),
            notifier: OnceLock::new(),
            errors: AtomicU64::new(0),
        })
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.rt.spawn(f.instrument(self.span.clone()));
    }

    fn fail(&self, e: &ClientError) -> Errno {
        self.errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "file request failed");
        errno(e.errno())
    }

    fn creator(&self) -> (u64, u64) {
        (self.session, self.op_seq.fetch_add(1, Ordering::Relaxed))
    }

    fn ino_lock(&self, ino: u64) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.ino_locks).entry(ino).or_default().clone()
    }

    fn dirty_of(&self, ino: u64) -> Arc<Dirty> {
        lock(&self.dirty).entry(ino).or_default().clone()
    }

    fn has_dirty(&self, ino: u64) -> bool {
        lock(&self.dirty).contains_key(&ino)
    }

    /// Notes the attributes the kernel now has; returns whether they
    /// differ from what it had (another node changed the file).
    fn tell(&self, a: &Attr) -> bool {
        let now = (a.size, a.mtime);
        lock(&self.told).insert(a.ino, now).is_some_and(|before| before != now)
    }

    /// Sends buffered extents once a send slot is free and no batch in
    /// flight overlaps them (non-overlapping batches commute, so several
    /// may be in flight without ordering them).
    async fn send(self: &Arc<Self>, ino: u64, d: &Arc<Dirty>, (seq, extents): Batch) {
        loop {
            let notified = d.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&d.st).may_send(seq) {
                break;
            }
            notified.await;
        }
        let me = self.clone();
        let d = d.clone();
        self.spawn(async move {
            let now = now_ns();
            let ops: Vec<FileOp> = extents
                .into_iter()
                .map(|(offset, data)| FileOp::Write { ino, offset, data: Bytes::from(data), now })
                .collect();
            let failure = match me.client.apply(ops).await {
                Ok(results) => results.iter().find_map(|r| match r {
                    FileResult::Err(e) => Some(*e),
                    _ => None,
                }),
                Err(e) => Some(me.fail(&e).code()),
            };
            let mut st = lock(&d.st);
            st.inflight.retain(|x| x.0 != seq);
            if let Some(e) = failure {
                st.error.get_or_insert(e);
            }
            drop(st);
            d.changed.notify_waiters();
        });
    }

    /// Sends everything buffered for `ino` and waits for it; reports a
    /// failure of any earlier background send.
    async fn flush_ino(self: &Arc<Self>, ino: u64) -> Result<(), Errno> {
        let Some(d) = lock(&self.dirty).get(&ino).cloned() else { return Ok(()) };
        let batch = lock(&d.st).take_batch();
        if let Some(b) = batch {
            self.send(ino, &d, b).await;
        }
        loop {
            let notified = d.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&d.st);
                if st.inflight.is_empty() {
                    return match st.error.take() {
                        Some(e) => Err(errno(e)),
                        None => Ok(()),
                    };
                }
            }
            notified.await;
        }
    }

    /// Flushes every inode (unmount, shutdown).
    pub async fn flush_all(self: &Arc<Self>) {
        let inos: Vec<u64> = lock(&self.dirty).keys().copied().collect();
        for ino in inos {
            if let Err(e) = self.flush_ino(ino).await {
                warn!(ino, error = ?e, "buffered writes could not be stored");
            }
        }
    }

    async fn getattr_fresh(self: &Arc<Self>, ino: u64) -> Result<Attr, Errno> {
        if self.has_dirty(ino) {
            self.flush_ino(ino).await?;
        }
        match self.client.read(FileRequest::GetAttr { ino }).await {
            Ok(FileResponse::Attr(a)) => Ok(a),
            Ok(FileResponse::Err(e)) => Err(errno(e)),
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(self.fail(&e)),
        }
    }

    async fn apply_attr(&self, op: FileOp) -> Result<Attr, Errno> {
        match self.client.apply_one(op).await {
            Ok(FileResult::Attr(a)) => Ok(a),
            Ok(FileResult::Err(e)) => Err(errno(e)),
            Ok(FileResult::Ok) => Err(Errno::EIO),
            Err(e) => Err(self.fail(&e)),
        }
    }

    async fn apply_ok(&self, op: FileOp) -> Result<(), Errno> {
        match self.client.apply_one(op).await {
            Ok(FileResult::Err(e)) => Err(errno(e)),
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(&e)),
        }
    }

    fn inval(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                debug!(ino, error = %e, "cache invalidation");
            }
        }
    }

    /// Registers an open handle: the first on this mount tells the volume
    /// (so an unlink elsewhere keeps the inode until we close it) and
    /// fetches fresh attributes; later ones fetch attributes.
    async fn open_handle(self: &Arc<Self>, ino: u64) -> Result<Attr, Errno> {
        let l = self.ino_lock(ino);
        let _g = l.lock().await;
        let first = lock(&self.opens).get(&ino).copied().unwrap_or(0) == 0;
        let attr = if first {
            if self.has_dirty(ino) {
                self.flush_ino(ino).await?;
            }
            self.apply_attr(FileOp::Open { ino, session: self.session }).await?
        } else {
            self.getattr_fresh(ino).await?
        };
        *lock(&self.opens).entry(ino).or_insert(0) += 1;
        if self.tell(&attr) {
            self.inval(ino);
        }
        Ok(attr)
    }

    async fn release_handle(self: &Arc<Self>, ino: u64) {
        if let Err(e) = self.flush_ino(ino).await {
            warn!(ino, error = ?e, "writes of a closed file were lost");
        }
        let l = self.ino_lock(ino);
        let _g = l.lock().await;
        let last = {
            let mut opens = lock(&self.opens);
            match opens.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    opens.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if last {
            {
                let mut dirty = lock(&self.dirty);
                if dirty.get(&ino).is_some_and(|d| {
                    let st = lock(&d.st);
                    st.extents.is_empty() && st.inflight.is_empty() && st.error.is_none()
                }) {
                    dirty.remove(&ino);
                }
            }
            if let Err(e) = self.apply_ok(FileOp::Release { ino, session: self.session }).await {
                warn!(ino, error = ?e, "could not release an open file on the volume");
            }
        }
    }

    fn fh(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }
}

/// The [`Filesystem`] handed to fuser (a handle on [`MountFs`]).
pub struct VolFs(pub Arc<MountFs>);

fn name_bytes(name: &OsStr) -> Result<Vec<u8>, Errno> {
    let b = name.as_bytes();
    if b.len() > MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(b.to_vec())
}

impl VolFs {
    fn ro(&self) -> bool {
        self.0.readonly
    }

    fn entry_reply(fs: &Arc<MountFs>, r: Result<Attr, Errno>, reply: ReplyEntry) {
        match r {
            Ok(a) => {
                fs.tell(&a);
                reply.entry(&TTL, &file_attr(&a), Generation(a.generation));
            }
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        target: Vec<u8>,
        reply: ReplyEntry,
    ) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let name = match name_bytes(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let fs = self.0.clone();
        let op = FileOp::Create {
            parent: parent.0,
            name,
            mode,
            uid: req.uid(),
            gid: req.gid(),
            rdev,
            target,
            excl: true,
            open: None,
            creator: fs.creator(),
            now: now_ns(),
        };
        self.0.spawn(async move {
            let r = fs.apply_attr(op).await;
            VolFs::entry_reply(&fs, r, reply);
        });
    }
}

impl Filesystem for VolFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                debug!(parent: &self.0.span, ?missing, "kernel lacks a FUSE capability");
            }
        }
        if let Err(nearest) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_bytes(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let fs = self.0.clone();
        self.0.spawn(async move {
            let r = match fs.client.read(FileRequest::Lookup { parent: parent.0, name }).await {
                Ok(FileResponse::Attr(a)) if fs.has_dirty(a.ino) => fs.getattr_fresh(a.ino).await,
                Ok(FileResponse::Attr(a)) => Ok(a),
                Ok(FileResponse::Err(e)) => Err(errno(e)),
                Ok(_) => Err(Errno::EIO),
                Err(e) => Err(fs.fail(&e)),
            };
            VolFs::entry_reply(&fs, r, reply);
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.getattr_fresh(ino.0).await {
                Ok(a) => {
                    fs.tell(&a);
                    reply.attr(&TTL, &file_attr(&a))
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let now = now_ns();
        let t = |x: Option<TimeOrNow>| {
            x.map(|v| match v {
                TimeOrNow::Now => now,
                TimeOrNow::SpecificTime(s) => time_ns(s),
            })
        };
        let op = FileOp::SetAttr { ino: ino.0, mode, uid, gid, size, atime: t(atime), mtime: t(mtime), now };
        let fs = self.0.clone();
        self.0.spawn(async move {
            if fs.has_dirty(ino.0) {
                if let Err(e) = fs.flush_ino(ino.0).await {
                    return reply.error(e);
                }
            }
            match fs.apply_attr(op).await {
                Ok(a) => {
                    fs.tell(&a);
                    reply.attr(&TTL, &file_attr(&a))
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.client.read(FileRequest::ReadLink { ino: ino.0 }).await {
                Ok(FileResponse::Bytes(b)) => reply.data(&b),
                Ok(FileResponse::Err(e)) => reply.error(errno(e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let kind = mode & libc::S_IFMT;
        let mode = if kind == 0 { libc::S_IFREG | (mode & !umask) } else { kind | (mode & !umask & 0o7777) };
        self.create_node(req, parent, name, mode, rdev, Vec::new(), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.create_node(req, parent, name, libc::S_IFDIR | (mode & !umask & 0o7777), 0, Vec::new(), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let target = target.as_os_str().as_bytes().to_vec();
        self.create_node(req, parent, link_name, libc::S_IFLNK | 0o777, 0, target, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let (name, new_name) = match (name_bytes(name), name_bytes(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let op = FileOp::Rename {
            parent: parent.0,
            name,
            new_parent: newparent.0,
            new_name,
            flags: flags.bits(),
            now: now_ns(),
        };
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.apply_ok(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let name = match name_bytes(newname) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let op = FileOp::Link { ino: ino.0, parent: newparent.0, name, now: now_ns() };
        let fs = self.0.clone();
        self.0.spawn(async move {
            let r = fs.apply_attr(op).await;
            VolFs::entry_reply(&fs, r, reply);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & libc::O_ACCMODE;
        if self.ro() && (acc != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0) {
            reply.error(Errno::EROFS);
            return;
        }
        let fs = self.0.clone();
        let fh = self.0.fh();
        self.0.spawn(async move {
            match fs.open_handle(ino.0).await {
                Ok(_) => reply.opened(fh, FopenFlags::empty()),
                Err(e) => reply.error(e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            if fs.has_dirty(ino.0) {
                if let Err(e) = fs.flush_ino(ino.0).await {
                    return reply.error(e);
                }
            }
            match fs.client.read(FileRequest::Read { ino: ino.0, offset, len: size.min(MAX_IO) }).await {
                Ok(FileResponse::Data(d)) => reply.data(&d),
                Ok(FileResponse::Err(e)) => reply.error(errno(e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > super::layout::MAX_FILE_SIZE) {
            reply.error(Errno::EFBIG);
            return;
        }
        let len = data.len() as u32;
        let data = data.to_vec();
        let fs = self.0.clone();
        let ino = ino.0;
        self.0.spawn(async move {
            let d = fs.dirty_of(ino);
            let (full, restart) = {
                let mut st = lock(&d.st);
                if let Some(e) = st.error.take() {
                    drop(st);
                    return reply.error(errno(e));
                }
                let end = offset + data.len() as u64;
                // An overwrite of buffered bytes: the older bytes become a
                // batch of their own first (batches that overlap apply in
                // order), then the new ones are buffered.
                let overlapping = st.extents.iter().any(|(o, v)| offset < o + v.len() as u64 && *o < end);
                let restart = if overlapping { st.take_batch() } else { None };
                match st.extents.last_mut() {
                    Some((o, v)) if *o + v.len() as u64 == offset && v.len() < FLUSH_AT => v.extend_from_slice(&data),
                    _ => st.extents.push((offset, data)),
                }
                st.buffered += len as usize;
                let full = if st.buffered >= FLUSH_AT { st.take_batch() } else { None };
                (full, restart)
            };
            if let Some(b) = restart {
                fs.send(ino, &d, b).await;
            }
            if let Some(b) = full {
                fs.send(ino, &d, b).await;
            }
            reply.written(len);
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.flush_ino(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            fs.release_handle(ino.0).await;
            reply.ok();
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            if let Err(e) = fs.flush_ino(ino.0).await {
                return reply.error(e);
            }
            match fs.client.read(FileRequest::Sync).await {
                Ok(FileResponse::Done) => reply.ok(),
                Ok(FileResponse::Err(e)) => reply.error(errno(e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            let (parent, entries) = match fs.client.read(FileRequest::ReadDir { ino: ino.0, after: offset }).await {
                Ok(FileResponse::Entries { parent, entries }) => (parent, entries),
                Ok(FileResponse::Err(e)) => return reply.error(errno(e)),
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(fs.fail(&e)),
            };
            if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < 2 && reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                return reply.ok();
            }
            for e in entries {
                if reply.add(INodeNo(e.ino), e.cookie, file_type(e.kind), OsStr::from_bytes(&e.name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.client.read(FileRequest::Sync).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.client.read(FileRequest::StatFs).await {
                Ok(FileResponse::Stats(s)) => {
                    let blocks = s.size_bytes / BLOCK_SIZE;
                    let free = blocks.saturating_sub(s.used_blocks);
                    let ffree = s.max_inodes.saturating_sub(s.inodes);
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        s.max_inodes,
                        ffree,
                        BLOCK_SIZE as u32,
                        MAX_NAME as u32,
                        BLOCK_SIZE as u32,
                    )
                }
                Ok(FileResponse::Err(e)) => reply.error(errno(e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let op = FileOp::SetXattr {
            ino: ino.0,
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            flags,
            now: now_ns(),
        };
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.apply_ok(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let fs = self.0.clone();
        let name = name.as_bytes().to_vec();
        self.0.spawn(async move {
            match fs.client.read(FileRequest::GetXattr { ino: ino.0, name }).await {
                Ok(FileResponse::Bytes(v)) => xattr_reply(reply, size, &v),
                Ok(FileResponse::Err(e)) => reply.error(errno(e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.client.read(FileRequest::ListXattr { ino: ino.0 }).await {
                Ok(FileResponse::Names(names)) => {
                    let mut v = Vec::new();
                    for n in names {
                        v.extend_from_slice(&n);
                        v.push(0);
                    }
                    xattr_reply(reply, size, &v)
                }
                Ok(FileResponse::Err(e)) => reply.error(errno(e)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fs.fail(&e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let op = FileOp::RemoveXattr { ino: ino.0, name: name.as_bytes().to_vec(), now: now_ns() };
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.apply_ok(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let name = match name_bytes(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let fs = self.0.clone();
        let fh = self.0.fh();
        let op = FileOp::Create {
            parent: parent.0,
            name,
            mode: libc::S_IFREG | (mode & !umask & 0o7777),
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            target: Vec::new(),
            excl: flags & libc::O_EXCL != 0,
            open: Some(fs.session),
            creator: fs.creator(),
            now: now_ns(),
        };
        self.0.spawn(async move {
            match fs.apply_attr(op).await {
                Ok(a) => {
                    let l = fs.ino_lock(a.ino);
                    let _g = l.lock().await;
                    *lock(&fs.opens).entry(a.ino).or_insert(0) += 1;
                    if fs.tell(&a) {
                        fs.inval(a.ino);
                    }
                    reply.created(&TTL, &file_attr(&a), Generation(a.generation), fh, FopenFlags::empty())
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Space is thin: there is nothing to reserve ahead of writing.
        reply.error(Errno::EOPNOTSUPP);
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if (size as usize) < v.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}

impl VolFs {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        if self.ro() {
            reply.error(Errno::EROFS);
            return;
        }
        let name = match name_bytes(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let op = FileOp::Unlink { parent: parent.0, name, dir, now: now_ns() };
        let fs = self.0.clone();
        self.0.spawn(async move {
            match fs.apply_ok(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }
}
