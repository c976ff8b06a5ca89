//! Running the filesystem tools (blkid, mkfs, resize2fs, xfs_growfs) with a
//! deadline, no stdin (so a tool that would ask a question gets EOF and
//! says no) and captured output.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, Clone)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stderr (or stdout when stderr is empty), trimmed, for messages.
    pub fn diagnostics(&self) -> String {
        let s = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        s.trim().replace('\n', "; ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?} and was killed")]
    Timeout { program: String, timeout: Duration },
}

/// Runs `program args...`; the child is killed when the deadline passes.
pub async fn run(program: &str, args: &[&OsStr], timeout: Duration) -> Result<Output, CmdError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Tools must not translate messages we match on.
        .env("LC_ALL", "C");
    let child = cmd.spawn().map_err(|source| CmdError::Spawn { program: program.to_string(), source })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(CmdError::Spawn { program: program.to_string(), source }),
        Err(_) => Err(CmdError::Timeout { program: program.to_string(), timeout }),
    }
}
