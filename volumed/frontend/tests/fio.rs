//! A quick fio random-write run on the FUSE+loop device and, for
//! comparison, on a plain loop device over a file. Prints the numbers; it
//! asserts only that I/O ran (speed is measured, never asserted).
//! `VOLUMED_FIO_RUNTIME` sets the seconds per run (default 10).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use volumed_frontend::{attach, AttachOptions, FrontendKind};
use volumed_nbd::BlockDevice;

const MIB: u64 = 1 << 20;

fn fio(dev: &Path, runtime: &str) -> (f64, String) {
    let out = run_ok(
        Command::new("fio")
            .arg("--name=randwrite")
            .arg(format!("--filename={}", dev.display()))
            .args([
                "--direct=1",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--ioengine=libaio",
                "--time_based",
                "--size=256M",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .arg(format!("--runtime={runtime}")),
    );
    // Terse v3: field 49 (1-based) is write IOPS.
    let line = out.lines().last().unwrap_or_default().to_string();
    let fields: Vec<&str> = line.split(';').collect();
    let iops: f64 = fields.get(48).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (iops, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_randwrite_fuse_loop_vs_plain_loop() {
    let runtime = std::env::var("VOLUMED_FIO_RUNTIME").unwrap_or_else(|_| "10".into());
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let dev = FileDevice::create(tmp.path(), 256 * MIB);
    let d =
        attach(FrontendKind::FuseLoop, dev.clone() as Arc<dyn BlockDevice>, AttachOptions::new("fio-vol", &run_dir))
            .await
            .unwrap();
    let mut g = DeviceGuard(Some(d));
    let loop_dev = g.dev().device_path().to_path_buf();
    let rt = runtime.clone();
    let ld = loop_dev.clone();
    let (fuse_iops, _) = tokio::task::spawn_blocking(move || fio(&ld, &rt)).await.unwrap();
    g.detach().await;
    assert_nothing_left(&run_dir, "fio-vol", &loop_dev);

    // The same on a plain loop device over a file on the same disk.
    let img = tmp.path().join("plain.img");
    std::fs::File::create(&img).unwrap().set_len(256 * MIB).unwrap();
    let plain =
        run_ok(Command::new("losetup").args(["-f", "--show", "--direct-io=on", "--sector-size", "4096"]).arg(&img))
            .trim()
            .to_string();
    struct Release(String);
    impl Drop for Release {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _release = Release(plain.clone());
    let rt = runtime.clone();
    let (plain_iops, _) = tokio::task::spawn_blocking(move || fio(Path::new(&plain), &rt)).await.unwrap();

    eprintln!("fio randwrite 4k iodepth=32 {runtime}s: fuse-loop {fuse_iops:.0} IOPS, plain loop {plain_iops:.0} IOPS");
    assert!(fuse_iops > 0.0 && plain_iops > 0.0);
    assert!(dev.writes.load(std::sync::atomic::Ordering::SeqCst) > 0);
}
