//! The node's attachments on disk (`<data-dir>/attachments.json`), so a
//! restarted volumed knows which devices it hosted (see [`crate::persist`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volumed_frontend::FrontendKind;

use crate::catalog::state::AccessMode;
use crate::persist::JsonList;

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

pub use crate::persist::PersistError;

/// Reads and writes the attachment list of one data directory.
#[derive(Debug, Clone)]
pub struct Persistence(JsonList<LocalRecord>);

impl Persistence {
    pub fn new(data_dir: &Path) -> Persistence {
        Persistence(JsonList::new(data_dir, "attachments", "attachment list"))
    }

    pub fn path(&self) -> PathBuf {
        self.0.path()
    }

    /// The persisted list; empty when there is none. A file that cannot be
    /// parsed is moved aside (never silently overwritten) and reported.
    pub fn load(&self) -> Result<Vec<LocalRecord>, PersistError> {
        self.0.load()
    }

    /// Replaces the persisted list with `records`.
    pub fn save(&self, records: &[LocalRecord]) -> Result<(), PersistError> {
        self.0.save(records)
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
