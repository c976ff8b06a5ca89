//! Shared helpers of volctl's integration tests: run the real binary with a
//! clean environment, find the volumed binary, and a guard that tears a dev
//! cluster down even when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn volctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_volctl"))
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn describe(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }

    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "{}", self.describe());
        self
    }

    /// Failed with `code`, and stderr holds every needle.
    pub fn fails(self, code: i32, needles: &[&str]) -> Run {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}: {}", self.describe());
        }
        self
    }
}

/// Runs volctl with only PATH and `env` set (no proxies, no VOLUMED_* of
/// the caller), killing it after `limit`.
pub fn run_with(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let mut cmd = Command::new(volctl());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn volctl");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("volctl {args:?} ran over {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out: Output = child.wait_with_output().expect("wait");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_with(args, env, Duration::from_secs(120))
}

/// The volumed binary: $VOLUMED_BIN, else next to volctl (a workspace
/// `cargo test` builds it there).
pub fn volumed_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VOLUMED_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "VOLUMED_BIN={} is not a file", p.display());
        return p;
    }
    let beside = volctl().parent().unwrap().join("volumed");
    assert!(
        beside.is_file(),
        "no volumed binary at {}: build it with `cargo build -p volumed --bins` in this target dir, or set \
         VOLUMED_BIN (e.g. VOLUMED_BIN=/work/main/target/debug/volumed)",
        beside.display()
    );
    beside
}

/// A loopback /24 no other test (or dev cluster on 127.0.0.x) uses.
pub fn first_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("127.{}.{}.2", 100 + std::process::id() % 100, 10 + n)
}

pub fn is_running(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).unwrap_or("");
            !matches!(state, "Z" | "X" | "")
        }
        Err(_) => false,
    }
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&format!("{d}/")))
        .map(str::to_string)
        .collect()
}

/// (device, backing file) of bound loop devices whose file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(bf) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let bf = bf.trim().trim_end_matches(" (deleted)").to_string();
            if Path::new(&bf).starts_with(dir) {
                out.push((format!("/dev/{name}"), bf));
            }
        }
    }
    out
}

/// A state directory for `volctl dev up`, torn down on drop: `volctl dev
/// down`, then, should that fail, SIGKILL to every process naming the
/// directory, lazy unmounts and loop releases under it.
pub struct DevDir {
    pub dir: tempfile::TempDir,
}

impl DevDir {
    pub fn new() -> DevDir {
        // Short path: node sockets live below it (108-byte limit).
        let dir = tempfile::Builder::new().prefix("vctl").tempdir_in("/tmp").unwrap();
        DevDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("VOLUMED_STATE_DIR", self.path_str())]
    }

    pub fn cluster_json(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path().join("cluster.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    pub fn pids(&self) -> Vec<u64> {
        match std::fs::read_to_string(self.path().join("cluster.json")) {
            Ok(t) => serde_json::from_str::<serde_json::Value>(&t)
                .ok()
                .and_then(|v| v["volumed"].as_array().map(|a| a.iter().filter_map(|n| n["pid"].as_u64()).collect()))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for DevDir {
    fn drop(&mut self) {
        if !self.path().exists() {
            return;
        }
        let dir = self.path_str();
        let _ = run_with(&["dev", "down", "--state-dir", &dir], &[], Duration::from_secs(90));
        if !self.path().exists() {
            return;
        }
        // dev down failed: kill whatever still names the directory.
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    continue;
                };
                if pid as u32 != std::process::id() && String::from_utf8_lossy(&cmd).contains(&format!("{dir}/")) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut m = mounts_under(self.path());
        m.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for mnt in m {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
        for (dev, _) in loops_under(self.path()) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}
