//! Processes of the dev cluster: started detached (own session, log file,
//! clean environment), recognised again by /proc before any signal is sent,
//! and stopped with SIGTERM, then SIGKILL.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Environment variables a child keeps. Everything else goes: proxy
/// settings would send gRPC to the proxy, and the caller's VOLUMED_* would
/// override the flags volctl passes.
const KEPT_ENV: [&str; 9] =
    ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "RUST_LOG", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn clean_env() -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> =
        KEPT_ENV.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect();
    env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
    env
}

/// Starts `args` in its own session with stdin from /dev/null and
/// stdout/stderr appended to `log`, so it outlives volctl and its terminal.
pub fn spawn_detached(args: &[String], env: &BTreeMap<String, String>, log: &Path) -> std::io::Result<Child> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command line"))?;
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(rest).env_clear().envs(env).stdin(Stdio::null()).stdout(out).stderr(err).current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd.spawn()
}

/// Alive and not a zombie.
pub fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which may itself contain ')'.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}

/// File name of the process's executable ("volumed"), if it can be read.
pub fn exe_name(pid: u32) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    // A binary rebuilt while running shows as "volumed (deleted)".
    Some(name.strip_suffix(" (deleted)").unwrap_or(&name).to_string())
}

pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// Binaries `dev down` may signal.
pub fn is_cluster_binary(name: &str) -> bool {
    name.starts_with("volumed") || name.starts_with("csi-")
}

/// Whether `pid` still is the process recorded: a volumed/csi-* binary
/// with the recorded command line (or, without one, a command line naming
/// the state directory). A recycled pid never matches.
pub fn is_ours(pid: u32, recorded_args: Option<&[String]>, state_dirs: &[&Path]) -> bool {
    if pid == 0 || !is_running(pid) {
        return false;
    }
    let name_ok = exe_name(pid)
        .or_else(|| {
            cmdline(pid)?.first().and_then(|a| Path::new(a).file_name().map(|f| f.to_string_lossy().into_owned()))
        })
        .is_some_and(|n| is_cluster_binary(&n));
    if !name_ok {
        return false;
    }
    let Some(cmd) = cmdline(pid) else {
        return false;
    };
    match recorded_args {
        Some(args) if !args.is_empty() => cmd == args,
        _ => state_dirs.iter().any(|d| {
            let d = d.to_string_lossy();
            cmd.iter().any(|a| a.contains(d.as_ref()))
        }),
    }
}

/// Outcome of stopping one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Exited after SIGTERM.
    Terminated,
    /// Needed SIGKILL.
    Killed,
    /// Still there after SIGKILL (stuck in the kernel, e.g. on a dead FUSE mount).
    Stuck,
}

/// SIGTERM to every pid, up to `grace` for them to exit, SIGKILL to the
/// rest. Only pass pids that [`is_ours`] accepted.
pub fn terminate(pids: &[u32], grace: Duration) -> Vec<(u32, Stopped)> {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|p| is_running(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = Vec::new();
    let mut killed = Vec::new();
    for pid in pids {
        if is_running(*pid) {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            killed.push(*pid);
        } else {
            out.push((*pid, Stopped::Terminated));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && killed.iter().any(|p| is_running(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in killed {
        out.push((pid, if is_running(pid) { Stopped::Stuck } else { Stopped::Killed }));
    }
    out
}

/// Stops children this volctl started (and reaps them).
pub fn stop_children(children: &mut [Child], grace: Duration) {
    for c in children.iter() {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        let all_done = children.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))));
        if all_done || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for c in children.iter_mut() {
        if !matches!(c.try_wait(), Ok(Some(_))) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last `n` lines of a log, each cut to a readable length.
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return format!("    (no log at {})\n", path.display());
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        let cut: String = l.chars().take(400).collect();
        out.push_str("    ");
        out.push_str(&cut);
        if cut.len() < l.len() {
            out.push('…');
        }
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("    (log is empty)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_env_has_no_proxies_and_a_path() {
        let env = clean_env();
        assert!(env.contains_key("PATH"));
        for k in env.keys() {
            assert!(!k.to_lowercase().contains("proxy"), "{k}");
            assert!(!k.starts_with("VOLUMED_"), "{k}");
        }
    }

    #[test]
    fn detached_child_has_its_own_session_and_clean_env() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let args: Vec<String> =
            ["/bin/sh", "-c", "echo sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$; echo proxy=${http_proxy:-none}"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let mut env = clean_env();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        let mut child = spawn_detached(&args, &env, &log).unwrap();
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        let out = std::fs::read_to_string(&log).unwrap();
        let sid: u32 = out.split("sid=").nth(1).unwrap().split_whitespace().next().unwrap().trim().parse().unwrap();
        assert_eq!(sid, pid, "the child leads its own session: {out}");
        assert!(out.contains("proxy=none"), "{out}");
    }

    #[test]
    fn only_cluster_binaries_with_the_recorded_command_line_are_ours() {
        assert!(is_cluster_binary("volumed"));
        assert!(is_cluster_binary("csi-node"));
        assert!(!is_cluster_binary("sleep"));
        let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleep.id();
        wait_exec(pid, "sleep");
        assert!(is_running(pid));
        assert_eq!(exe_name(pid).as_deref(), Some("sleep"));
        assert_eq!(cmdline(pid).unwrap(), vec!["sleep", "30"]);
        let args = vec!["sleep".to_string(), "30".to_string()];
        assert!(!is_ours(pid, Some(&args), &[Path::new("/")]), "sleep is not a volumed");
        sleep.kill().unwrap();
        sleep.wait().unwrap();
        assert!(!is_running(pid));
        assert!(!is_ours(0, None, &[]));

        // The same program under a volumed name is ours only with the
        // recorded command line, or naming the state directory.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("volumed-fake");
        std::fs::copy(exe_path("sleep"), &fake).unwrap();
        let state = dir.path().join("state");
        let args: Vec<String> = vec![fake.to_string_lossy().into(), "30".into()];
        let mut child = Command::new(&fake).arg("30").spawn().unwrap();
        let pid = child.id();
        wait_exec(pid, "volumed-fake");
        assert!(is_ours(pid, Some(&args), &[]));
        assert!(!is_ours(pid, Some(&[args[0].clone(), "31".into()]), &[]), "another command line");
        assert!(!is_ours(pid, None, &[&state]), "does not name the state dir");
        assert!(is_ours(pid, None, &[dir.path()]));
        let stopped = terminate(&[pid], Duration::from_secs(5));
        // Our own child stays a zombie until reaped, which counts as gone.
        assert_eq!(stopped, vec![(pid, Stopped::Terminated)]);
        child.wait().unwrap();
    }

    /// Right after spawn the child may not have exec'd yet.
    fn wait_exec(pid: u32, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while exe_name(pid).as_deref() != Some(name) || cmdline(pid).is_none_or(|c| c.is_empty()) {
            assert!(Instant::now() < deadline, "{pid} never ran {name}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exe_path(name: &str) -> std::path::PathBuf {
        std::env::split_paths(&std::env::var_os("PATH").unwrap()).map(|d| d.join(name)).find(|p| p.exists()).unwrap()
    }

    #[test]
    fn log_tails_are_short() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("l");
        let long = "x".repeat(1000);
        std::fs::write(&log, format!("one\ntwo\nthree\n{long}\n")).unwrap();
        let t = log_tail(&log, 2);
        assert!(t.starts_with("    three\n    xxx"), "{t}");
        assert!(t.trim_end().ends_with('…'));
        assert!(log_tail(&dir.path().join("none"), 3).contains("no log at"));
    }
}
