//! Small lists a node keeps next to its RocksDB (`<data-dir>/<name>.json`):
//! the attachments and the file-volume mounts it hosts, so a restarted
//! volumed re-creates them. They live outside RocksDB because they describe
//! kernel objects of this node, not replicated state.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the
//! directory): a crash leaves either the old or the new list, never a torn
//! one. A file that cannot be parsed is moved aside, never overwritten
//! silently.

use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid {what} ({detail}); it was moved to {moved} and volumed starts without its {items}")]
    Corrupt { path: PathBuf, what: &'static str, items: &'static str, detail: String, moved: String },
}

/// One list of `T` in `<dir>/<items>.json`, stored as
/// `{"version": 1, "<items>": [...]}`.
#[derive(Debug, Clone)]
pub struct JsonList<T> {
    dir: PathBuf,
    /// File stem and the body's field name, e.g. `attachments`.
    items: &'static str,
    /// What the list is, for messages, e.g. `attachment list`.
    what: &'static str,
    _records: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> JsonList<T> {
    pub fn new(dir: &Path, items: &'static str, what: &'static str) -> JsonList<T> {
        JsonList { dir: dir.to_path_buf(), items, what, _records: PhantomData }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.items))
    }

    /// The persisted list; empty when there is none.
    pub fn load(&self) -> Result<Vec<T>, PersistError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(PersistError::Io { path, source }),
        };
        let parsed =
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| e.to_string()).and_then(|mut v| {
                let list =
                    v.get_mut(self.items).map(serde_json::Value::take).ok_or_else(|| format!("no {:?}", self.items))?;
                serde_json::from_value::<Vec<T>>(list).map_err(|e| e.to_string())
            });
        match parsed {
            Ok(list) => Ok(list),
            Err(detail) => {
                let moved = self.dir.join(format!("{}.json.corrupt-{}", self.items, crate::catalog::service::now_ms()));
                std::fs::rename(&path, &moved).map_err(|source| PersistError::Io { path: path.clone(), source })?;
                Err(PersistError::Corrupt {
                    path,
                    what: self.what,
                    items: self.items,
                    detail,
                    moved: moved.display().to_string(),
                })
            }
        }
    }

    /// Replaces the persisted list with `records`.
    pub fn save(&self, records: &[T]) -> Result<(), PersistError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PersistError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.path();
        let tmp = self.dir.join(format!("{}.json.tmp", self.items));
        let mut body = serde_json::Map::new();
        body.insert("version".into(), FORMAT_VERSION.into());
        let list = serde_json::to_value(records)
            .map_err(|e| PersistError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        body.insert(self.items.into(), list);
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
