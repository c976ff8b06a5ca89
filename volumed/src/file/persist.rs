//! The node's file-volume mounts on disk (`<data-dir>/mounts.json`), so a
//! restarted volumed mounts them again (see [`crate::persist`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::state::AccessMode;
use crate::persist::JsonList;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub volume_id: Uuid,
    pub volume_name: String,
    pub target: PathBuf,
    pub readonly: bool,
    pub mode: AccessMode,
    /// Session of the mount's open handles in the volume; the next run
    /// ends it (its handles died with the process).
    pub session: u64,
    pub mounted_at_ms: i64,
}

pub use crate::persist::PersistError;

/// Reads and writes the mount list of one data directory.
#[derive(Debug, Clone)]
pub struct MountPersistence(JsonList<MountRecord>);

impl MountPersistence {
    pub fn new(data_dir: &Path) -> Self {
        MountPersistence(JsonList::new(data_dir, "mounts", "mount list"))
    }

    pub fn path(&self) -> PathBuf {
        self.0.path()
    }

    pub fn load(&self) -> Result<Vec<MountRecord>, PersistError> {
        self.0.load()
    }

    pub fn save(&self, mounts: &[MountRecord]) -> Result<(), PersistError> {
        self.0.save(mounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = MountPersistence::new(dir.path());
        assert!(p.load().unwrap().is_empty());
        let rec = MountRecord {
            volume_id: Uuid::new_v4(),
            volume_name: "shared".into(),
            target: "/mnt/x".into(),
            readonly: false,
            mode: AccessMode::MultiNodeMultiWriter,
            session: 7,
            mounted_at_ms: 1,
        };
        p.save(std::slice::from_ref(&rec)).unwrap();
        assert_eq!(p.load().unwrap(), vec![rec]);
        std::fs::write(p.path(), b"{nope").unwrap();
        assert!(p.load().unwrap_err().to_string().contains("not a valid mount list"));
        assert!(p.load().unwrap().is_empty());
    }
}
