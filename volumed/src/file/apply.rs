//! Applying file operations: deterministic, on every replica, inside the
//! log entry's block writer — so an entry's operations become visible
//! together with its applied index, in one RocksDB batch.
//!
//! Every operation checks everything it needs before it stages its first
//! write, so an operation that fails (an errno) leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};

use super::layout::{self, Bucket, Dentry, Inode, OpenRefs, Super, MAX_INO, MAX_NAME, MAX_RECORD, ROOT_INO};
use super::ops::{Attr, Errno, FileOp, FileResult};
use crate::storage::{decode, encode};
use crate::volume::blocks::{all_zero, ApplyError, BlockStore, EntryWriter, Stored, BS};
use crate::volume::command::BLOCK_SIZE;

const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;
const MAX_XATTR_VALUE: usize = 64 << 10;

enum Fail {
    Errno(Errno),
    Apply(ApplyError),
}

impl From<ApplyError> for Fail {
    fn from(e: ApplyError) -> Self {
        Fail::Apply(e)
    }
}

type R<T> = Result<T, Fail>;

fn err<T>(e: Errno) -> R<T> {
    Err(Fail::Errno(e))
}

/// Applies `ops` in order; one result per op.
pub fn apply(
    w: &mut EntryWriter<'_>,
    blocks: &BlockStore,
    size_bytes: u64,
    version: u64,
    ops: &[FileOp],
) -> Result<Vec<FileResult>, ApplyError> {
    let mut tx = Tx { w, blocks, touched: BTreeSet::new(), sup: None, sup_dirty: false, size_bytes, version };
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match tx.op(op) {
            Ok(r) => out.push(r),
            Err(Fail::Errno(e)) => out.push(FileResult::Err(e)),
            Err(Fail::Apply(e)) => return Err(e),
        }
    }
    if tx.sup_dirty {
        if let Some(sup) = tx.sup.take() {
            let raw = encode(&sup).map_err(ApplyError::Store)?;
            tx.w.put_block(layout::SUPER_BLOCK, Stored::Data(raw))?;
        }
    }
    Ok(out)
}

struct Tx<'w, 'a> {
    w: &'w mut EntryWriter<'a>,
    blocks: &'w BlockStore,
    /// Blocks staged by this entry (range scans merge them with the store).
    touched: BTreeSet<u64>,
    sup: Option<Super>,
    sup_dirty: bool,
    size_bytes: u64,
    version: u64,
}

fn valid_name(name: &[u8]) -> R<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return err(libc::EINVAL);
    }
    if name.len() > MAX_NAME {
        return err(libc::ENAMETOOLONG);
    }
    Ok(())
}

fn encoded<T: serde::Serialize>(v: &T) -> R<Vec<u8>> {
    encode(v).map_err(|e| Fail::Apply(ApplyError::Store(e)))
}

fn decoded<T: serde::de::DeserializeOwned>(what: &str, raw: &[u8]) -> R<T> {
    // The checksum matched, so this is a bug or a format change, not media
    // damage: refuse the operation rather than stop the replica.
    decode(what, raw).map_err(|_| Fail::Errno(libc::EIO))
}

impl Tx<'_, '_> {
    fn get(&mut self, block: u64) -> R<Option<Vec<u8>>> {
        Ok(match self.w.current(block)? {
            Stored::Zero => None,
            Stored::Data(d) => Some(d),
        })
    }

    fn put(&mut self, block: u64, value: Option<Vec<u8>>) -> R<()> {
        self.touched.insert(block);
        let content = match value {
            Some(v) => Stored::Data(v),
            None => Stored::Zero,
        };
        self.w.put_block(block, content)?;
        Ok(())
    }

    /// Blocks in `[from, to)` with content, stored or staged.
    fn present(&mut self, from: u64, to: u64) -> R<Vec<u64>> {
        let mut all: BTreeSet<u64> =
            self.blocks.present_blocks(from, to).map_err(|e| Fail::Apply(ApplyError::Store(e)))?.into_iter().collect();
        all.extend(self.touched.range(from..to).copied());
        Ok(all.into_iter().collect())
    }

    fn sup(&mut self) -> R<&mut Super> {
        if self.sup.is_none() {
            let s = match self.get(layout::SUPER_BLOCK)? {
                Some(raw) => decoded("file volume counters", &raw)?,
                None => Super::default(),
            };
            self.sup = Some(s);
        }
        self.sup_dirty = true;
        Ok(self.sup.get_or_insert_with(Super::default))
    }

    fn inode(&mut self, ino: u64) -> R<Option<Inode>> {
        if ino == 0 || ino > MAX_INO {
            return Ok(None);
        }
        match self.get(layout::inode_block(ino))? {
            Some(raw) => Ok(Some(decoded("inode", &raw)?)),
            None => Ok(None),
        }
    }

    fn must_inode(&mut self, ino: u64) -> R<Inode> {
        match self.inode(ino)? {
            Some(i) => Ok(i),
            None => err(libc::ENOENT),
        }
    }

    /// A directory that can take entries.
    fn dir(&mut self, ino: u64) -> R<Inode> {
        let d = self.must_inode(ino)?;
        if !d.is_dir() {
            return err(libc::ENOTDIR);
        }
        if d.nlink == 0 {
            return err(libc::ENOENT);
        }
        Ok(d)
    }

    fn put_inode(&mut self, ino: u64, i: &Inode) -> R<()> {
        let raw = encoded(i)?;
        if raw.len() > MAX_RECORD {
            return err(libc::ENOSPC);
        }
        self.put(layout::inode_block(ino), Some(raw))
    }

    fn bucket(&mut self, parent: u64, name: &[u8]) -> R<(u64, Bucket)> {
        let block = layout::dentry_block(parent, layout::name_hash(name));
        let b = match self.get(block)? {
            Some(raw) => decoded("directory bucket", &raw)?,
            None => Bucket::default(),
        };
        Ok((block, b))
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> R<Option<Dentry>> {
        let (_, b) = self.bucket(parent, name)?;
        Ok(b.0.into_iter().find(|d| d.name == name))
    }

    /// Adds or replaces the entry `name` of `parent`.
    fn set_entry(&mut self, parent: u64, name: &[u8], ino: u64, kind: u32) -> R<()> {
        let (block, mut b) = self.bucket(parent, name)?;
        let d = Dentry { name: name.to_vec(), ino, kind };
        match b.0.iter_mut().find(|d| d.name == name) {
            Some(slot) => *slot = d,
            None => b.0.push(d),
        }
        let raw = encoded(&b)?;
        if raw.len() > MAX_RECORD {
            // Names colliding in one 28-bit hash bucket of one directory
            // beyond what a block holds: practically never.
            return err(libc::ENOSPC);
        }
        self.put(block, Some(raw))
    }

    fn remove_entry(&mut self, parent: u64, name: &[u8]) -> R<()> {
        let (block, mut b) = self.bucket(parent, name)?;
        b.0.retain(|d| d.name != name);
        let value = if b.0.is_empty() { None } else { Some(encoded(&b)?) };
        self.put(block, value)
    }

    fn dir_empty(&mut self, dir: u64) -> R<bool> {
        let (from, to) = layout::dentry_range(dir);
        for b in self.present(from, to)? {
            if self.get(b)?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn open_refs(&mut self, ino: u64) -> R<OpenRefs> {
        match self.get(layout::open_block(ino))? {
            Some(raw) => decoded("open handles", &raw),
            None => Ok(OpenRefs::default()),
        }
    }

    fn put_open_refs(&mut self, ino: u64, refs: &OpenRefs) -> R<()> {
        let value = if refs.0.is_empty() { None } else { Some(encoded(refs)?) };
        if value.as_ref().is_some_and(|v| v.len() > MAX_RECORD) {
            return err(libc::EMFILE);
        }
        self.put(layout::open_block(ino), value)
    }

    /// Frees an inode with no links and no open handles: its data, its
    /// record, its counters.
    fn free(&mut self, ino: u64, inode: &Inode) -> R<()> {
        let (from, to) = layout::data_range(ino);
        for b in self.present(from, to)? {
            if self.get(b)?.is_some() {
                self.put(b, None)?;
            }
        }
        self.put(layout::inode_block(ino), None)?;
        if self.get(layout::open_block(ino))?.is_some() {
            self.put(layout::open_block(ino), None)?;
        }
        let blocks = inode.blocks;
        let sup = self.sup()?;
        sup.inodes = sup.inodes.saturating_sub(1);
        sup.data_blocks = sup.data_blocks.saturating_sub(blocks);
        Ok(())
    }

    /// Drops one link of `ino` (a directory loses all of them); frees it
    /// unless a mount still holds it open, which makes it an orphan until
    /// its last release.
    fn drop_link(&mut self, ino: u64, mut inode: Inode, now: i64) -> R<()> {
        inode.nlink = if inode.is_dir() { 0 } else { inode.nlink.saturating_sub(1) };
        inode.ctime = now;
        if inode.nlink > 0 {
            return self.put_inode(ino, &inode);
        }
        if self.open_refs(ino)?.0.is_empty() {
            self.free(ino, &inode)
        } else {
            self.put_inode(ino, &inode)?;
            self.sup()?.orphans += 1;
            Ok(())
        }
    }

    /// Sets the size of a regular file: blocks past the end are freed and
    /// the tail of the last block zeroed.
    fn truncate(&mut self, ino: u64, inode: &mut Inode, size: u64) -> R<()> {
        if size < inode.size {
            let before = self.w.live_delta;
            let keep = size.div_ceil(BLOCK_SIZE);
            let (_, to) = layout::data_range(ino);
            for b in self.present(layout::data_block(ino, keep), to)? {
                if self.get(b)?.is_some() {
                    self.put(b, None)?;
                }
            }
            let tail = (size % BLOCK_SIZE) as usize;
            if tail != 0 {
                let b = layout::data_block(ino, size / BLOCK_SIZE);
                if let Some(mut d) = self.get(b)? {
                    d[tail..].fill(0);
                    let v = if all_zero(&d) { None } else { Some(d) };
                    self.put(b, v)?;
                }
            }
            let delta = self.w.live_delta - before;
            inode.blocks = inode.blocks.saturating_add_signed(delta);
            let sup = self.sup()?;
            sup.data_blocks = sup.data_blocks.saturating_add_signed(delta);
        }
        inode.size = size;
        Ok(())
    }

    fn op(&mut self, op: &FileOp) -> R<FileResult> {
        match op {
            FileOp::Init { now } => self.init(*now),
            FileOp::Create { parent, name, mode, uid, gid, rdev, target, excl, open, creator, now } => {
                self.create(*parent, name, *mode, (*uid, *gid), *rdev, target, *excl, *open, *creator, *now)
            }
            FileOp::Link { ino, parent, name, now } => self.link(*ino, *parent, name, *now),
            FileOp::Unlink { parent, name, dir, now } => self.unlink(*parent, name, *dir, *now),
            FileOp::Rename { parent, name, new_parent, new_name, flags, now } => {
                self.rename(*parent, name, *new_parent, new_name, *flags, *now)
            }
            FileOp::SetAttr { ino, mode, uid, gid, size, atime, mtime, now } => {
                self.setattr(*ino, *mode, *uid, *gid, *size, *atime, *mtime, *now)
            }
            FileOp::Write { ino, offset, data, now } => self.write(*ino, *offset, data, *now),
            FileOp::SetXattr { ino, name, value, flags, now } => self.setxattr(*ino, name, value, *flags, *now),
            FileOp::RemoveXattr { ino, name, now } => {
                let mut i = self.must_inode(*ino)?;
                if i.xattrs.remove(name).is_none() {
                    return err(libc::ENODATA);
                }
                i.ctime = *now;
                self.put_inode(*ino, &i)?;
                Ok(FileResult::Ok)
            }
            FileOp::Open { ino, session } => {
                let i = self.must_inode(*ino)?;
                let mut refs = self.open_refs(*ino)?;
                if refs.0.insert(*session) {
                    self.put_open_refs(*ino, &refs)?;
                }
                Ok(FileResult::Attr(Attr::of(*ino, &i)))
            }
            FileOp::Release { ino, session } => {
                let mut refs = self.open_refs(*ino)?;
                if refs.0.remove(session) {
                    self.put_open_refs(*ino, &refs)?;
                    self.release_if_orphan(*ino, &refs)?;
                }
                Ok(FileResult::Ok)
            }
            FileOp::EndSession { session } => {
                let (from, to) = layout::open_range();
                for b in self.present(from, to)? {
                    let Some(raw) = self.get(b)? else { continue };
                    let mut refs: OpenRefs = decoded("open handles", &raw)?;
                    if refs.0.remove(session) {
                        let ino = layout::ino_of_open_block(b);
                        self.put_open_refs(ino, &refs)?;
                        self.release_if_orphan(ino, &refs)?;
                    }
                }
                Ok(FileResult::Ok)
            }
        }
    }

    fn release_if_orphan(&mut self, ino: u64, refs: &OpenRefs) -> R<()> {
        if !refs.0.is_empty() {
            return Ok(());
        }
        if let Some(i) = self.inode(ino)? {
            if i.nlink == 0 {
                self.free(ino, &i)?;
                let sup = self.sup()?;
                sup.orphans = sup.orphans.saturating_sub(1);
            }
        }
        Ok(())
    }

    fn init(&mut self, now: i64) -> R<FileResult> {
        if let Some(root) = self.inode(ROOT_INO)? {
            return Ok(FileResult::Attr(Attr::of(ROOT_INO, &root)));
        }
        let root = Inode {
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            parent: ROOT_INO,
            atime: now,
            mtime: now,
            ctime: now,
            generation: self.version,
            ..Inode::default()
        };
        self.put_inode(ROOT_INO, &root)?;
        self.sup()?.inodes += 1;
        Ok(FileResult::Attr(Attr::of(ROOT_INO, &root)))
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        (uid, gid): (u32, u32),
        rdev: u32,
        target: &[u8],
        excl: bool,
        open: Option<u64>,
        creator: (u64, u64),
        now: i64,
    ) -> R<FileResult> {
        valid_name(name)?;
        let mut dir = self.dir(parent)?;
        let kind = mode & libc::S_IFMT;
        if let Some(d) = self.lookup(parent, name)? {
            let existing = self.must_inode(d.ino)?;
            let retried = creator != (0, 0) && existing.creator == creator;
            let reopen = !excl && kind == libc::S_IFREG && existing.is_reg();
            if !(retried || reopen) {
                return err(libc::EEXIST);
            }
            if let Some(session) = open {
                let mut refs = self.open_refs(d.ino)?;
                if refs.0.insert(session) {
                    self.put_open_refs(d.ino, &refs)?;
                }
            }
            return Ok(FileResult::Attr(Attr::of(d.ino, &existing)));
        }
        if kind == libc::S_IFLNK && (target.is_empty() || target.len() >= 4096) {
            return err(if target.is_empty() { libc::ENOENT } else { libc::ENAMETOOLONG });
        }
        if kind == libc::S_IFDIR && dir.nlink == u32::MAX {
            return err(libc::EMLINK);
        }
        let limit = layout::max_inodes(self.size_bytes);
        let sup = self.sup()?;
        if sup.inodes >= limit || sup.next_ino > MAX_INO {
            return err(libc::ENOSPC);
        }
        let ino = sup.next_ino;
        let mut perm = mode & 0o7777;
        let mut gid = gid;
        if dir.mode & libc::S_ISGID != 0 {
            gid = dir.gid;
            if kind == libc::S_IFDIR {
                perm |= libc::S_ISGID;
            }
        }
        let inode = Inode {
            mode: kind | perm,
            uid,
            gid,
            nlink: if kind == libc::S_IFDIR { 2 } else { 1 },
            size: if kind == libc::S_IFLNK { target.len() as u64 } else { 0 },
            rdev,
            atime: now,
            mtime: now,
            ctime: now,
            parent,
            blocks: 0,
            target: if kind == libc::S_IFLNK { target.to_vec() } else { Vec::new() },
            xattrs: BTreeMap::new(),
            creator,
            generation: self.version,
        };
        if encoded(&inode)?.len() > MAX_RECORD {
            return err(libc::ENAMETOOLONG);
        }
        self.set_entry(parent, name, ino, kind)?;
        self.put_inode(ino, &inode)?;
        if kind == libc::S_IFDIR {
            dir.nlink += 1;
        }
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(parent, &dir)?;
        let sup = self.sup()?;
        sup.next_ino += 1;
        sup.inodes += 1;
        if let Some(session) = open {
            let mut refs = OpenRefs::default();
            refs.0.insert(session);
            self.put_open_refs(ino, &refs)?;
        }
        Ok(FileResult::Attr(Attr::of(ino, &inode)))
    }

    fn link(&mut self, ino: u64, parent: u64, name: &[u8], now: i64) -> R<FileResult> {
        valid_name(name)?;
        let mut i = self.must_inode(ino)?;
        if i.is_dir() {
            return err(libc::EPERM);
        }
        let mut dir = self.dir(parent)?;
        if let Some(d) = self.lookup(parent, name)? {
            // A retried link finds itself done.
            return if d.ino == ino { Ok(FileResult::Attr(Attr::of(ino, &i))) } else { err(libc::EEXIST) };
        }
        if i.nlink == 0 {
            return err(libc::ENOENT);
        }
        if i.nlink == u32::MAX {
            return err(libc::EMLINK);
        }
        self.set_entry(parent, name, ino, i.file_type())?;
        i.nlink += 1;
        i.ctime = now;
        self.put_inode(ino, &i)?;
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(parent, &dir)?;
        Ok(FileResult::Attr(Attr::of(ino, &i)))
    }

    fn unlink(&mut self, parent: u64, name: &[u8], rmdir: bool, now: i64) -> R<FileResult> {
        valid_name(name)?;
        let mut dir = self.dir(parent)?;
        let Some(d) = self.lookup(parent, name)? else { return err(libc::ENOENT) };
        let child = self.inode(d.ino)?;
        if let Some(c) = &child {
            if rmdir && !c.is_dir() {
                return err(libc::ENOTDIR);
            }
            if !rmdir && c.is_dir() {
                return err(libc::EISDIR);
            }
            if c.is_dir() && !self.dir_empty(d.ino)? {
                return err(libc::ENOTEMPTY);
            }
        }
        self.remove_entry(parent, name)?;
        if child.as_ref().is_some_and(|c| c.is_dir()) {
            dir.nlink = dir.nlink.saturating_sub(1);
        }
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(parent, &dir)?;
        if let Some(c) = child {
            self.drop_link(d.ino, c, now)?;
        }
        Ok(FileResult::Ok)
    }

    /// Whether `dir` is `ancestor` or below it.
    fn is_within(&mut self, mut dir: u64, ancestor: u64) -> R<bool> {
        for _ in 0..4096 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.must_inode(dir)?.parent;
        }
        err(libc::ELOOP)
    }

    fn rename(&mut self, parent: u64, name: &[u8], np: u64, nn: &[u8], flags: u32, now: i64) -> R<FileResult> {
        valid_name(name)?;
        valid_name(nn)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags & (RENAME_NOREPLACE | RENAME_EXCHANGE) == (RENAME_NOREPLACE | RENAME_EXCHANGE)
        {
            return err(libc::EINVAL);
        }
        let mut dirs: BTreeMap<u64, Inode> = BTreeMap::new();
        dirs.insert(parent, self.dir(parent)?);
        if np != parent {
            dirs.insert(np, self.dir(np)?);
        }
        let Some(src) = self.lookup(parent, name)? else { return err(libc::ENOENT) };
        let dst = self.lookup(np, nn)?;
        let exchange = flags & RENAME_EXCHANGE != 0;
        match (&dst, exchange) {
            (None, true) => return err(libc::ENOENT),
            (Some(_), false) if flags & RENAME_NOREPLACE != 0 => return err(libc::EEXIST),
            _ => {}
        }
        if dst.as_ref().is_some_and(|d| d.ino == src.ino) {
            return Ok(FileResult::Ok);
        }
        let mut src_i = self.must_inode(src.ino)?;
        if src_i.is_dir() && np != parent && self.is_within(np, src.ino)? {
            return err(libc::EINVAL);
        }
        let dst_i = match &dst {
            Some(d) => Some(self.must_inode(d.ino)?),
            None => None,
        };
        if let (Some(d), Some(di)) = (&dst, &dst_i) {
            if exchange {
                if di.is_dir() && np != parent && self.is_within(parent, d.ino)? {
                    return err(libc::EINVAL);
                }
            } else if src_i.is_dir() && !di.is_dir() {
                return err(libc::ENOTDIR);
            } else if !src_i.is_dir() && di.is_dir() {
                return err(libc::EISDIR);
            } else if di.is_dir() && !self.dir_empty(d.ino)? {
                return err(libc::ENOTEMPTY);
            }
        }
        let moves_dir = |i: &Inode| i.is_dir() && np != parent;
        if exchange {
            let (Some(d), Some(mut di)) = (dst, dst_i) else { return err(libc::ENOENT) };
            self.set_entry(parent, name, d.ino, d.kind)?;
            self.set_entry(np, nn, src.ino, src.kind)?;
            if moves_dir(&src_i) {
                src_i.parent = np;
                adjust(&mut dirs, parent, -1);
                adjust(&mut dirs, np, 1);
            }
            if moves_dir(&di) {
                di.parent = parent;
                adjust(&mut dirs, np, -1);
                adjust(&mut dirs, parent, 1);
            }
            di.ctime = now;
            self.put_inode(d.ino, &di)?;
        } else {
            self.remove_entry(parent, name)?;
            self.set_entry(np, nn, src.ino, src.kind)?;
            if let (Some(d), Some(di)) = (dst, dst_i) {
                if di.is_dir() {
                    adjust(&mut dirs, np, -1);
                }
                self.drop_link(d.ino, di, now)?;
            }
            if moves_dir(&src_i) {
                src_i.parent = np;
                adjust(&mut dirs, parent, -1);
                adjust(&mut dirs, np, 1);
            }
        }
        src_i.ctime = now;
        self.put_inode(src.ino, &src_i)?;
        for (ino, mut d) in dirs {
            d.mtime = now;
            d.ctime = now;
            self.put_inode(ino, &d)?;
        }
        Ok(FileResult::Ok)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<i64>,
        mtime: Option<i64>,
        now: i64,
    ) -> R<FileResult> {
        let mut i = self.must_inode(ino)?;
        if let Some(s) = size {
            if i.is_dir() {
                return err(libc::EISDIR);
            }
            if !i.is_reg() {
                return err(libc::EINVAL);
            }
            if s > layout::MAX_FILE_SIZE {
                return err(libc::EFBIG);
            }
        }
        if uid.is_some() || gid.is_some() {
            if let Some(u) = uid {
                i.uid = u;
            }
            if let Some(g) = gid {
                i.gid = g;
            }
            // As Linux does on chown: set-user-ID goes, and set-group-ID
            // too where it means "run as the group".
            if !i.is_dir() {
                i.mode &= !libc::S_ISUID;
                if i.mode & libc::S_IXGRP != 0 {
                    i.mode &= !libc::S_ISGID;
                }
            }
        }
        if let Some(m) = mode {
            i.mode = i.file_type() | (m & 0o7777);
        }
        if let Some(s) = size {
            if s != i.size {
                self.truncate(ino, &mut i, s)?;
                i.mtime = now;
            }
        }
        if let Some(a) = atime {
            i.atime = a;
        }
        if let Some(m) = mtime {
            i.mtime = m;
        }
        i.ctime = now;
        self.put_inode(ino, &i)?;
        Ok(FileResult::Attr(Attr::of(ino, &i)))
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8], now: i64) -> R<FileResult> {
        let mut i = self.must_inode(ino)?;
        if i.is_dir() {
            return err(libc::EISDIR);
        }
        if !i.is_reg() {
            return err(libc::EINVAL);
        }
        let Some(end) = offset.checked_add(data.len() as u64).filter(|e| *e <= layout::MAX_FILE_SIZE) else {
            return err(libc::EFBIG);
        };
        if data.is_empty() {
            return Ok(FileResult::Attr(Attr::of(ino, &i)));
        }
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let limit = self.size_bytes / BLOCK_SIZE;
        let used = self.sup()?.data_blocks;
        if used + (last - first + 1) > limit {
            // Near the quota: count exactly the blocks this write adds.
            let mut added = 0;
            for idx in first..=last {
                if self.get(layout::data_block(ino, idx))?.is_none() {
                    added += 1;
                }
            }
            if used + added > limit {
                return err(libc::ENOSPC);
            }
        }
        let before = self.w.live_delta;
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let idx = abs / BLOCK_SIZE;
            let at = (abs % BLOCK_SIZE) as usize;
            let n = (BS - at).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            let block = layout::data_block(ino, idx);
            let content = if n == BS {
                chunk.to_vec()
            } else {
                let mut buf = self.get(block)?.unwrap_or_else(|| vec![0u8; BS]);
                buf.resize(BS, 0);
                buf[at..at + n].copy_from_slice(chunk);
                buf
            };
            let value = if all_zero(&content) { None } else { Some(content) };
            self.put(block, value)?;
            pos += n;
        }
        let delta = self.w.live_delta - before;
        i.blocks = i.blocks.saturating_add_signed(delta);
        i.size = i.size.max(end);
        i.mtime = now;
        i.ctime = now;
        let sup = self.sup()?;
        sup.data_blocks = sup.data_blocks.saturating_add_signed(delta);
        self.put_inode(ino, &i)?;
        Ok(FileResult::Attr(Attr::of(ino, &i)))
    }

    fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32, now: i64) -> R<FileResult> {
        let mut i = self.must_inode(ino)?;
        if name.is_empty() || name.len() > MAX_NAME {
            return err(libc::ERANGE);
        }
        if value.len() > MAX_XATTR_VALUE {
            return err(libc::E2BIG);
        }
        let exists = i.xattrs.contains_key(name);
        if flags & XATTR_CREATE != 0 && exists {
            return err(libc::EEXIST);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return err(libc::ENODATA);
        }
        i.xattrs.insert(name.to_vec(), value.to_vec());
        i.ctime = now;
        self.put_inode(ino, &i)?;
        Ok(FileResult::Ok)
    }
}

fn adjust(dirs: &mut BTreeMap<u64, Inode>, ino: u64, by: i64) {
    if let Some(d) = dirs.get_mut(&ino) {
        d.nlink = (d.nlink as i64 + by).max(0) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::keys::GroupId;
    use crate::storage::Store;
    use crate::volume::blocks::Pins;

    struct Fs {
        _dir: tempfile::TempDir,
        blocks: BlockStore,
        index: u64,
        size: u64,
    }

    impl Fs {
        fn new(size: u64) -> Fs {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let mut fs =
                Fs { _dir: dir, blocks: BlockStore::new(store, GroupId(uuid::Uuid::new_v4())), index: 0, size };
            assert!(matches!(fs.run(vec![FileOp::Init { now: 1 }])[0], FileResult::Attr(_)));
            fs
        }

        /// Applies one entry, as the state machine does.
        fn run(&mut self, ops: Vec<FileOp>) -> Vec<FileResult> {
            self.index += 1;
            let pins = Pins::new();
            let mut w = EntryWriter::new(&self.blocks, self.index, &pins);
            let r = apply(&mut w, &self.blocks, self.size, self.index, &ops).unwrap();
            self.blocks.store().write(w.into_batch()).unwrap();
            r
        }

        fn one(&mut self, op: FileOp) -> FileResult {
            self.run(vec![op]).remove(0)
        }

        fn create(&mut self, parent: u64, name: &str, mode: u32) -> Result<Attr, Errno> {
            let op = FileOp::Create {
                parent,
                name: name.into(),
                mode,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: Vec::new(),
                excl: true,
                open: None,
                creator: (0, 0),
                now: 5,
            };
            match self.one(op) {
                FileResult::Attr(a) => Ok(a),
                FileResult::Err(e) => Err(e),
                FileResult::Ok => panic!("create answered no attributes"),
            }
        }

        fn sup(&self) -> Super {
            match self.blocks.read_at(layout::SUPER_BLOCK, u64::MAX).unwrap() {
                Some((_, Stored::Data(d))) => decode("super", &d).unwrap(),
                _ => Super::default(),
            }
        }

        fn data_versions(&self, ino: u64) -> usize {
            let (s, e) = layout::data_range(ino);
            self.blocks.present_blocks(s, e).unwrap().len()
        }
    }

    const REG: u32 = libc::S_IFREG | 0o644;
    const DIR: u32 = libc::S_IFDIR | 0o755;

    #[test]
    fn rename_is_one_atomic_step_with_posix_errors() {
        let mut fs = Fs::new(64 << 20);
        fs.create(ROOT_INO, "d", DIR).unwrap();
        let e = fs.create(ROOT_INO, "e", DIR).unwrap();
        fs.create(e.ino, "x", REG).unwrap();
        fs.create(ROOT_INO, "f", REG).unwrap();
        assert_eq!(fs.create(ROOT_INO, "f", REG), Err(libc::EEXIST));
        let rename = |p: u64, n: &str, np: u64, nn: &str| FileOp::Rename {
            parent: p,
            name: n.into(),
            new_parent: np,
            new_name: nn.into(),
            flags: 0,
            now: 9,
        };
        assert_eq!(fs.one(rename(ROOT_INO, "d", ROOT_INO, "e")), FileResult::Err(libc::ENOTEMPTY));
        assert_eq!(fs.one(rename(ROOT_INO, "f", ROOT_INO, "d")), FileResult::Err(libc::EISDIR));
        assert_eq!(fs.one(rename(ROOT_INO, "d", ROOT_INO, "f")), FileResult::Err(libc::ENOTDIR));
        assert_eq!(fs.one(rename(ROOT_INO, "e", e.ino, "inside")), FileResult::Err(libc::EINVAL));
        // A directory moves: link counts of both parents follow.
        assert_eq!(fs.one(rename(ROOT_INO, "d", e.ino, "d2")), FileResult::Ok);
        let root = Attr::of(
            ROOT_INO,
            &decode::<Inode>(
                "i",
                &match fs.blocks.read_at(layout::inode_block(ROOT_INO), u64::MAX).unwrap() {
                    Some((_, Stored::Data(v))) => v,
                    _ => panic!("root"),
                },
            )
            .unwrap(),
        );
        assert_eq!(root.nlink, 3, "root holds e only (plus . and ..)");
        // Failed ops in the same entry as good ones leave only the good ones.
        let r = fs.run(vec![rename(ROOT_INO, "missing", ROOT_INO, "y"), rename(ROOT_INO, "f", ROOT_INO, "g")]);
        assert_eq!(r, vec![FileResult::Err(libc::ENOENT), FileResult::Ok]);
        assert_eq!(fs.create(ROOT_INO, "g", REG), Err(libc::EEXIST));
    }

    #[test]
    fn quota_sparse_truncate_and_orphans() {
        let mut fs = Fs::new(1 << 20); // 256 blocks
        let f = fs.create(ROOT_INO, "f", REG).unwrap();
        let w = |ino, offset, len: usize, byte| FileOp::Write { ino, offset, data: vec![byte; len].into(), now: 7 };
        // Zeros take no space; a hole neither.
        assert!(matches!(fs.one(w(f.ino, 0, 64 << 10, 0)), FileResult::Attr(_)));
        assert_eq!(fs.sup().data_blocks, 0);
        assert!(matches!(fs.one(w(f.ino, 10 << 20, 4096, 1)), FileResult::Attr(_)));
        assert_eq!(fs.sup().data_blocks, 1);
        // 255 more blocks fit exactly; one more does not.
        assert!(matches!(fs.one(w(f.ino, 0, 255 * 4096, 2)), FileResult::Attr(_)));
        assert_eq!(fs.one(w(f.ino, 300 * 4096, 4096, 3)), FileResult::Err(libc::ENOSPC));
        // Rewriting allocated blocks is fine when full.
        assert!(matches!(fs.one(w(f.ino, 4096, 4096, 4)), FileResult::Attr(_)));
        // Truncate frees the blocks and zeroes the tail of the last one.
        let t = FileOp::SetAttr {
            ino: f.ino,
            mode: None,
            uid: None,
            gid: None,
            size: Some(100),
            atime: None,
            mtime: None,
            now: 8,
        };
        assert!(matches!(fs.one(t), FileResult::Attr(a) if a.size == 100 && a.blocks == 1));
        assert_eq!(fs.sup().data_blocks, 1);
        // Unlinked while open by session 9: kept until released.
        assert!(matches!(fs.one(FileOp::Open { ino: f.ino, session: 9 }), FileResult::Attr(_)));
        let unlink = FileOp::Unlink { parent: ROOT_INO, name: "f".into(), dir: false, now: 9 };
        assert_eq!(fs.one(unlink), FileResult::Ok);
        assert_eq!((fs.sup().orphans, fs.sup().inodes, fs.data_versions(f.ino)), (1, 2, 1));
        assert_eq!(fs.one(FileOp::EndSession { session: 9 }), FileResult::Ok);
        assert_eq!((fs.sup().orphans, fs.sup().inodes, fs.sup().data_blocks), (0, 1, 0));
        assert_eq!(fs.data_versions(f.ino), 0, "the orphan's data is gone");
    }

    #[test]
    fn retried_create_finds_its_own_inode_and_links_count() {
        let mut fs = Fs::new(64 << 20);
        let op = FileOp::Create {
            parent: ROOT_INO,
            name: b"a".to_vec(),
            mode: REG,
            uid: 1,
            gid: 2,
            rdev: 0,
            target: Vec::new(),
            excl: true,
            open: Some(4),
            creator: (4, 17),
            now: 3,
        };
        let first = fs.one(op.clone());
        assert_eq!(fs.one(op), first, "the retry answers the same inode");
        let FileResult::Attr(a) = first else { panic!("{first:?}") };
        let link = FileOp::Link { ino: a.ino, parent: ROOT_INO, name: b"b".to_vec(), now: 4 };
        assert!(matches!(fs.one(link.clone()), FileResult::Attr(x) if x.nlink == 2));
        assert!(matches!(fs.one(link), FileResult::Attr(x) if x.nlink == 2), "a retried link is idempotent");
        let x = FileOp::SetXattr { ino: a.ino, name: b"user.k".to_vec(), value: vec![1; 5000], flags: 0, now: 5 };
        assert_eq!(fs.one(x), FileResult::Err(libc::ENOSPC), "xattrs must fit the inode record");
        let x = FileOp::SetXattr {
            ino: a.ino,
            name: b"user.k".to_vec(),
            value: vec![1; 100],
            flags: XATTR_REPLACE,
            now: 5,
        };
        assert_eq!(fs.one(x), FileResult::Err(libc::ENODATA));
    }
}
