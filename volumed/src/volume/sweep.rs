//! The sweeper of one replica: after a user snapshot is deleted (or a
//! snapshot was installed), walks the volume's blocks in small steps,
//! drops the versions no pin needs any more and recounts space (see
//! `space`). It runs on every replica, at low priority: one step holds the
//! apply lock for a few milliseconds, then it yields. The cursor is
//! persisted with each step, so a restart resumes where it stopped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use super::blocks::BlockStore;
use super::state_machine::{lock, sweep_step, SmShared};

/// Stored versions visited per step (about 16 MiB of data).
const STEP_KEYS: usize = 4096;
/// Pause between steps, so foreground I/O keeps the disk and the lock.
const STEP_PAUSE: Duration = Duration::from_millis(5);

pub async fn run(blocks: BlockStore, shared: Arc<Mutex<SmShared>>) {
    let wake = lock(&shared).sweep_wake.clone();
    loop {
        let (pending, stopped) = {
            let s = lock(&shared);
            (s.space.sweep.is_some(), s.stopped)
        };
        if stopped {
            return;
        }
        if !pending {
            // Woken when a sweep starts; the timeout also notices a stop.
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            continue;
        }
        let (b, s) = (blocks.clone(), shared.clone());
        match tokio::task::spawn_blocking(move || sweep_step(&b, &s, STEP_KEYS)).await {
            Ok(Ok(_)) => tokio::time::sleep(STEP_PAUSE).await,
            Ok(Err(e)) => {
                warn!(volume = %blocks.group(), error = %e, "sweep step failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(e) => {
                warn!(volume = %blocks.group(), error = %e, "sweep task failed");
                return;
            }
        }
    }
}
