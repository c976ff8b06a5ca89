//! Our server, exercised by real third-party NBD clients: nbdinfo, nbdcopy
//! (libnbd-bin), qemu-img (qemu-utils) and fio's nbd engine.

mod common;

use std::sync::Arc;

use common::*;
use volumed_nbd::BlockDevice;

const MIB: u64 = 1 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    disk: std::path::PathBuf,
    server: TestServer,
}

/// A server with `vol` (writable, `size` bytes) and `ro` (read-only, 1 MiB).
async fn setup(size: u64) -> Setup {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let disk = make_file(&dir, "vol.img", size, false);
    let ro = make_file(&dir, "ro.img", MIB, true);
    let exports = Exports::with(vec![
        ("vol", FileDevice::open(&disk, false) as Arc<dyn BlockDevice>),
        ("ro", FileDevice::open(&ro, true) as Arc<dyn BlockDevice>),
    ]);
    let server = TestServer::start(Arc::new(exports)).await;
    Setup { _dir: tmp, dir, disk, server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_block_sizes() {
    require_tool("nbdinfo", "libnbd-bin");
    let s = setup(64 * MIB).await;

    let mut cmd = tool("nbdinfo");
    cmd.args(["--json", &s.server.uri("vol")]);
    let out = run_ok(cmd).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let export = &v["exports"][0];
    assert_eq!(export["export-name"], "vol", "{out}");
    assert_eq!(export["export-size"], 64 * MIB, "{out}");
    for (key, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
        ("can_cache", false),
        ("can_df", false),
    ] {
        assert_eq!(export[key], want, "{key} in {out}");
    }
    assert_eq!(export["block_size_minimum"], 512, "{out}");
    assert_eq!(export["block_size_preferred"], 4096, "{out}");
    assert_eq!(export["block_size_maximum"], 32 * MIB, "{out}");
    assert_eq!(v["protocol"], "newstyle-fixed", "{out}");

    let mut cmd = tool("nbdinfo");
    cmd.args(["--json", &s.server.uri("ro")]);
    let out = run_ok(cmd).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true, "{out}");
    assert_eq!(v["exports"][0]["export-size"], MIB, "{out}");

    let mut cmd = tool("nbdinfo");
    cmd.args(["--list", "--json", &format!("nbd://{}", s.server.addr)]);
    let out = run_ok(cmd).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ro", "vol"], "{out}");
    let descriptions: Vec<&str> =
        v["exports"].as_array().unwrap().iter().filter_map(|e| e["description"].as_str()).collect();
    assert!(descriptions.contains(&"test volume vol"), "{out}");

    // An unknown export is refused with a message naming it.
    let out = tool("nbdinfo").arg(s.server.uri("nope")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown export") || err.contains("nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_64_mib() {
    require_tool("nbdcopy", "libnbd-bin");
    let s = setup(64 * MIB).await;
    let src = make_file(&s.dir, "src.bin", 64 * MIB, true);
    let back = s.dir.join("back.bin");

    let mut cmd = tool("nbdcopy");
    cmd.arg(&src).arg(s.server.uri("vol"));
    run_ok(cmd).await;
    let mut cmd = tool("nbdcopy");
    cmd.arg(s.server.uri("vol")).arg(&back);
    run_ok(cmd).await;

    let want = file_bytes(&src);
    assert!(file_bytes(&s.disk) == want, "backing file differs from the source");
    assert!(file_bytes(&back) == want, "copy read back differs from the source");

    // A mostly-zero image exercises zero detection (write_zeroes/trim).
    let sparse = make_file(&s.dir, "sparse.bin", 64 * MIB, false);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&sparse).unwrap();
        f.write_all_at(&random_bytes(4096), 10 * MIB).unwrap();
    }
    let mut cmd = tool("nbdcopy");
    cmd.arg(&sparse).arg(s.server.uri("vol"));
    run_ok(cmd).await;
    assert!(file_bytes(&s.disk) == file_bytes(&sparse), "zeroed copy differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare() {
    require_tool("qemu-img", "qemu-utils");
    let s = setup(32 * MIB).await;
    let src = make_file(&s.dir, "src.raw", 32 * MIB, true);

    let mut cmd = tool("qemu-img");
    cmd.args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(s.server.uri("vol"));
    run_ok(cmd).await;

    let mut cmd = tool("qemu-img");
    cmd.args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(s.server.uri("vol"));
    let out = run_ok(cmd).await;
    assert!(out.contains("Images are identical"), "{out}");
    assert!(file_bytes(&s.disk) == file_bytes(&src));

    let mut cmd = tool("qemu-img");
    cmd.args(["info", "--output=json", &s.server.uri("vol")]);
    let out = run_ok(cmd).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"], 32 * MIB, "{out}");

    // A changed byte is noticed by compare (the comparison is real).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&s.disk).unwrap();
        let old = file_bytes(&src)[5 * MIB as usize];
        f.write_all_at(&[old ^ 0xff], 5 * MIB).unwrap();
    }
    let out = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.server.uri("vol"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_with_crc32c_verify() {
    require_tool("fio", "fio");
    let help = tool("fio").arg("--enghelp=nbd").output().unwrap();
    assert!(
        help.status.success() && String::from_utf8_lossy(&help.stdout).contains("uri"),
        "this fio has no nbd ioengine: install Debian's `fio` built with libnbd"
    );
    let s = setup(64 * MIB).await;
    let mut cmd = tool("fio");
    // fio writes its verify state file into the working directory.
    cmd.current_dir(&s.dir);
    cmd.args([
        "--name=nbd-verify",
        "--ioengine=nbd",
        &format!("--uri={}", s.server.uri("vol")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]);
    let out = run_ok(cmd).await;
    let json_start = out.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap_or_else(|e| panic!("{e}: {out}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert_eq!(written, 32 * MIB, "{out}");
    assert_eq!(verified, 32 * MIB, "fio must read back everything it wrote: {out}");
}
