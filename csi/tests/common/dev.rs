//! A volumed dev cluster with its CSI plugins for one test: `volctl dev up`
//! in a fresh state directory on loopback addresses of its own, `volctl dev
//! down` on drop (and, should that fail, SIGKILL to whatever still names the
//! directory, lazy unmounts and loop releases below it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const PROXY_VARS: [&str; 8] =
    ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"];

/// `volctl`: $VOLCTL_BIN, else next to the test executable (a workspace
/// build puts every binary in target/<profile>; volctl finds volumed,
/// csi-controller and csi-node beside itself).
pub fn volctl() -> PathBuf {
    if let Some(p) = std::env::var_os("VOLCTL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("volctl");
    assert!(
        p.is_file(),
        "no volctl at {}: build the workspace binaries first (`cargo build --workspace --bins`), or set \
         VOLCTL_BIN, or point VOLUMED_CLUSTER_STATE at a running `volctl dev up` cluster",
        p.display()
    );
    for b in ["volumed", "csi-controller", "csi-node"] {
        assert!(
            dir.join(b).is_file(),
            "no {b} next to {}: build the workspace binaries first (`cargo build --workspace --bins`)",
            p.display()
        );
    }
    p
}

/// Runs volctl with a clean environment (no proxies, no VOLUMED_*),
/// killing it after `limit`.
fn run(args: &[&str], limit: Duration) -> Result<String, String> {
    let mut cmd = Command::new(volctl());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("VOLUMED_") || k.starts_with("CSI_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn volctl: {e}"))?;
    let deadline = Instant::now() + limit;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!("volctl {args:?} ran over {limit:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "volctl {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Node-1's address of the next cluster: 127.{251..254}.X.2, an /8 corner
/// no other suite of the workspace uses, distinct per test process and per
/// cluster within it.
fn first_ip(attempt: u32) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + attempt;
    let pid = std::process::id();
    format!("127.{}.{}.2", 251 + (pid / 50) % 4, (pid % 50) * 5 + n % 5)
}

pub struct DevCluster {
    dir: tempfile::TempDir,
}

impl DevCluster {
    /// Starts a 3-node cluster with its plugins and waits until volctl says
    /// everything answers.
    pub fn start() -> DevCluster {
        // Short path: node sockets live below it (108-byte limit).
        let dir = tempfile::Builder::new().prefix("vcsi").tempdir_in("/tmp").expect("state dir");
        let state = dir.path().to_string_lossy().into_owned();
        let mut last = String::new();
        for attempt in 0..5 {
            let ip = first_ip(attempt);
            let r = run(
                &["dev", "up", "--nodes", "3", "--state-dir", &state, "--first-ip", &ip, "--timeout", "180s"],
                Duration::from_secs(300),
            );
            match r {
                Ok(_) => return DevCluster { dir },
                // Another cluster holds these addresses: take the next ones.
                Err(e) if e.contains("cannot be used") => last = e,
                Err(e) => {
                    // Tears down whatever did start while unwinding.
                    let _cleanup = DevCluster { dir };
                    panic!("{e}");
                }
            }
        }
        let _cleanup = DevCluster { dir };
        panic!("no free loopback addresses for a dev cluster: {last}");
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    {}\n", l.chars().take(600).collect::<String>()))
        .collect()
}

/// The last lines of every process's log of the cluster in `dir`.
pub fn print_log_tails(dir: &Path) {
    if let Ok(c) = volumed_csi::harness::ClusterJson::load(dir) {
        for (label, log) in c.logs() {
            eprintln!("--- last lines of {label} ({}):\n{}", log.display(), tail(&log, 25));
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let dir = self.dir.path().to_path_buf();
        if std::thread::panicking() {
            print_log_tails(&dir);
        }
        let state = dir.to_string_lossy().into_owned();
        if let Err(e) = run(&["dev", "down", "--state-dir", &state], Duration::from_secs(120)) {
            eprintln!("dev down failed, cleaning up by hand: {e}");
        }
        if !dir.exists() {
            return;
        }
        kill_naming(&state);
        std::thread::sleep(Duration::from_millis(300));
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> =
            info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&format!("{state}/"))).collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(bf) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if name.starts_with("loop") && bf.trim().starts_with(&format!("{state}/")) {
                let _ = Command::new("losetup").arg("-d").arg(format!("/dev/{name}")).status();
            }
        }
    }
}

/// SIGKILL to every process whose command line names `dir`.
fn kill_naming(dir: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
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
