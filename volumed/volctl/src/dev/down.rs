//! `volctl dev down`: stop the dev cluster's processes, clean up what they
//! left in the kernel, remove the state directory.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::cleanup::{loops_below, mounts_below, release_loop, unmount_below};
use super::process::{self, Stopped};
use super::{absolute, note, STOP_GRACE};
use crate::cli::{DownArgs, Output};
use crate::error::CliError;
use crate::render::json;
use crate::state::{ClusterFile, FILE_NAME};

#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    pub state_dir: PathBuf,
    pub stopped: Vec<StoppedProcess>,
    /// Recorded pids that no longer run a process of this cluster.
    pub not_running: Vec<StoppedProcess>,
    pub unmounted: Vec<PathBuf>,
    pub released_loop_devices: Vec<String>,
    pub removed: bool,
}

#[derive(Debug, Serialize)]
pub struct StoppedProcess {
    pub label: String,
    pub pid: u32,
    /// "terminated", "killed", "stuck", or "" when not running.
    pub how: &'static str,
}

pub async fn down(args: &DownArgs, state_dir: &Path, output: Output) -> Result<String, CliError> {
    let dir = absolute(state_dir)?;
    let dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(match output {
                Output::Json => json(&DownReport { state_dir: dir, ..Default::default() }),
                Output::Table => format!("nothing to do: {} does not exist\n", dir.display()),
            });
        }
        Err(e) => return Err(CliError::io(format!("resolve {}", dir.display()), e)),
    };
    // Processes name the directory as it was given to `dev up`; compare both.
    let given = absolute(state_dir)?;
    let dirs: Vec<&Path> = if given == dir { vec![&dir] } else { vec![&dir, &given] };

    let cluster = match ClusterFile::load(&dir) {
        Ok(Some(c)) => c,
        Ok(None) if is_empty_dir(&dir) => ClusterFile::default(),
        Ok(None) => {
            return Err(CliError::Dev(format!(
                "{} has no {FILE_NAME}, so it is not a dev cluster's state directory; nothing was stopped or removed",
                dir.display()
            )))
        }
        Err(e) => {
            return Err(CliError::Dev(format!(
                "{e}; without it volctl cannot tell which processes to stop, so nothing was stopped or removed \
                 (stop them by hand, then remove {})",
                dir.display()
            )))
        }
    };

    let mut report = DownReport { state_dir: dir.clone(), ..Default::default() };
    let mut ours = Vec::new();
    for p in cluster.processes() {
        if process::is_ours(p.pid, p.args.as_deref(), &dirs) {
            ours.push(p);
        } else {
            report.not_running.push(StoppedProcess { label: p.label, pid: p.pid, how: "" });
        }
    }
    // Nodes hosting devices go first, while the rest of the cluster still
    // runs: releasing a device flushes it to its volume's replicas, which
    // cannot happen once every peer is gone.
    let hosting: Vec<u32> = cluster
        .volumed
        .iter()
        .filter(|e| ours.iter().any(|p| p.pid == e.pid) && hosts_devices(&e.run_dir))
        .map(|e| e.pid)
        .collect();
    let rest: Vec<u32> = ours.iter().map(|p| p.pid).filter(|p| !hosting.contains(p)).collect();
    let mut outcome = Vec::new();
    for (group, what) in [(&hosting, "node(s) with attached devices"), (&rest, "process(es)")] {
        if !group.is_empty() {
            note(&format!("stopping {} {what}…", group.len()));
            outcome.extend(process::terminate(group, STOP_GRACE));
        }
    }
    let mut problems = Vec::new();
    for p in ours {
        let how = outcome.iter().find(|(pid, _)| *pid == p.pid).map(|(_, h)| *h).unwrap_or(Stopped::Stuck);
        if how == Stopped::Stuck {
            problems.push(format!("{} (pid {}) survived SIGKILL", p.label, p.pid));
        }
        report.stopped.push(StoppedProcess {
            label: p.label,
            pid: p.pid,
            how: match how {
                Stopped::Terminated => "terminated",
                Stopped::Killed => "killed",
                Stopped::Stuck => "stuck",
            },
        });
    }

    // Loop devices first: the kernel names a backing file by its path, and
    // once the mount holding it is detached that path no longer lies under
    // the state directory. A device still in use (a filesystem mounted on
    // it) is auto-cleared when the unmounts below close it.
    for l in loops_below(&dirs) {
        match release_loop(&l.device) {
            Ok(()) => report.released_loop_devices.push(l.device.display().to_string()),
            Err(e) => {
                problems.push(format!("release {} (backed by {}): {e}", l.device.display(), l.backing_file.display()))
            }
        }
    }
    let (unmounted, failed) = unmount_below(&dirs);
    report.unmounted = unmounted;
    problems.extend(failed);

    if !args.keep_data && problems.is_empty() {
        std::fs::remove_dir_all(&dir).map_err(|e| CliError::io(format!("remove {}", dir.display()), e))?;
        report.removed = true;
    }
    let text = match output {
        Output::Json => json(&report),
        Output::Table => report_text(&report, args.keep_data),
    };
    if !problems.is_empty() {
        return Err(CliError::Failed {
            output: text,
            message: format!(
                "dev down could not clean up everything: {}; {} was kept, run `volctl dev down` again once resolved",
                problems.join("; "),
                dir.display()
            ),
        });
    }
    Ok(text)
}

/// A FUSE mount or loop device below a node's run directory.
fn hosts_devices(run_dir: &Path) -> bool {
    let mounted =
        std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| !mounts_below(&info, run_dir).is_empty());
    mounted || !loops_below(&[run_dir]).is_empty()
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

fn report_text(r: &DownReport, keep_data: bool) -> String {
    let mut out = String::new();
    if r.stopped.is_empty() {
        out.push_str("no process of the dev cluster was running\n");
    }
    for p in &r.stopped {
        out.push_str(&format!("stopped {} (pid {}): {}\n", p.label, p.pid, p.how));
    }
    for m in &r.unmounted {
        out.push_str(&format!("unmounted {}\n", m.display()));
    }
    for l in &r.released_loop_devices {
        out.push_str(&format!("released {l}\n"));
    }
    if r.removed {
        out.push_str(&format!("removed {}\n", r.state_dir.display()));
    } else if keep_data {
        out.push_str(&format!(
            "kept {} (--keep-data); `volctl dev up` restarts the cluster from it\n",
            r.state_dir.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_dir_is_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let out = down(&DownArgs { keep_data: false }, &dir.path().join("none"), Output::Table).await.unwrap();
        assert!(out.starts_with("nothing to do"), "{out}");
    }

    #[tokio::test]
    async fn a_foreign_dir_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious"), "data").unwrap();
        let e = down(&DownArgs { keep_data: false }, dir.path(), Output::Table).await.unwrap_err().to_string();
        assert!(e.contains("not a dev cluster's state directory"), "{e}");
        assert!(dir.path().join("precious").exists());
        std::fs::write(dir.path().join(FILE_NAME), "{").unwrap();
        let e = down(&DownArgs { keep_data: false }, dir.path(), Output::Table).await.unwrap_err().to_string();
        assert!(e.contains("cluster.json") && e.contains("nothing was stopped"), "{e}");
        assert!(dir.path().join("precious").exists());
    }

    #[tokio::test]
    async fn recorded_pids_of_other_programs_are_not_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mut sleep = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let text = format!(
            r#"{{"volumed":[], "state_dir":"{}", "csi_controller_process":{{"endpoint":"unix:///x.sock",
                "pid":{},"log":"/x.log","args":["sleep","60"]}}}}"#,
            state.display(),
            sleep.id()
        );
        std::fs::write(state.join(FILE_NAME), text).unwrap();
        let out = down(&DownArgs { keep_data: true }, &state, Output::Json).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["stopped"], serde_json::json!([]));
        assert_eq!(v["not_running"][0]["pid"], sleep.id());
        assert_eq!(v["removed"], false);
        assert!(sleep.try_wait().unwrap().is_none(), "sleep was killed");
        assert!(state.join(FILE_NAME).exists());
        sleep.kill().unwrap();
        sleep.wait().unwrap();
    }
}
