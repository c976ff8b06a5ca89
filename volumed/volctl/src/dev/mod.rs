//! `volctl dev up/down`: a local multi-node cluster of real volumed
//! processes on loopback addresses with the CSI plugins (one controller, a
//! node plugin per node), described by `<state-dir>/cluster.json`.

pub mod cleanup;
pub mod csi;
pub mod down;
pub mod process;
pub mod up;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::CliError;

/// How long stopped processes get between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// A progress line on stderr. A closed stderr (`volctl dev up 2>&1 | head`)
/// must not abort a half-started cluster, so errors are ignored.
pub fn note(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// `dir` made absolute against the working directory (it need not exist).
pub fn absolute(dir: &Path) -> Result<PathBuf, CliError> {
    if dir.is_absolute() {
        return Ok(dir.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| CliError::io("read the working directory", e))?;
    Ok(cwd.join(dir))
}
