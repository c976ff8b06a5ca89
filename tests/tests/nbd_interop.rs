//! Standard NBD clients against volumed's exports: libnbd's nbdinfo and
//! nbdcopy, qemu-img and qemu-io, and fio's nbd engine. Each one also goes
//! through a follower's NBD address, which forwards to the volume's leader.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::tools::{self, random_file};

/// A node holding a replica that is not the leader (forwarding path).
async fn follower_of(cluster: &Cluster, v: &pb::Volume) -> usize {
    let leader = cluster.leader_index(&v.id).await;
    for r in &v.replicas {
        let i = cluster.index_of(r.node_id).await;
        if i != leader {
            return i;
        }
    }
    panic!("no follower of {}", v.id)
}

fn nbdinfo_json(uri: &str) -> Value {
    let out = tools::run("nbdinfo", &["--json", uri]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo JSON: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn export_of(info: &Value) -> &Value {
    &info["exports"][0]
}

async fn wait_used(cluster: &Cluster, id: &str, want: u64) -> pb::Volume {
    cluster.wait_volume(id, Duration::from_secs(60), &format!("used_bytes == {want}"), |v| v.used_bytes == want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdinfo_shows_size_flags_and_every_volume() {
    tools::require("nbdinfo", "libnbd-bin");
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let a = cluster.create_volume("info-a", 48 << 20, 3).await;
    let b = cluster.create_volume("info-b", 16 << 20, 1).await;
    let leader = cluster.leader_index(&a.id).await;
    let follower = follower_of(&cluster, &a).await;

    for (what, node) in [("leader", leader), ("follower", follower)] {
        let info = nbdinfo_json(&cluster.node(node).nbd_uri(&a.id));
        let e = export_of(&info);
        println!("nbdinfo via the {what}: {e}");
        assert_eq!(e["export-size"], 48u64 << 20, "{what}: {e}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
            assert_eq!(e[flag], true, "{what}: {flag} in {e}");
        }
        assert_eq!(e["is_read_only"], false, "{what}: {e}");
        assert_eq!(e["block_size_preferred"], 4096, "{what}: {e}");
    }
    // The single-replica volume through a node that holds no replica.
    let holder = cluster.index_of(b.replicas[0].node_id).await;
    let other = (0..3).find(|i| *i != holder).unwrap();
    let e = nbdinfo_json(&cluster.node(other).nbd_uri(&b.id));
    assert_eq!(export_of(&e)["export-size"], 16u64 << 20);

    // Every node lists every volume.
    for i in 0..3 {
        let out = tools::run("nbdinfo", &["--list", "--json", &format!("nbd://{}", cluster.node(i).nbd)]);
        let list: Value = serde_json::from_slice(&out.stdout).expect("list JSON");
        let names: Vec<&str> =
            list["exports"].as_array().expect("exports").iter().map(|e| e["export-name"].as_str().unwrap()).collect();
        assert!(names.contains(&a.id.as_str()) && names.contains(&b.id.as_str()), "node {i} lists {names:?}");
        assert_eq!(names.len(), 2, "node {i} lists {names:?}");
        let desc: Vec<&str> =
            list["exports"].as_array().unwrap().iter().filter_map(|e| e["description"].as_str()).collect();
        assert!(desc.iter().any(|d| d.contains("info-a")), "descriptions name the volumes: {desc:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_and_qemu_img_roundtrip_through_followers() {
    tools::require("nbdcopy", "libnbd-bin");
    tools::require("qemu-img", "qemu-utils");
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let size = 32u64 << 20;
    let v = cluster.create_volume("copy", size, 3).await;
    let leader = cluster.leader_index(&v.id).await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    let dir = cluster.path();
    let src = dir.join("src.img");
    random_file(&src, size as usize, 42);
    let src_s = src.to_str().unwrap();
    let t = Instant::now();
    tools::run("nbdcopy", &[src_s, &cluster.node(followers[0]).nbd_uri(&v.id)]);
    println!("nbdcopy in (via follower): {} ms", t.elapsed().as_millis());

    let back = dir.join("back.img");
    tools::run("nbdcopy", &[&cluster.node(followers[1]).nbd_uri(&v.id), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap(), "nbdcopy out differs from what went in");

    let conv = dir.join("conv.raw");
    tools::run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &cluster.node(followers[0]).nbd_uri(&v.id), conv.to_str().unwrap()],
    );
    assert!(std::fs::read(&conv).unwrap() == std::fs::read(&src).unwrap(), "qemu-img convert output differs");
    let out =
        tools::run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &cluster.node(leader).nbd_uri(&v.id)]);
    println!("qemu-img compare: {}", String::from_utf8_lossy(&out.stdout).trim());

    // compare can fail: change one byte of the source and it must notice.
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[12345678] ^= 1;
    std::fs::write(&src, bytes).unwrap();
    let out =
        tools::try_run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &cluster.node(leader).nbd_uri(&v.id)]);
    assert_eq!(out.status.code(), Some(1), "qemu-img compare must report the difference: {out:?}");
}

fn fio(uri: &str, extra: &[&str], workdir: &std::path::Path) -> std::process::Output {
    let uri_arg = format!("--uri={uri}");
    let mut args = vec![
        "--name=volumed",
        "--ioengine=nbd",
        uri_arg.as_str(),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--output-format=normal",
    ];
    args.extend_from_slice(extra);
    // fio saves its verify state (`local-volumed-0-verify.state`) in its
    // working directory: the test's own temporary one, removed after it.
    let mut cmd = std::process::Command::new("fio");
    volumed_tests::cluster::clean_env(&mut cmd).args(&args).current_dir(workdir);
    cmd.output().unwrap_or_else(|e| panic!("cannot run fio: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_randwrite_with_crc32c_verify_then_a_verify_pass_elsewhere() {
    tools::require("fio", "fio");
    tools::require("qemu-io", "qemu-utils");
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let v = cluster.create_volume("fio", 32 << 20, 3).await;
    let leader = cluster.leader_index(&v.id).await;
    let follower = follower_of(&cluster, &v).await;

    let workdir = tempfile::tempdir().expect("temp dir for fio");
    let out = fio(&cluster.node(leader).nbd_uri(&v.id), &[], workdir.path());
    assert!(
        out.status.success(),
        "fio write+verify failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", text.lines().filter(|l| l.contains("IOPS") || l.contains("verify")).collect::<Vec<_>>().join("\n"));

    // Read everything back through a follower and verify it again.
    let out = fio(&cluster.node(follower).nbd_uri(&v.id), &["--verify_only"], workdir.path());
    assert!(
        out.status.success(),
        "fio verify pass failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The verify pass can fail: zero 64 KiB in the middle and run it again.
    tools::run("qemu-io", &["-f", "raw", "-c", "write -z 8M 64k", &cluster.node(follower).nbd_uri(&v.id)]);
    let out = fio(&cluster.node(follower).nbd_uri(&v.id), &["--verify_only"], workdir.path());
    assert!(!out.status.success(), "fio must notice the zeroed range:\n{}", String::from_utf8_lossy(&out.stdout));
}

fn assert_zero(path: &Path, from: usize, to: usize) {
    let data = std::fs::read(path).unwrap();
    if let Some(p) = data[from..to].iter().position(|b| *b != 0) {
        panic!("byte {} of {} is not zero", from + p, path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trim_and_write_zeroes_read_back_zero_and_free_space() {
    tools::require("nbdcopy", "libnbd-bin");
    tools::require("qemu-io", "qemu-utils");
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let v = cluster.create_volume("trim", 32 << 20, 3).await;
    let follower = follower_of(&cluster, &v).await;
    let uri = cluster.node(follower).nbd_uri(&v.id);
    let src = cluster.path().join("data.img");
    random_file(&src, 16 << 20, 9);
    // nbdcopy writes the 16 MiB file at the start of the 32 MiB export.
    tools::run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    wait_used(&cluster, &v.id, 16 << 20).await;

    // Discard (NBD_CMD_TRIM) 8 MiB, write zeroes over 4 MiB more, and
    // zero an unaligned range inside the last 4 MiB.
    tools::run(
        "qemu-io",
        &["-f", "raw", "-c", "discard 0 8M", "-c", "write -z 8M 4M", "-c", "write -z 13000000 5000", &uri],
    );
    let back = cluster.path().join("back.img");
    tools::run("nbdcopy", &[&cluster.node(cluster.leader_index(&v.id).await).nbd_uri(&v.id), back.to_str().unwrap()]);
    assert_zero(&back, 0, 12 << 20);
    assert_zero(&back, 13_000_000, 13_005_000);
    let (got, want) = (std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());
    assert!(got[12 << 20..13_000_000] == want[12 << 20..13_000_000], "data after the zeroed range changed");
    assert!(got[13_005_000..16 << 20] == want[13_005_000..16 << 20], "data after the unaligned zeroes changed");
    assert_zero(&back, 16 << 20, 32 << 20);

    // Whole blocks zeroed are freed: 12 MiB, plus block 3174
    // (13000704..13004800) wholly inside the unaligned range, whose edge
    // blocks keep their remaining data.
    let v = wait_used(&cluster, &v.id, (4 << 20) - 4096).await;
    println!("used_bytes after trim/zero: {}", v.used_bytes);
}
