//! Block data of one volume replica in RocksDB: versioned, checksummed,
//! thin.
//!
//! Every block write creates the key `group ‖ block ‖ !version`, where
//! `version` is the Raft log index of the command. The newest version is
//! what the volume reads; "the newest version at or below S" is what a
//! snapshot taken at index S reads — so taking a snapshot copies nothing.
//! An older version is kept only while a *pin* needs it: a pin is an index
//! S (a user snapshot, the Raft snapshot being served to a new replica)
//! and version `v` with next-newer version `n` is needed iff some pin lies
//! in `[v, n)`. The chain of a block is re-examined every time the block is
//! written, so garbage is collected on the write path with no background
//! scan; [`BlockStore::sweep_chunk`] cleans up after a pin is released.
//!
//! A value is `crc32 ‖ 4096 bytes`, or empty for an explicit zero block
//! (needed only when an older, pinned version must be hidden). An absent
//! block reads as zeros.
//!
//! The `heads` column family records each block's newest version and
//! whether it is a zero marker, written in the same batch as the block
//! (see [`EntryWriter::put_value`], [`BlockStore::sweep_chunk`]). A write
//! with no pins to honour needs nothing else to know what it replaces: a
//! seek in `blocks` would load the 4 KiB value it lands on, and did so for
//! every block written (a quarter of a leader's CPU under random writes).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use rocksdb::{DBRawIterator, Direction, IteratorMode, ReadOptions, WriteBatch};

use super::command::BLOCK_SIZE;
use super::space::{collect_chain, SpaceDelta};
use crate::storage::keys::{self, GroupId, SmTag, CF_BLOCKS, CF_HEADS, CF_SM};
use crate::storage::{Store, StoreError};

pub const BS: usize = BLOCK_SIZE as usize;

/// Reads of at least this many blocks (128 KiB: the kernel's default
/// readahead window, so sequential scans) bypass the block cache. With one
/// 4 KiB value per SST data block, caching a scan costs an insert and an
/// eviction per block and the destruction of the evicted one — 12% of a
/// leader's CPU under 1 MiB sequential reads — and pushes out the small random
/// reads' working set; the scanned SST pages stay in the page cache.
const SCAN_BLOCKS: u64 = 32;

/// Stored form of one block version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Zero,
    Data(Vec<u8>),
}

impl Stored {
    pub fn is_zero(&self) -> bool {
        matches!(self, Stored::Zero)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored checksum does not match: the caller repairs it.
    #[error("checksum mismatch in block {block} version {version}")]
    Checksum { block: u64, version: u64 },
}

pub fn encode_value(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + data.len());
    v.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// Decodes and verifies a stored value.
pub fn decode_value(raw: &[u8]) -> Option<Stored> {
    if raw.is_empty() {
        return Some(Stored::Zero);
    }
    verified_data(raw).map(|data| Stored::Data(data.to_vec()))
}

/// The data of a non-empty stored value, if its checksum holds.
fn verified_data(raw: &[u8]) -> Option<&[u8]> {
    // Block data is exactly one block; file-volume records (see
    // `crate::file::layout`) are shorter values under the same checksum.
    if raw.len() < 4 || raw.len() > 4 + BS {
        return None;
    }
    let (crc, data) = raw.split_at(4);
    let crc = u32::from_le_bytes(crc.try_into().ok()?);
    (crc32fast::hash(data) == crc).then_some(data)
}

pub fn all_zero(data: &[u8]) -> bool {
    // Word-at-a-time; this runs on every written block.
    let mut words = data.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

/// A `heads` value: the newest version and whether it is a zero marker.
fn encode_head(version: u64, zero: bool) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[..8].copy_from_slice(&version.to_be_bytes());
    v[8] = zero as u8;
    v
}

fn decode_head(raw: &[u8]) -> Option<(u64, bool)> {
    let version = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    match raw.get(8..) {
        Some([0]) => Some((version, false)),
        Some([1]) => Some((version, true)),
        _ => None,
    }
}

/// Stages the `heads` record of `block` for the chain it now has.
fn stage_head(batch: &mut WriteBatch, cf: &rocksdb::ColumnFamily, group: GroupId, block: u64, chain: &[(u64, bool)]) {
    match chain.first() {
        Some((version, zero)) => batch.put_cf(cf, keys::head_key(group, block), encode_head(*version, *zero)),
        None => batch.delete_cf(cf, keys::head_key(group, block)),
    }
}

/// Sorted set of pinned indexes.
pub type Pins = BTreeSet<u64>;

fn pinned(pins: &Pins, version: u64, newer: u64) -> bool {
    pins.range(version..newer).next().is_some()
}

/// Access to one volume's blocks.
#[derive(Clone)]
pub struct BlockStore {
    store: Arc<Store>,
    group: GroupId,
}

impl BlockStore {
    pub fn new(store: Arc<Store>, group: GroupId) -> Self {
        BlockStore { store, group }
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn prefix_read_opts(&self, block: u64) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_prefix_same_as_start(true);
        ro.set_iterate_upper_bound(keys::block_prefix(self.group, block + 1));
        ro
    }

    /// An iterator over `block`'s versions, positioned at `start`.
    fn block_cursor(&self, block: u64, start: &[u8]) -> Result<DBRawIterator<'_>, StoreError> {
        let mut it = self.store.db().raw_iterator_cf_opt(self.store.cf(CF_BLOCKS)?, self.prefix_read_opts(block));
        it.seek(start);
        Ok(it)
    }

    /// The newest stored version of `block` and whether it is a zero
    /// marker, from the `heads` index.
    pub fn head(&self, block: u64) -> Result<Option<(u64, bool)>, StoreError> {
        let cf = self.store.cf(CF_HEADS)?;
        match self.store.db().get_pinned_cf(&cf, keys::head_key(self.group, block))? {
            None => Ok(None),
            Some(raw) => decode_head(&raw).map(Some).ok_or_else(|| StoreError::Corrupt {
                what: format!("head of block {block} of volume {}", self.group),
                detail: format!("{} bytes", raw.len()),
            }),
        }
    }

    /// Whether the `heads` index of this volume was built (it is kept up
    /// to date from then on).
    pub fn heads_built(&self) -> Result<bool, StoreError> {
        let cf = self.store.cf(CF_SM)?;
        Ok(self.store.db().get_pinned_cf(&cf, keys::sm_key(self.group, SmTag::HeadsBuilt))?.is_some())
    }

    /// Rewrites the `heads` index of this volume from its blocks: for data
    /// directories from before the index, and after a snapshot install
    /// replaced every block. Written through the WAL like the install
    /// itself; the blocks it describes are already stored.
    pub fn rebuild_heads(&self) -> Result<u64, StoreError> {
        let heads_cf = self.store.cf(CF_HEADS)?;
        let (start, end) = keys::group_range(self.group);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&heads_cf, &start, &end);
        let (mut heads, mut failed) = (0u64, None);
        // Every block number is below u64::MAX (file layouts end at 5 << 60).
        self.for_each_newest(0, u64::MAX, false, |block, version, v| {
            if failed.is_some() {
                return;
            }
            batch.put_cf(&heads_cf, keys::head_key(self.group, block), encode_head(version, v.is_empty()));
            heads += 1;
            if batch.len() >= 65_536 {
                failed = self.store.write(std::mem::take(&mut batch)).err();
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        batch.put_cf(self.store.cf(CF_SM)?, keys::sm_key(self.group, SmTag::HeadsBuilt), []);
        self.store.write(batch)?;
        Ok(heads)
    }

    /// Versions of `block`, newest first, with whether each is a zero marker.
    pub fn versions(&self, block: u64) -> Result<Vec<(u64, bool)>, StoreError> {
        chain_at(&mut self.block_cursor(block, &keys::block_prefix(self.group, block))?, self.group, block, usize::MAX)
    }

    /// The newest version of `block` at or below `at` (u64::MAX = current).
    pub fn read_at(&self, block: u64, at: u64) -> Result<Option<(u64, Stored)>, BlockReadError> {
        version_at(&self.block_cursor(block, &keys::block_key(self.group, block, at))?, self.group, block)
    }

    /// The exact stored version, verified (for repairs of other replicas).
    pub fn read_exact(&self, block: u64, version: u64) -> Result<Option<Stored>, BlockReadError> {
        let cf = self.store.cf(CF_BLOCKS)?;
        match self.store.db().get_cf(&cf, keys::block_key(self.group, block, version)).map_err(StoreError::from)? {
            None => Ok(None),
            Some(raw) => decode_value(&raw).map(Some).ok_or(BlockReadError::Checksum { block, version }),
        }
    }

    /// Overwrites one stored version with known-good content (repair).
    pub fn repair(&self, block: u64, version: u64, content: &Stored) -> Result<(), StoreError> {
        let cf = self.store.cf(CF_BLOCKS)?;
        let mut batch = WriteBatch::default();
        let value = match content {
            Stored::Zero => Vec::new(),
            Stored::Data(d) => encode_value(d),
        };
        batch.put_cf(&cf, keys::block_key(self.group, block, version), value);
        if let Some((newest, zero)) = self.head(block)? {
            if newest == version && zero != content.is_zero() {
                batch.put_cf(self.store.cf(CF_HEADS)?, keys::head_key(self.group, block), encode_head(version, !zero));
            }
        }
        self.store.write(batch)
    }

    /// Calls `visit(block, version, stored value)` with the newest stored
    /// version of each block in `first..first+count` that has one, in
    /// order, through one raw iterator (its key and value are borrowed,
    /// not copied). `fill_cache: false` keeps a whole-volume scan from
    /// evicting what reads need.
    fn for_each_newest(
        &self,
        first: u64,
        count: u64,
        fill_cache: bool,
        mut visit: impl FnMut(u64, u64, &[u8]),
    ) -> Result<(), StoreError> {
        let end = first.saturating_add(count);
        let (start, stop) = keys::block_range(self.group, first, end);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(stop);
        ro.set_total_order_seek(true);
        ro.fill_cache(fill_cache);
        let mut it = self.store.db().raw_iterator_cf_opt(self.store.cf(CF_BLOCKS)?, ro);
        it.seek(&start);
        let mut last_block = None;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((g, b, version)) = keys::parse_block_key(k) else { break };
            if g != self.group || b < first || b >= end {
                break;
            }
            // Versions are newest first: the rest of a block's chain is older.
            if last_block != Some(b) {
                last_block = Some(b);
                visit(b, version, v);
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }

    /// Current content of blocks `first..first+count` in one pass: `Ok(None)`
    /// for absent blocks; checksum failures are reported per block so the
    /// caller can repair just those.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub fn read_range(&self, first: u64, count: u64) -> Result<Vec<Result<Option<(u64, Stored)>, u64>>, StoreError> {
        let mut out: Vec<Result<Option<(u64, Stored)>, u64>> = (0..count).map(|_| Ok(None)).collect();
        self.for_each_newest(first, count, true, |b, version, v| {
            out[(b - first) as usize] = match decode_value(v) {
                Some(s) => Ok(Some((version, s))),
                None => Err(version),
            };
        })?;
        Ok(out)
    }

    /// Current content of blocks `first..first+count` copied straight from
    /// RocksDB's buffers into `out` (`count` blocks long, zeroed by the
    /// caller: absent blocks and zero markers leave their slot alone) — one
    /// copy per block. Returns the blocks whose newest version failed its
    /// checksum, with that version; their slots are left for the caller to
    /// fill after a repair.
    pub fn read_range_into(&self, first: u64, count: u64, out: &mut [u8]) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut corrupt = Vec::new();
        self.for_each_newest(first, count, count < SCAN_BLOCKS, |b, version, v| {
            if v.is_empty() {
                return;
            }
            let slot = (b - first) as usize * BS;
            match verified_data(v) {
                Some(data) => out[slot..slot + data.len()].copy_from_slice(data),
                None => corrupt.push((b, version)),
            }
        })?;
        Ok(corrupt)
    }

    /// Blocks in `first..end` that have at least one stored version.
    pub fn present_blocks(&self, first: u64, end: u64) -> Result<Vec<u64>, StoreError> {
        let cf = self.store.cf(CF_BLOCKS)?;
        let (start, stop) = keys::block_range(self.group, first, end);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(stop);
        ro.set_total_order_seek(true);
        let it = self.store.db().iterator_cf_opt(&cf, ro, IteratorMode::From(&start, Direction::Forward));
        let mut out: Vec<u64> = Vec::new();
        for item in it {
            let (k, _) = item?;
            let Some((g, b, _)) = keys::parse_block_key(&k) else { break };
            if g != self.group {
                break;
            }
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
        Ok(out)
    }
}

impl BlockStore {
    /// Verifies every stored version of the volume; returns how many were
    /// checked and which failed.
    pub fn scan_checksums(&self) -> Result<(u64, Vec<(u64, u64)>), StoreError> {
        let cf = self.store.cf(CF_BLOCKS)?;
        let (start, end) = keys::group_range(self.group);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        ro.set_total_order_seek(true);
        // Read from disk, not from a cache that might hide media errors.
        ro.fill_cache(false);
        let it = self.store.db().iterator_cf_opt(&cf, ro, IteratorMode::From(&start, Direction::Forward));
        let (mut checked, mut bad) = (0u64, Vec::new());
        for item in it {
            let (k, v) = item?;
            let Some((g, block, version)) = keys::parse_block_key(&k) else { break };
            if g != self.group {
                break;
            }
            checked += 1;
            if decode_value(&v).is_none() {
                bad.push((block, version));
            }
        }
        Ok((checked, bad))
    }
}

/// What one step of a sweep (see `space`) found in a run of blocks.
pub struct SweepChunk {
    pub batch: WriteBatch,
    /// First block not visited; `None` once the last stored block was.
    pub next: Option<u64>,
    /// Data versions dropped.
    pub freed: u64,
    /// Contribution of the visited blocks as they remain.
    pub counted: SpaceDelta,
}

impl BlockStore {
    /// Visits the chains of the blocks from `from` on — about `max_keys`
    /// stored versions' worth, whole chains only — and stages the deletion
    /// of every version no pin in `pins` needs. The caller writes the batch
    /// under the same lock as applies, so `pins` cannot change meanwhile.
    pub fn sweep_chunk(
        &self,
        from: u64,
        max_keys: usize,
        pins: &Pins,
        user_pins: &Pins,
    ) -> Result<SweepChunk, StoreError> {
        let cf = self.store.cf(CF_BLOCKS)?;
        let heads_cf = self.store.cf(CF_HEADS)?;
        let (_, end) = keys::group_range(self.group);
        let start = keys::block_prefix(self.group, from);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        ro.set_total_order_seek(true);
        ro.fill_cache(false);
        let it = self.store.db().iterator_cf_opt(&cf, ro, IteratorMode::From(&start, Direction::Forward));
        let mut out = SweepChunk { batch: WriteBatch::default(), next: None, freed: 0, counted: SpaceDelta::default() };
        let mut chain: Vec<(u64, bool)> = Vec::new();
        let mut current: Option<u64> = None;
        for (seen, item) in it.enumerate() {
            let (k, v) = item?;
            let Some((g, b, version)) = keys::parse_block_key(&k) else { break };
            if g != self.group {
                break;
            }
            if current != Some(b) {
                if let Some(prev) = current {
                    self.collect_into([cf, heads_cf], prev, &chain, pins, user_pins, &mut out);
                    chain.clear();
                    if seen >= max_keys {
                        out.next = Some(b);
                        return Ok(out);
                    }
                }
                current = Some(b);
            }
            chain.push((version, v.is_empty()));
        }
        if let Some(prev) = current {
            self.collect_into([cf, heads_cf], prev, &chain, pins, user_pins, &mut out);
        }
        Ok(out)
    }

    /// `cfs`: the `blocks` and `heads` column families.
    fn collect_into(
        &self,
        [cf, heads_cf]: [&rocksdb::ColumnFamily; 2],
        block: u64,
        chain: &[(u64, bool)],
        pins: &Pins,
        user_pins: &Pins,
        out: &mut SweepChunk,
    ) {
        let (dropped, kept) = collect_chain(chain, pins);
        if kept.first() != chain.first() {
            stage_head(&mut out.batch, heads_cf, self.group, block, &kept);
        }
        for (version, zero) in dropped {
            out.batch.delete_cf(cf, keys::block_key(self.group, block, version));
            if !zero {
                out.freed += 1;
            }
        }
        out.counted.add_chain(&kept, user_pins, 1);
    }

    /// The blocks holding data at log index `index` among `from..end`, in
    /// order, as stored values (`crc ‖ data`, not yet verified): what a
    /// user snapshot taken at `index` reads. `emit` returns false to stop.
    /// Reads one consistent view of the database.
    pub fn scan_at(
        &self,
        index: u64,
        from: u64,
        end: u64,
        mut emit: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let cf = self.store.cf(CF_BLOCKS)?;
        let (start, stop) = keys::block_range(self.group, from, end);
        let snap = self.store.db().snapshot();
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(stop);
        ro.set_total_order_seek(true);
        ro.fill_cache(false);
        ro.set_snapshot(&snap);
        let it = self.store.db().iterator_cf_opt(&cf, ro, IteratorMode::From(&start, Direction::Forward));
        let mut done_block: Option<u64> = None;
        for item in it {
            let (k, v) = item?;
            let Some((g, b, version)) = keys::parse_block_key(&k) else { break };
            if g != self.group || b >= end {
                break;
            }
            if done_block == Some(b) || version > index {
                continue;
            }
            // Newest version at or below the index: this is what it reads.
            done_block = Some(b);
            if !v.is_empty() && !emit(b, &v) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Writes of one log entry, staged in a `WriteBatch` with an overlay so
/// later ops of the same entry see earlier ones.
pub struct EntryWriter<'a> {
    blocks: &'a BlockStore,
    version: u64,
    pins: &'a Pins,
    /// Pins of user snapshots only (space accounting, see `space`).
    user_pins: &'a Pins,
    /// Blocks from here on are left to a running sweep to count.
    count_below: u64,
    batch: WriteBatch,
    /// Content written by this entry so far, as stored (`crc ‖ data`;
    /// `None` for zeros), so a block is copied once on its way to the batch.
    overlay: HashMap<u64, Option<Vec<u8>>>,
    /// Chains of the blocks this entry touched, as staged.
    chains: HashMap<u64, Vec<(u64, bool)>>,
    /// One iterator for every lookup of the entry, re-seeked per block:
    /// creating a RocksDB iterator costs far more than a seek, and a 1 MiB
    /// write looks up 256 blocks. It reads the database as of the entry's
    /// first lookup; what the entry itself wrote is in `overlay`/`chains`.
    cursor: Option<DBRawIterator<'a>>,
    /// Set by [`Self::newest_only`]: lookups read a block's newest version
    /// and nothing behind it.
    newest_only: bool,
    /// Change in the number of blocks whose current content is non-zero.
    pub live_delta: i64,
    /// Change in the space counters of blocks below `count_below`.
    pub space: SpaceDelta,
}

/// The chain of `block` (versions newest first, with whether each is a zero
/// marker) from an iterator positioned at its first stored version.
/// At most `limit` versions are read.
fn chain_at(
    it: &mut DBRawIterator<'_>,
    group: GroupId,
    block: u64,
    limit: usize,
) -> Result<Vec<(u64, bool)>, StoreError> {
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        match keys::parse_block_key(k) {
            Some((g, b, version)) if g == group && b == block => out.push((version, v.is_empty())),
            _ => break,
        }
        if out.len() >= limit {
            break;
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// The version of `block` an iterator is positioned at, verified; `None`
/// when it points past the block.
fn version_at(it: &DBRawIterator<'_>, group: GroupId, block: u64) -> Result<Option<(u64, Stored)>, BlockReadError> {
    if let (Some(k), Some(v)) = (it.key(), it.value()) {
        if let Some((g, b, version)) = keys::parse_block_key(k) {
            if g == group && b == block {
                return decode_value(v).map(|s| Some((version, s))).ok_or(BlockReadError::Checksum { block, version });
            }
        }
    }
    it.status().map_err(StoreError::from)?;
    Ok(None)
}

/// What a partial write needs but could not read: the block's current
/// version is corrupt locally. The caller repairs it and retries the entry.
#[derive(Debug, thiserror::Error)]
#[error("block {block} version {version} failed its checksum")]
pub struct NeedsRepair {
    pub block: u64,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    NeedsRepair(#[from] NeedsRepair),
}

impl<'a> EntryWriter<'a> {
    pub fn new(blocks: &'a BlockStore, version: u64, pins: &'a Pins) -> Self {
        Self::with_accounting(blocks, version, pins, pins, u64::MAX)
    }

    /// A writer that also tracks space (see [`SpaceDelta`]) for user
    /// snapshot pins `user_pins`, for blocks below `count_below`.
    pub fn with_accounting(
        blocks: &'a BlockStore,
        version: u64,
        pins: &'a Pins,
        user_pins: &'a Pins,
        count_below: u64,
    ) -> Self {
        EntryWriter {
            blocks,
            version,
            pins,
            user_pins,
            count_below,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            chains: HashMap::new(),
            cursor: None,
            newest_only: false,
            live_delta: 0,
            space: SpaceDelta::default(),
        }
    }

    /// The caller knows no block has a stored version older than its
    /// newest that anything needs: no pins, no sweep pending and no held
    /// data versions (`space`). Lookups then stop at the newest version.
    /// Stepping past it to the end of the chain read the next block's data
    /// too and was half the cost of a write's lookup; what it would have
    /// found is at most a zero marker a released Raft-snapshot pin left
    /// behind, which reads as nothing and holds no data.
    pub fn newest_only(mut self) -> Self {
        self.newest_only = true;
        self
    }

    pub fn into_batch(self) -> WriteBatch {
        self.batch
    }

    pub fn batch_mut(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    /// The entry's iterator, positioned at the newest stored version of
    /// `block` (or past the block when it has none).
    fn seek(&mut self, block: u64) -> Result<&mut DBRawIterator<'a>, StoreError> {
        let blocks = self.blocks;
        let cursor = match &mut self.cursor {
            Some(c) => c,
            slot => {
                let mut ro = ReadOptions::default();
                // Seeks stay within one block's prefix and use its bloom filter.
                ro.set_prefix_same_as_start(true);
                slot.insert(blocks.store.db().raw_iterator_cf_opt(blocks.store.cf(CF_BLOCKS)?, ro))
            }
        };
        cursor.seek(keys::block_prefix(blocks.group, block));
        Ok(cursor)
    }

    /// Stored versions of `block`, newest first, with whether each is a zero
    /// marker (what [`BlockStore::versions`] returns, through the cursor).
    fn stored_chain(&mut self, block: u64) -> Result<Vec<(u64, bool)>, StoreError> {
        let group = self.blocks.group;
        if self.newest_only {
            let head: Vec<(u64, bool)> = self.blocks.head(block)?.into_iter().collect();
            // Every test run checks the index against the chain it stands for.
            #[cfg(debug_assertions)]
            {
                let chain = chain_at(self.seek(block)?, group, block, 1)?;
                assert_eq!(head, chain, "heads index of block {block} of volume {group} is stale");
            }
            return Ok(head);
        }
        chain_at(self.seek(block)?, group, block, usize::MAX)
    }

    /// Current content of a block as seen by this entry.
    pub fn current(&mut self, block: u64) -> Result<Stored, ApplyError> {
        if let Some(staged) = self.overlay.get(&block) {
            return Ok(match staged {
                Some(value) => Stored::Data(value[4..].to_vec()),
                None => Stored::Zero,
            });
        }
        let group = self.blocks.group;
        match version_at(self.seek(block)?, group, block) {
            Ok(None) => Ok(Stored::Zero),
            Ok(Some((_, s))) => Ok(s),
            Err(BlockReadError::Store(e)) => Err(e.into()),
            Err(BlockReadError::Checksum { block, version }) => Err(NeedsRepair { block, version }.into()),
        }
    }

    /// Sets the content of `block` at this entry's version and collects the
    /// versions no pin needs any more.
    pub fn put_block(&mut self, block: u64, content: Stored) -> Result<(), ApplyError> {
        let value = match &content {
            Stored::Data(d) => Some(encode_value(d)),
            Stored::Zero => None,
        };
        self.put_value(block, value)
    }

    /// [`Self::put_block`] with the content already in stored form.
    fn put_value(&mut self, block: u64, value: Option<Vec<u8>>) -> Result<(), ApplyError> {
        let cf = self.blocks.store.cf(CF_BLOCKS)?;
        let group = self.blocks.group;
        let new_zero = value.is_none();
        let before = match self.chains.remove(&block) {
            Some(c) => c,
            None => self.stored_chain(block)?,
        };
        let was_zero = before.first().is_none_or(|(_, zero)| *zero);
        // The chain after this write: this version, then older stored ones.
        let older: Vec<(u64, bool)> = before.iter().copied().filter(|(v, _)| *v < self.version).collect();
        let mut newer = self.version;
        let mut kept = Vec::with_capacity(older.len() + 1);
        for (v, zero) in &older {
            if pinned(self.pins, *v, newer) {
                kept.push((*v, *zero));
            } else {
                self.batch.delete_cf(&cf, keys::block_key(group, block, *v));
            }
            newer = *v;
        }
        let key = keys::block_key(group, block, self.version);
        let mut after = Vec::with_capacity(kept.len() + 1);
        match &value {
            Some(v) => {
                self.batch.put_cf(&cf, key, v);
                after.push((self.version, false));
            }
            // A zero marker is needed only to hide an older, pinned version.
            None if !kept.is_empty() => {
                self.batch.put_cf(&cf, key, Vec::new());
                after.push((self.version, true));
            }
            None => self.batch.delete_cf(&cf, key),
        }
        after.extend(kept);
        stage_head(&mut self.batch, self.blocks.store.cf(CF_HEADS)?, group, block, &after);
        if block < self.count_below {
            self.space.add_chain(&before, self.user_pins, -1);
            self.space.add_chain(&after, self.user_pins, 1);
        }
        self.chains.insert(block, after);
        self.live_delta += match (was_zero, new_zero) {
            (true, false) => 1,
            (false, true) => -1,
            _ => 0,
        };
        self.overlay.insert(block, value);
        Ok(())
    }

    /// Writes `data` at byte `offset`, merging partial blocks.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ApplyError> {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let block = abs / BLOCK_SIZE;
            let in_block = (abs % BLOCK_SIZE) as usize;
            let n = (BS - in_block).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            let value = if n == BS {
                (!all_zero(chunk)).then(|| encode_value(chunk))
            } else {
                let mut buf = match self.current(block)? {
                    Stored::Zero => vec![0u8; BS],
                    Stored::Data(d) => d,
                };
                buf[in_block..in_block + n].copy_from_slice(chunk);
                (!all_zero(&buf)).then(|| encode_value(&buf))
            };
            self.put_value(block, value)?;
            pos += n;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`: whole blocks are dropped, partial
    /// edge blocks are merged.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), ApplyError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE);
        let end_full = end / BLOCK_SIZE;
        if first_full >= end_full {
            // Within one or two partial blocks: write zeros byte-wise.
            return self.write_zero_bytes(offset, end);
        }
        if offset < first_full * BLOCK_SIZE {
            self.write_zero_bytes(offset, first_full * BLOCK_SIZE)?;
        }
        // Only blocks that exist need work: a trim of a mostly empty 1 TiB
        // device must not visit every block.
        let mut present = self.blocks.present_blocks(first_full, end_full)?;
        present.extend(self.overlay.keys().copied().filter(|b| *b >= first_full && *b < end_full));
        present.sort_unstable();
        present.dedup();
        for b in present {
            self.put_block(b, Stored::Zero)?;
        }
        if end > end_full * BLOCK_SIZE {
            self.write_zero_bytes(end_full * BLOCK_SIZE, end)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&mut self, from: u64, to: u64) -> Result<(), ApplyError> {
        let zeros = vec![0u8; (to - from) as usize];
        self.write(from, &zeros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bs = BlockStore::new(store, GroupId(uuid::Uuid::new_v4()));
        (dir, bs)
    }

    fn apply(
        bs: &BlockStore,
        version: u64,
        pins: &Pins,
        f: impl FnOnce(&mut EntryWriter) -> Result<(), ApplyError>,
    ) -> i64 {
        let mut w = EntryWriter::new(bs, version, pins);
        f(&mut w).unwrap();
        let delta = w.live_delta;
        bs.store().write(w.into_batch()).unwrap();
        delta
    }

    fn read(bs: &BlockStore, block: u64, at: u64) -> Vec<u8> {
        match bs.read_at(block, at).unwrap() {
            None | Some((_, Stored::Zero)) => vec![0; BS],
            Some((_, Stored::Data(d))) => d,
        }
    }

    #[test]
    fn unwritten_reads_zero_and_partial_writes_merge() {
        let (_d, bs) = setup();
        let pins = Pins::new();
        assert_eq!(read(&bs, 3, u64::MAX), vec![0; BS]);
        apply(&bs, 1, &pins, |w| w.write(3 * 4096 + 100, b"hello"));
        apply(&bs, 2, &pins, |w| w.write(3 * 4096 + 102, b"LLO!"));
        let got = read(&bs, 3, u64::MAX);
        assert_eq!(&got[100..106], b"heLLO!");
        assert!(got[..100].iter().all(|b| *b == 0));
        // Without pins only the newest version is kept.
        assert_eq!(bs.versions(3).unwrap().len(), 1);
    }

    #[test]
    fn pinned_versions_survive_overwrite_and_are_collected_after() {
        let (_d, bs) = setup();
        let none = Pins::new();
        apply(&bs, 10, &none, |w| w.write(0, &[1u8; BS]));
        let pins: Pins = [15].into();
        apply(&bs, 20, &pins, |w| w.write(0, &[2u8; BS]));
        assert_eq!(read(&bs, 0, 15), vec![1u8; BS], "snapshot at 15 sees version 10");
        assert_eq!(read(&bs, 0, u64::MAX), vec![2u8; BS]);
        // Trim hides the data but keeps the pinned version.
        apply(&bs, 30, &pins, |w| w.zero(0, 4096));
        assert_eq!(read(&bs, 0, u64::MAX), vec![0u8; BS]);
        assert_eq!(read(&bs, 0, 15), vec![1u8; BS]);
        // Pin released: the next write collects everything older.
        apply(&bs, 40, &none, |w| w.write(0, &[3u8; BS]));
        assert_eq!(bs.versions(0).unwrap(), vec![(40, false)]);
    }

    #[test]
    fn zero_range_only_touches_present_blocks_and_edges() {
        let (_d, bs) = setup();
        let pins = Pins::new();
        let delta = apply(&bs, 1, &pins, |w| {
            w.write(0, &[7u8; 3 * BS])?;
            w.write(1000 * 4096, &[9u8; BS])
        });
        assert_eq!(delta, 4);
        // Zero from the middle of block 0 to the middle of block 1000.
        let delta = apply(&bs, 2, &pins, |w| w.zero(2048, 1000 * 4096 + 100 - 2048));
        let b0 = read(&bs, 0, u64::MAX);
        assert!(b0[..2048].iter().all(|b| *b == 7) && b0[2048..].iter().all(|b| *b == 0));
        assert_eq!(read(&bs, 1, u64::MAX), vec![0; BS]);
        let b1000 = read(&bs, 1000, u64::MAX);
        assert!(b1000[..100].iter().all(|b| *b == 0) && b1000[100..].iter().all(|b| *b == 9));
        assert_eq!(delta, -2, "blocks 1 and 2 became empty");
        assert!(bs.versions(1).unwrap().is_empty(), "no marker needed without pins");
    }

    #[test]
    fn checksum_mismatch_is_detected_not_returned() {
        let (_d, bs) = setup();
        let pins = Pins::new();
        apply(&bs, 5, &pins, |w| w.write(0, &[4u8; BS]));
        let cf = bs.store().cf(CF_BLOCKS).unwrap();
        let key = keys::block_key(bs.group(), 0, 5);
        let mut raw = bs.store().db().get_cf(&cf, &key).unwrap().unwrap();
        raw[100] ^= 0xff;
        bs.store().db().put_cf(&cf, &key, &raw).unwrap();
        assert!(matches!(bs.read_at(0, u64::MAX), Err(BlockReadError::Checksum { block: 0, version: 5 })));
        assert_eq!(bs.read_range(0, 2).unwrap()[0], Err(5));
        // A partial write over the corrupt block asks for a repair.
        let mut w = EntryWriter::new(&bs, 6, &pins);
        assert!(matches!(w.write(10, b"x"), Err(ApplyError::NeedsRepair(NeedsRepair { block: 0, version: 5 }))));
        bs.repair(0, 5, &Stored::Data(vec![4u8; BS])).unwrap();
        assert_eq!(read(&bs, 0, u64::MAX), vec![4u8; BS]);
    }

    #[test]
    fn accounting_tracks_held_and_exclusive_versions() {
        let (_d, bs) = setup();
        let none = Pins::new();
        let user: Pins = [15].into();
        let acc = |version: u64, pins: &Pins, f: &dyn Fn(&mut EntryWriter) -> Result<(), ApplyError>| {
            let mut w = EntryWriter::with_accounting(&bs, version, pins, pins, u64::MAX);
            f(&mut w).unwrap();
            let d = w.space.clone();
            bs.store().write(w.into_batch()).unwrap();
            d
        };
        assert!(acc(10, &none, &|w| w.write(0, &[1u8; 2 * BS])).is_empty());
        // Overwrite under a snapshot at 15: both old versions become held
        // and exclusive to it; twice in one entry counts once.
        let d = acc(20, &user, &|w| {
            w.write(0, &[2u8; 2 * BS])?;
            w.write(0, &[3u8; BS])
        });
        assert_eq!(d.held, 2);
        assert_eq!(d.exclusive.get(&15), Some(&2));
        // Trimming a block keeps a marker: no change in held data.
        let d = acc(30, &user, &|w| w.zero(0, 4096));
        assert!(d.is_empty(), "{d:?}");
        // With the pin gone, the next write drops the old version.
        let d = acc(40, &none, &|w| w.write(4096, &[4u8; BS]));
        assert_eq!(d.held, -1);
    }

    #[test]
    fn sweep_drops_unpinned_versions_and_counts_the_rest() {
        let (_d, bs) = setup();
        let pins: Pins = [15, 25].into();
        for (v, byte) in [(10u64, 1u8), (20, 2), (30, 3)] {
            apply(&bs, v, &pins, |w| {
                w.write(0, &[byte; BS])?;
                w.write(4096 * 7, &[byte; BS])
            });
        }
        assert_eq!(bs.versions(0).unwrap().len(), 3);
        // Snapshot 15 deleted: version 10 is garbage, 20 is read by 25.
        let left: Pins = [25].into();
        let c = bs.sweep_chunk(0, 1, &left, &left).unwrap();
        assert_eq!(c.next, Some(7), "one chain per step at max_keys 1");
        assert_eq!(c.freed, 1);
        assert_eq!(c.counted.held, 1);
        bs.store().write(c.batch).unwrap();
        let c = bs.sweep_chunk(7, 1000, &left, &left).unwrap();
        assert_eq!((c.next, c.freed), (None, 1));
        bs.store().write(c.batch).unwrap();
        assert_eq!(bs.versions(0).unwrap(), vec![(30, false), (20, false)]);
        assert_eq!(read(&bs, 0, 25), vec![2u8; BS]);
        let mut seen = Vec::new();
        bs.scan_at(25, 0, 8, |b, v| {
            seen.push((b, decode_value(v).unwrap()));
            true
        })
        .unwrap();
        assert_eq!(seen, vec![(0, Stored::Data(vec![2u8; BS])), (7, Stored::Data(vec![2u8; BS]))]);
    }

    #[test]
    fn newest_only_lookups_store_what_full_lookups_store() {
        // The same entries through both kinds of writer, with no pins: every
        // chain stays one version long, so stopping at the newest version
        // must change nothing — data, versions kept, live-block counts.
        let (_d1, full) = setup();
        let (_d2, newest) = setup();
        let pins = Pins::new();
        // (version, [(offset, data)])
        type Writes = Vec<(u64, Vec<u8>)>;
        let entries: Vec<(u64, Writes)> = vec![
            (1, vec![(0, vec![1u8; 3 * BS]), (10 * 4096, vec![2u8; BS])]),
            (2, vec![(4096 + 7, b"partial".to_vec()), (0, vec![0u8; BS])]),
            (3, vec![(2 * 4096, vec![3u8; 2 * BS]), (10 * 4096 + 100, vec![0u8; 50])]),
            (4, vec![(4096, vec![0u8; BS]), (4096, vec![4u8; BS])]),
        ];
        for (version, writes) in &entries {
            let mut deltas = Vec::new();
            for (bs, newest_only) in [(&full, false), (&newest, true)] {
                let mut w = EntryWriter::new(bs, *version, &pins);
                if newest_only {
                    w = w.newest_only();
                }
                for (offset, data) in writes {
                    w.write(*offset, data).unwrap();
                }
                if *version == 3 {
                    w.zero(11 * 4096, 4096).unwrap();
                }
                deltas.push(w.live_delta);
                bs.store().write(w.into_batch()).unwrap();
            }
            assert_eq!(deltas[0], deltas[1], "entry {version}");
        }
        for block in 0..12 {
            assert_eq!(full.versions(block).unwrap(), newest.versions(block).unwrap(), "block {block}");
            assert_eq!(read(&full, block, u64::MAX), read(&newest, block, u64::MAX), "block {block}");
            assert!(newest.versions(block).unwrap().len() <= 1);
        }
        assert_eq!(&read(&newest, 1, u64::MAX)[..], &[4u8; BS][..]);
    }

    /// Every block's head as the chain in `blocks` says it should be.
    fn heads_match_chains(bs: &BlockStore, blocks: std::ops::Range<u64>) -> Vec<Option<(u64, bool)>> {
        blocks
            .map(|b| {
                let head = bs.head(b).unwrap();
                assert_eq!(head, bs.versions(b).unwrap().first().copied(), "head of block {b}");
                head
            })
            .collect()
    }

    #[test]
    fn heads_follow_writes_zero_markers_and_sweeps_and_rebuild_to_the_same() {
        let (_d, bs) = setup();
        let none = Pins::new();
        let pins: Pins = [2].into();
        apply(&bs, 1, &none, |w| w.write(0, &[1u8; 4 * BS]));
        apply(&bs, 2, &pins, |w| w.write(4096, &[2u8; BS]));
        // Trims under the pin: zero markers over the versions it reads.
        apply(&bs, 3, &pins, |w| {
            w.zero(0, 4096)?;
            w.zero(2 * 4096, 2 * 4096)
        });
        assert_eq!(
            heads_match_chains(&bs, 0..5),
            vec![Some((3, true)), Some((2, false)), Some((3, true)), Some((3, true)), None]
        );
        // The pin is released: a sweep drops the markers and what they hid,
        // and their heads with them.
        let c = bs.sweep_chunk(0, 1000, &none, &none).unwrap();
        bs.store().write(c.batch).unwrap();
        assert_eq!(heads_match_chains(&bs, 0..5), vec![None, Some((2, false)), None, None, None]);
        // Newest-only writers rely on the heads (their debug check compares
        // each against the chain).
        let mut w = EntryWriter::new(&bs, 4, &none).newest_only();
        w.write(0, &[4u8; 3 * BS]).unwrap();
        w.zero(4096, 4096).unwrap();
        assert_eq!(w.live_delta, 1, "blocks 0 and 2 appear, block 1 goes");
        bs.store().write(w.into_batch()).unwrap();
        let maintained = heads_match_chains(&bs, 0..5);
        assert_eq!(maintained, vec![Some((4, false)), None, Some((4, false)), None, None]);
        // A data directory from before the index: nothing indexed, no mark.
        let heads_cf = bs.store().cf(CF_HEADS).unwrap();
        let (start, end) = keys::group_range(bs.group());
        bs.store().db().delete_range_cf(&heads_cf, &start, &end).unwrap();
        assert!(!bs.heads_built().unwrap());
        assert_eq!(bs.rebuild_heads().unwrap(), 2);
        assert!(bs.heads_built().unwrap());
        assert_eq!(heads_match_chains(&bs, 0..5), maintained);
    }

    #[test]
    fn read_range_returns_newest_versions() {
        let (_d, bs) = setup();
        let pins: Pins = [1].into();
        apply(&bs, 1, &pins, |w| w.write(0, &[1u8; 2 * BS]));
        apply(&bs, 2, &pins, |w| w.write(4096, &[2u8; BS]));
        let r = bs.read_range(0, 3).unwrap();
        assert_eq!(r[0], Ok(Some((1, Stored::Data(vec![1u8; BS])))));
        assert_eq!(r[1], Ok(Some((2, Stored::Data(vec![2u8; BS])))));
        assert_eq!(r[2], Ok(None));
    }

    #[test]
    fn read_range_into_copies_newest_versions_and_reports_bad_ones() {
        let (_d, bs) = setup();
        let pins: Pins = [1, 3].into();
        apply(&bs, 1, &pins, |w| w.write(0, &[1u8; 4 * BS]));
        apply(&bs, 2, &pins, |w| w.write(4096, &[2u8; BS]));
        // Block 2 trimmed under a pin: a zero marker over version 1.
        apply(&bs, 3, &pins, |w| w.zero(2 * 4096, 4096));
        apply(&bs, 4, &pins, |w| w.write(3 * 4096, &[4u8; BS]));
        // Corrupt block 3's newest version.
        let cf = bs.store().cf(CF_BLOCKS).unwrap();
        let key = keys::block_key(bs.group(), 3, 4);
        let mut raw = bs.store().db().get_cf(&cf, &key).unwrap().unwrap();
        raw[9] ^= 1;
        bs.store().db().put_cf(&cf, &key, &raw).unwrap();
        // Blocks 1..6 (block 5 was never written).
        let mut out = vec![0u8; 5 * BS];
        let bad = bs.read_range_into(1, 5, &mut out).unwrap();
        assert_eq!(bad, vec![(3, 4)]);
        assert!(out[..BS].iter().all(|b| *b == 2), "block 1: newest version");
        assert!(out[BS..2 * BS].iter().all(|b| *b == 0), "block 2: zero marker hides version 1");
        assert!(out[2 * BS..3 * BS].iter().all(|b| *b == 0), "block 3: left for the repair");
        assert!(out[3 * BS..].iter().all(|b| *b == 0), "blocks 4, 5: never written");
        let mut out = vec![0u8; BS];
        assert!(bs.read_range_into(0, 1, &mut out).unwrap().is_empty());
        assert!(out.iter().all(|b| *b == 1));
    }
}
