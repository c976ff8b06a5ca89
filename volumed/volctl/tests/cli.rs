//! volctl without a cluster: argument errors, endpoint errors, the script
//! and docs invocations, `dev up` failures, and `dev down`'s cleanup of
//! mounts and loop devices under the state directory.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn empty_state() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn usage_errors_exit_2_with_clap_messages() {
    let s = empty_state();
    let st = s.path().to_str().unwrap();
    let env = [("VOLUMED_STATE_DIR", st)];
    run(&["volume", "create", "v", "--size", "lots"], &env).fails(2, &["--size", "not a size"]);
    run(&["volume", "create", "v", "--size", "0"], &env).fails(2, &["greater than 0"]);
    run(&["volume", "create", "v", "--size", "1Gi", "--replicas", "0"], &env).fails(2, &["--replicas"]);
    run(&["volume", "resize", "v", "--size", "12XB"], &env).fails(2, &["unknown size unit"]);
    run(&["volume", "create", "--size", "1Gi"], &env).fails(2, &["<NAME>"]);
    run(&["-o", "yaml", "volume", "list"], &env).fails(2, &["yaml"]);
    run(&["no-such-command"], &env).fails(2, &["no-such-command"]);
    run(&["dev", "up", "--node-down-grace", "a-while"], &env).fails(2, &["not a duration"]);
}

#[test]
fn the_invocations_of_the_node_gc_script_and_the_docs_parse() {
    let env = [("VOLUMED_ENDPOINT", "http://127.0.0.1:1")];
    for argv in [
        &["--output", "json", "node", "list", "--help"][..],
        &["node", "remove", "node-a", "--help"],
        &["--endpoint", "http://volumed-api.volumed-system.svc.cluster.local:7400", "cluster", "status", "--help"],
        &["--endpoint", "http://volumed-api.volumed-system.svc.cluster.local:7400", "volume", "list", "--help"],
        &["volume", "delete", "pvc-1", "--help"],
        &["node", "list", "--help"],
    ] {
        run(argv, &env).ok();
    }
}

#[test]
fn without_an_endpoint_it_says_to_start_a_cluster() {
    let s = empty_state();
    let st = s.path().to_str().unwrap();
    run(&["volume", "list"], &[("VOLUMED_STATE_DIR", st)]).fails(1, &["volctl dev up", "--endpoint"]);
    run(&["cluster", "status", "--state-dir", st], &[]).fails(1, &["volctl dev up", st]);
}

#[test]
fn an_unreachable_endpoint_is_one_clear_line() {
    let s = empty_state();
    let st = s.path().to_str().unwrap();
    for env in
        [vec![("VOLUMED_STATE_DIR", st), ("VOLUMED_ENDPOINT", "http://127.0.0.1:1")], vec![("VOLUMED_STATE_DIR", st)]]
    {
        let args: &[&str] = if env.len() == 2 {
            &["volume", "get", "x"]
        } else {
            &["--endpoint", "http://127.0.0.1:1", "volume", "get", "x"]
        };
        let r = run(args, &env).fails(1, &["cannot reach volumed at http://127.0.0.1:1", "volctl dev up"]);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.describe());
        assert!(r.stdout.is_empty());
    }
    run(&["--endpoint", "https://127.0.0.1:1", "node", "list"], &[("VOLUMED_STATE_DIR", st)])
        .fails(1, &["TLS", "http://HOST:PORT"]);
}

#[test]
fn local_commands_need_a_node_socket() {
    let s = empty_state();
    let st = s.path().to_str().unwrap();
    let env = [("VOLUMED_STATE_DIR", st)];
    run(&["volume", "attach", "v"], &env).fails(1, &["--node-socket"]);
    run(&["volume", "attachments", "--endpoint", "http://10.9.9.9:7400"], &env)
        .fails(1, &["--node-socket", "10.9.9.9"]);
    let missing = s.path().join("volumed.sock");
    run(&["volume", "detach", "v", "--node-socket", missing.to_str().unwrap()], &env)
        .fails(1, &["cannot reach the node-local volumed", "volumed.sock"]);
}

fn script(dir: &Path, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("volumed");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn dev_up_reports_a_node_that_dies_with_its_log() {
    let bins = tempfile::tempdir().unwrap();
    let bin = script(bins.path(), "echo \"volumed says: cannot open the data dir for $2\" >&2; exit 3");
    let d = DevDir::new();
    let st = d.path_str();
    let ip = first_ip();
    let r = run(&["dev", "up", "--state-dir", &st, "--volumed-bin", &bin, "--first-ip", &ip, "--timeout", "60s"], &[])
        .fails(
            1,
            &["did not become ready", "exited during startup", "volumed says: cannot open the data dir for node-"],
        );
    assert!(r.stderr.contains("volctl dev down"), "{}", r.describe());
    for pid in d.pids() {
        assert!(!is_running(pid), "pid {pid} still runs");
    }
    run(&["dev", "down", "--state-dir", &st], &[]).ok();
    assert!(!d.path().exists());
}

#[test]
fn dev_up_gives_up_after_the_timeout_and_stops_what_it_started() {
    let bins = tempfile::tempdir().unwrap();
    // Starts, logs, never answers.
    let bin = script(bins.path(), "echo \"fake volumed $2 listening nowhere\"; exec sleep 300");
    let d = DevDir::new();
    let st = d.path_str();
    let ip = first_ip();
    let r = run(
        &["dev", "up", "--nodes", "2", "--state-dir", &st, "--volumed-bin", &bin, "--first-ip", &ip, "--timeout", "3s"],
        &[],
    )
    .fails(1, &["did not become ready", "not ready after 3s", "fake volumed node-1", "fake volumed node-2"]);
    let cluster = d.cluster_json();
    assert_eq!(cluster["volumed"].as_array().unwrap().len(), 2, "{}", r.describe());
    let pids = d.pids();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(!is_running(pid), "pid {pid} was left running");
    }
}

#[test]
fn dev_up_refuses_a_directory_that_is_not_its_own() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("notes.txt"), "mine").unwrap();
    let bins = tempfile::tempdir().unwrap();
    let bin = script(bins.path(), "exit 0");
    run(&["dev", "up", "--state-dir", d.path().to_str().unwrap(), "--volumed-bin", &bin], &[])
        .fails(1, &["not empty", "--state-dir"]);
    run(&["dev", "down", "--state-dir", d.path().to_str().unwrap()], &[]).fails(1, &["nothing was stopped or removed"]);
    assert!(d.path().join("notes.txt").exists());
}

#[test]
fn dev_down_of_nothing_is_fine() {
    let s = empty_state();
    let gone = s.path().join("never-created");
    let r = run(&["dev", "down", "--state-dir", gone.to_str().unwrap()], &[]).ok();
    assert!(r.stdout.contains("nothing to do"), "{}", r.describe());
}

/// Root only (mount, losetup): this machine and CI run tests as root.
#[test]
fn dev_down_unmounts_and_releases_exactly_the_loop_devices_under_the_state_dir() {
    let d = DevDir::new();
    let st = d.path_str();
    std::fs::write(d.path().join("cluster.json"), format!(r#"{{"volumed": [], "state_dir": "{st}"}}"#)).unwrap();
    // What a crashed volumed leaves: a mount below the run dir, a
    // filesystem mounted on it, and a loop device over a file inside.
    let run_dir = d.path().join("node-1/run");
    let mnt = run_dir.join("fuse/vol");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt.to_str().unwrap()]);
    let inner = mnt.join("inner");
    std::fs::create_dir(&inner).unwrap();
    sh(&["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", inner.to_str().unwrap()]);
    let img = mnt.join("image");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let ours = Loop::attach(&img);
    // A loop device of someone else, outside the state dir: must survive.
    let other_dir = tempfile::tempdir().unwrap();
    let other_img = other_dir.path().join("other.img");
    std::fs::write(&other_img, vec![0u8; 1 << 20]).unwrap();
    let theirs = Loop::attach(&other_img);

    assert_eq!(mounts_under(d.path()).len(), 2);
    let r = run(&["dev", "down", "--state-dir", &st, "-o", "json"], &[]).ok();
    let report = r.json();
    assert_eq!(report["removed"], true, "{}", r.describe());
    assert_eq!(report["unmounted"].as_array().unwrap().len(), 2, "{}", r.describe());
    assert_eq!(report["released_loop_devices"], serde_json::json!([ours.device.clone()]), "{}", r.describe());
    assert!(mounts_under(d.path()).is_empty());
    assert!(!d.path().exists());
    // The kernel may finish an auto-clear a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ours.bound_to(&img) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!ours.bound_to(&img), "{} still bound", ours.device);
    assert!(theirs.bound_to(&other_img), "{} (outside the state dir) was released", theirs.device);
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

/// A loop device this test attached; released on drop if still bound to
/// its file (and only then: the number may be reused by someone else).
struct Loop {
    device: String,
    file: std::path::PathBuf,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Loop { device, file: file.to_path_buf() }
    }

    fn bound_to(&self, file: &Path) -> bool {
        let name = self.device.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .is_ok_and(|b| Path::new(b.trim().trim_end_matches(" (deleted)")) == file)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.bound_to(&self.file) {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
    }
}
