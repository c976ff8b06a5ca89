//! Crash recovery: a child process attaches a device and is killed with
//! SIGKILL; `recover_stale` must find and clean what it left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use volumed_frontend::{attach, recover_stale, AttachOptions, FrontendKind};
use volumed_nbd::BlockDevice;

const HOLD_ENV: &str = "VOLUMED_FRONTEND_TEST_HOLD";

/// Not a test on its own: the body of the child process. It attaches a
/// device under the run dir named by the environment, reports the device
/// path, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "helper process for crash tests"]
async fn hold_attached_child() {
    let Ok(dir) = std::env::var(HOLD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let dev = FileDevice::create(&dir, 64 << 20);
    let d =
        attach(FrontendKind::FuseLoop, dev as Arc<dyn BlockDevice>, AttachOptions::new("crash-vol", dir.join("run")))
            .await
            .unwrap();
    let ready = dir.join("ready.tmp");
    std::fs::write(&ready, d.device_path().to_str().unwrap()).unwrap();
    std::fs::rename(&ready, dir.join("ready")).unwrap();
    std::mem::forget(d);
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_holder(dir: &Path) -> (KillOnDrop, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--exact", "hold_attached_child", "--ignored", "--nocapture"])
        .env(HOLD_ENV, dir)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = dir.join("ready");
    while !ready.exists() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("holder exited early: {status}");
        }
        assert!(Instant::now() < deadline, "holder did not attach in time");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dev = PathBuf::from(std::fs::read_to_string(&ready).unwrap());
    (child, dev)
}

fn crash(mut child: KillOnDrop) {
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

#[test]
fn recovers_an_unused_device_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let (child, loop_dev) = spawn_holder(tmp.path());
    assert_eq!(losetup_info(&loop_dev).unwrap().1, "1");
    crash(child);

    let found = recover_stale(&run_dir);
    eprintln!("recover_stale found: {found:?}");
    let ours: Vec<_> = found.iter().filter(|s| s.volume_id == "crash-vol").collect();
    assert_eq!(ours.len(), 1, "{found:?}");
    let s = ours[0];
    assert_eq!(s.kind, FrontendKind::FuseLoop);
    assert!(s.fuse_mountpoint.is_some(), "the dead FUSE mount was not found: {s:?}");
    assert!(!s.in_use);
    assert!(s.cleaned, "{s:?}");
    assert_nothing_left(&run_dir, "crash-vol", &loop_dev);

    // Idempotent: a second pass finds nothing.
    assert!(recover_stale(&run_dir).iter().all(|s| s.volume_id != "crash-vol"));
}

#[test]
fn reports_a_device_still_mounted_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let (child, loop_dev) = spawn_holder(tmp.path());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&loop_dev));
    let mut m = MountGuard::mount(&loop_dev, tmp.path().join("mnt"), "rw");
    crash(child);

    let found = recover_stale(&run_dir);
    eprintln!("recover_stale found: {found:?}");
    let s = found.iter().find(|s| s.volume_id == "crash-vol").unwrap_or_else(|| panic!("not found: {found:?}"));
    assert_eq!(s.device_path.as_deref(), Some(loop_dev.as_path()));
    assert!(s.in_use, "{s:?}");
    assert!(!s.cleaned);
    // The FUSE mount and its directory are gone already.
    assert!(!run_dir.join("fuse/crash-vol").exists());

    // Once its user lets go, the loop device goes away by itself.
    m.unmount();
    let deadline = Instant::now() + Duration::from_secs(10);
    let name = loop_dev.file_name().unwrap().to_str().unwrap().to_string();
    loop {
        let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
        if !backing.contains(run_dir.to_str().unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "loop device still bound to {backing}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_nothing_left(&run_dir, "crash-vol", &loop_dev);
}
