//! The FUSE filesystem that exposes one volume as one regular file, `disk`.
//!
//! Session threads only decode requests; every data request is handed to
//! a tokio task that calls the [`BlockDevice`] and replies when it
//! completes, so the loop driver's parallel direct-I/O requests are all in
//! flight at once.

use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, WriteFlags,
};
use volumed_nbd::{BlockDevice, BlockError};

use crate::error::block_error_errno;

pub(crate) const ROOT_INO: u64 = 1;
pub(crate) const DISK_INO: u64 = 2;
pub(crate) const DISK_NAME: &str = "disk";

/// Largest single read/write the kernel sends us. 1 MiB keeps sequential
/// I/O in big requests (the kernel's default limit is 256 pages).
pub(crate) const MAX_IO: u32 = 1 << 20;
/// How many async requests (direct I/O from the loop driver) the kernel
/// keeps in flight to us.
const MAX_BACKGROUND: u16 = 128;

// Attributes are never cached: the size changes on resize, and the loop
// driver reads it from the inode at LOOP_SET_CAPACITY.
const TTL: Duration = Duration::ZERO;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
/// Linux 6.17+: zero the range and keep it allocated.
const FALLOC_FL_WRITE_ZEROES: i32 = 0x80;

pub(crate) struct DiskFs {
    device: Arc<dyn BlockDevice>,
    /// The size the file shows: the device's size at attach, raised by
    /// resize. Kept apart from `device.size()` so the block device above
    /// changes size only when the daemon says so.
    size: Arc<AtomicU64>,
    read_only: bool,
    block_size: u32,
    rt: tokio::runtime::Handle,
    span: tracing::Span,
    created: SystemTime,
}

impl DiskFs {
    pub(crate) fn new(
        device: Arc<dyn BlockDevice>,
        size: Arc<AtomicU64>,
        read_only: bool,
        rt: tokio::runtime::Handle,
        span: tracing::Span,
    ) -> Self {
        let block_size = device.block_size().max(512);
        DiskFs { device, size, read_only, block_size, rt, span, created: SystemTime::now() }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            ROOT_INO => (FileType::Directory, 0o700, 2, 0),
            DISK_INO => (
                FileType::RegularFile,
                if self.read_only { 0o400 } else { 0o600 },
                1,
                self.size.load(Ordering::Acquire),
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            // Report the file as fully allocated: it is a device, and a
            // sparse-looking file invites tools to skip "holes".
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.block_size,
            flags: 0,
        })
    }

    /// Checks a data request against the exposed size.
    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size.load(Ordering::Acquire))
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Async direct I/O lets the kernel send the loop driver's
        // concurrent requests without waiting for each one.
        for cap in [InitFlags::FUSE_ASYNC_DIO, InitFlags::FUSE_MAX_PAGES] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::warn!(parent: &self.span, ?missing, "kernel lacks a FUSE capability; I/O will be slower");
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
        if parent.0 == ROOT_INO && name == DISK_NAME {
            if let Some(attr) = self.attr(DISK_INO) {
                reply.entry(&TTL, &attr, Generation(0));
                return;
            }
        }
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        // The file is the volume: its size changes only through resize.
        // Mode, owner and time changes are accepted and ignored so that
        // tools which touch them (cp --preserve, touch) do not fail.
        match size {
            Some(s) if s != attr.size => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if self.read_only && acc != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        if flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EPERM);
            return;
        }
        // No page cache on the FUSE side (the loop device and the
        // filesystem above it have their own), and direct writes may run in
        // parallel: the device orders nothing between them.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    #[allow(clippy::too_many_arguments)]
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
        if ino.0 != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let end = self.size.load(Ordering::Acquire);
        if offset >= end || size == 0 {
            reply.data(&[]);
            return;
        }
        // Reads past the end are short, like any file.
        let len = (size as u64).min(end - offset) as u32;
        let device = self.device.clone();
        let span = self.span.clone();
        self.rt.spawn(async move {
            match device.read(offset, len).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    let errno = block_error_errno(&e);
                    tracing::warn!(parent: &span, offset, len, error = %e, errno, "read failed");
                    reply.error(Errno::from_i32(errno));
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
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
        if ino.0 != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        let Ok(len) = u32::try_from(data.len()) else {
            reply.error(Errno::EINVAL);
            return;
        };
        // The file cannot grow by writing: that would be a resize.
        if !self.in_range(offset, len as u64) {
            reply.error(Errno::EFBIG);
            return;
        }
        let data = Bytes::copy_from_slice(data);
        let device = self.device.clone();
        let span = self.span.clone();
        self.rt.spawn(async move {
            match device.write(offset, data, false).await {
                Ok(()) => reply.written(len),
                Err(e) => {
                    let errno = block_error_errno(&e);
                    tracing::warn!(parent: &span, offset, len, error = %e, errno, "write failed");
                    reply.error(Errno::from_i32(errno));
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() is not a durability point; fsync is.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The loop driver turns a block-layer flush (an fsync or a FUA
        // write in the filesystem above) into fsync on this file.
        let device = self.device.clone();
        let span = self.span.clone();
        self.rt.spawn(async move {
            match device.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    let errno = block_error_errno(&e);
                    tracing::warn!(parent: &span, error = %e, errno, "flush failed");
                    reply.error(Errno::from_i32(errno));
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if !self.in_range(offset, length) {
            reply.error(Errno::EFBIG);
            return;
        }
        let op = mode & !FALLOC_FL_KEEP_SIZE;
        if op == 0 {
            // Preallocation inside the device: nothing to do, the volume
            // has its size already.
            reply.ok();
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        let device = self.device.clone();
        let span = self.span.clone();
        let fut = match op {
            // Discard (the loop driver's REQ_OP_DISCARD, or REQ_OP_WRITE_ZEROES
            // that may unmap).
            FALLOC_FL_PUNCH_HOLE => device.clone().trim_owned(offset, length),
            // Zeroes that must stay allocated (REQ_NOUNMAP).
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_WRITE_ZEROES => device.clone().write_zeroes_owned(offset, length),
            _ => {
                reply.error(Errno::EOPNOTSUPP);
                return;
            }
        };
        self.rt.spawn(async move {
            match fut.await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    let errno = block_error_errno(&e);
                    tracing::warn!(parent: &span, offset, length, mode, error = %e, errno, "fallocate failed");
                    reply.error(Errno::from_i32(errno));
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT_INO {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT_INO {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The loop driver takes its discard granularity from f_bsize.
        let bsize = self.block_size;
        let blocks = self.size.load(Ordering::Acquire) / bsize as u64;
        reply.statfs(blocks, 0, 0, 2, 0, bsize, 255, bsize);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if self.attr(ino.0).is_none() {
            reply.error(Errno::ENOENT);
        } else if self.read_only && ino.0 == DISK_INO && mask.contains(fuser::AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }
}

/// Owned futures for the fallocate paths, so the spawned task does not
/// borrow the filesystem.
trait OwnedOps {
    fn trim_owned(self, offset: u64, len: u64) -> futures::future::BoxFuture<'static, Result<(), BlockError>>;
    fn write_zeroes_owned(self, offset: u64, len: u64) -> futures::future::BoxFuture<'static, Result<(), BlockError>>;
}

impl OwnedOps for Arc<dyn BlockDevice> {
    fn trim_owned(self, offset: u64, len: u64) -> futures::future::BoxFuture<'static, Result<(), BlockError>> {
        Box::pin(async move { self.trim(offset, len, false).await })
    }

    fn write_zeroes_owned(self, offset: u64, len: u64) -> futures::future::BoxFuture<'static, Result<(), BlockError>> {
        Box::pin(async move { self.write_zeroes(offset, len, false, false).await })
    }
}
