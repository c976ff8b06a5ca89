//! The node's attachments on disk (`<data-dir>/attachments.json`), so a
//! restarted volumed knows which devices it hosted. Written atomically
//! (temporary file, fsync, rename, fsync of the directory): a crash leaves
//! either the old or the new list, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volumed_frontend::FrontendKind;

use crate::catalog::state::AccessMode;

const FILE: &str = "attachments.json";

/// One attachment as it is persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRecord {
    pub volume_id: Uuid,
    pub volume_name: String,
    pub mode: AccessMode,
    pub readonly: bool,
    /// Fencing generation of the catalog attachment this device writes with.
    pub generation: u64,
    pub frontend: FrontendKind,
    /// Device node of the last run (`/dev/loopN`, `/dev/nbdN`).
    pub device: PathBuf,
    pub attached_at_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileBody {
    version: u32,
    attachments: Vec<LocalRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid attachment list ({detail}); it was moved to {moved} and volumed starts without attachments")]
    Corrupt { path: PathBuf, detail: String, moved: String },
}

/// Reads and writes the attachment list of one data directory.
#[derive(Debug, Clone)]
pub struct Persistence {
    dir: PathBuf,
}

impl Persistence {
    pub fn new(data_dir: &Path) -> Persistence {
        Persistence { dir: data_dir.to_path_buf() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The persisted list; empty when there is none. A file that cannot be
    /// parsed is moved aside (never silently overwritten) and reported.
    pub fn load(&self) -> Result<Vec<LocalRecord>, PersistError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(PersistError::Io { path, source }),
        };
        match serde_json::from_slice::<FileBody>(&bytes) {
            Ok(body) => Ok(body.attachments),
            Err(e) => {
                let moved = self.dir.join(format!("{FILE}.corrupt-{}", crate::catalog::service::now_ms()));
                std::fs::rename(&path, &moved).map_err(|source| PersistError::Io { path: path.clone(), source })?;
                Err(PersistError::Corrupt { path, detail: e.to_string(), moved: moved.display().to_string() })
            }
        }
    }

    /// Replaces the persisted list with `records`.
    pub fn save(&self, records: &[LocalRecord]) -> Result<(), PersistError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PersistError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let body = FileBody { version: 1, attachments: records.to_vec() };
        let text = serde_json::to_vec_pretty(&body)
            .map_err(|e| PersistError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&text).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> LocalRecord {
        LocalRecord {
            volume_id: Uuid::from_bytes([n; 16]),
            volume_name: format!("pv-{n}"),
            mode: AccessMode::SingleNodeWriter,
            readonly: n.is_multiple_of(2),
            generation: n as u64,
            frontend: FrontendKind::FuseLoop,
            device: PathBuf::from(format!("/dev/loop{n}")),
            attached_at_ms: 1000 + n as i64,
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persistence::new(dir.path());
        assert!(p.load().unwrap().is_empty());
        let list = vec![record(1), record(2)];
        p.save(&list).unwrap();
        assert_eq!(p.load().unwrap(), list);
        p.save(&[]).unwrap();
        assert!(p.load().unwrap().is_empty());
        assert!(!dir.path().join("attachments.json.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_moved_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persistence::new(dir.path());
        std::fs::write(p.path(), b"{not json").unwrap();
        let e = p.load().unwrap_err().to_string();
        assert!(e.contains("not a valid attachment list"), "{e}");
        assert!(!p.path().exists());
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("attachments.json.corrupt-"));
        assert!(kept, "the corrupt file must be kept for inspection");
        assert!(p.load().unwrap().is_empty());
    }
}
