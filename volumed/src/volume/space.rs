//! What user snapshots cost in space, kept exact without scanning.
//!
//! Every block's chain of stored versions (newest first) contributes to two
//! counters: `held`, the data versions that are not the block's current
//! content (what snapshots and a pinned Raft snapshot keep alive), and, per
//! user snapshot, the data versions only that snapshot reads — what
//! deleting it would free. A version `v` with next-newer version `n` is read
//! by the user snapshots pinned in `[v, n)`.
//!
//! The apply path knows a block's chain before and after each write and
//! adds the difference. Creating a snapshot changes no block's contribution
//! (the new pin lies above every stored version, so it reads current
//! content only). Deleting one changes many: the sweep that collects the
//! freed versions recounts every block as it goes, while applies keep
//! adjusting the blocks it has already visited — so the counters are exact
//! again when it finishes.
//!
//! These counters are local to a replica (replicas may differ in what their
//! Raft snapshots pin); the leader's are reported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::blocks::Pins;

/// A block's stored versions, newest first: (version, is a zero marker).
pub type Chain = [(u64, bool)];
/// An owned [`Chain`].
pub type ChainBuf = Vec<(u64, bool)>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpaceCounters {
    /// Stored data versions that are not their block's current content.
    pub held: u64,
    /// Per user snapshot (by its pinned index): data versions only it reads.
    pub exclusive: BTreeMap<u64, u64>,
}

/// A signed change of [`SpaceCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceDelta {
    pub held: i64,
    pub exclusive: BTreeMap<u64, i64>,
}

impl SpaceDelta {
    /// Adds `sign` × the contribution of one chain.
    pub fn add_chain(&mut self, chain: &Chain, user_pins: &Pins, sign: i64) {
        for pair in chain.windows(2) {
            let ((newer, _), (version, zero)) = (pair[0], pair[1]);
            if zero {
                continue;
            }
            self.held += sign;
            let mut readers = user_pins.range(version..newer);
            if let (Some(only), None) = (readers.next(), readers.next()) {
                *self.exclusive.entry(*only).or_insert(0) += sign;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0 && self.exclusive.values().all(|v| *v == 0)
    }
}

impl SpaceCounters {
    pub fn apply(&mut self, d: &SpaceDelta) {
        self.held = self.held.saturating_add_signed(d.held);
        for (pin, n) in &d.exclusive {
            let e = self.exclusive.entry(*pin).or_insert(0);
            *e = e.saturating_add_signed(*n);
            if *e == 0 {
                self.exclusive.remove(pin);
            }
        }
    }
}

/// A sweep in progress: blocks below `cursor` were visited (garbage
/// dropped, contribution counted in `counted`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SweepState {
    pub cursor: u64,
    pub counted: SpaceCounters,
    /// Data versions this sweep dropped so far.
    pub freed: u64,
}

/// The replica-local space state, persisted with the applied index.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalSpace {
    /// Valid while no sweep runs.
    pub counters: SpaceCounters,
    pub sweep: Option<SweepState>,
    /// Data versions dropped by sweeps on this replica, ever.
    pub reclaimed: u64,
    /// Data versions the last finished sweep dropped.
    pub last_sweep_freed: u64,
}

impl LocalSpace {
    /// Blocks from this one on are not counted by the apply path (a sweep
    /// will count them when it gets there).
    pub fn count_below(&self) -> u64 {
        self.sweep.as_ref().map(|s| s.cursor).unwrap_or(u64::MAX)
    }

    pub fn apply(&mut self, d: &SpaceDelta) {
        match &mut self.sweep {
            Some(s) => s.counted.apply(d),
            None => self.counters.apply(d),
        }
    }

    /// Starts a sweep from the first block (or restarts a running one:
    /// the pins it counted with changed).
    pub fn start_sweep(&mut self) {
        let freed = self.sweep.as_ref().map(|s| s.freed).unwrap_or(0);
        self.sweep = Some(SweepState { freed, ..Default::default() });
    }

    /// The counters as last known complete (during a sweep: before it).
    pub fn current(&self) -> &SpaceCounters {
        &self.counters
    }

    /// Closes a sweep that visited every block.
    pub fn finish_sweep(&mut self) {
        if let Some(s) = self.sweep.take() {
            self.counters = s.counted;
            self.reclaimed += s.freed;
            self.last_sweep_freed = s.freed;
        }
    }
}

/// What a sweep does with one chain under `pins` (every pin, user and Raft):
/// the versions to drop and the chain that stays.
pub fn collect_chain(chain: &Chain, pins: &Pins) -> (ChainBuf, ChainBuf) {
    let mut keep = vec![false; chain.len()];
    for i in 0..chain.len() {
        keep[i] = i == 0 || pins.range(chain[i].0..chain[i - 1].0).next().is_some();
    }
    // A zero marker only hides older versions; with no older version kept
    // it reads the same as no key at all.
    let mut older_kept = false;
    for i in (0..chain.len()).rev() {
        if keep[i] && chain[i].1 && !older_kept {
            keep[i] = false;
        }
        older_kept |= keep[i];
    }
    let mut dropped = Vec::new();
    let mut kept = Vec::new();
    for (i, c) in chain.iter().enumerate() {
        if keep[i] {
            kept.push(*c);
        } else {
            dropped.push(*c);
        }
    }
    (dropped, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(chain: &Chain, pins: &[u64]) -> SpaceDelta {
        let pins: Pins = pins.iter().copied().collect();
        let mut d = SpaceDelta::default();
        d.add_chain(chain, &pins, 1);
        d
    }

    #[test]
    fn exclusive_counts_versions_one_snapshot_reads() {
        // Current 30; 20 read by pin 25 only; 10 read by pins 12 and 15.
        let d = delta(&[(30, false), (20, false), (10, false)], &[12, 15, 25]);
        assert_eq!(d.held, 2);
        assert_eq!(d.exclusive, BTreeMap::from([(25, 1)]));
        // Zero markers hold no data.
        let d = delta(&[(30, false), (20, true)], &[25]);
        assert_eq!(d, SpaceDelta::default());
        // The current version is never held, whoever else reads it.
        assert!(delta(&[(30, false)], &[40]).is_empty());
    }

    #[test]
    fn collect_keeps_what_pins_read_and_drops_useless_markers() {
        let pins: Pins = [25].into();
        let (dropped, kept) = collect_chain(&[(30, false), (20, false), (10, false)], &pins);
        assert_eq!(kept, vec![(30, false), (20, false)]);
        assert_eq!(dropped, vec![(10, false)]);
        // Current content is a zero marker hiding nothing: drop it too.
        let (dropped, kept) = collect_chain(&[(30, true), (20, false)], &Pins::new());
        assert!(kept.is_empty());
        assert_eq!(dropped.len(), 2);
        // A marker that hides a pinned older version stays.
        let pins: Pins = [15].into();
        let (_, kept) = collect_chain(&[(30, true), (10, false)], &pins);
        assert_eq!(kept, vec![(30, true), (10, false)]);
    }

    #[test]
    fn sweep_counts_replace_counters_when_done() {
        let mut s = LocalSpace::default();
        s.apply(&SpaceDelta { held: 3, exclusive: BTreeMap::from([(5, 3)]) });
        s.start_sweep();
        assert_eq!(s.count_below(), 0);
        s.apply(&SpaceDelta { held: 1, exclusive: BTreeMap::new() });
        if let Some(sw) = &mut s.sweep {
            sw.freed = 3;
        }
        s.finish_sweep();
        assert_eq!(s.counters.held, 1);
        assert!(s.counters.exclusive.is_empty());
        assert_eq!((s.reclaimed, s.last_sweep_freed), (3, 3));
        assert_eq!(s.count_below(), u64::MAX);
    }
}
