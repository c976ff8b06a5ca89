//! `cluster.json` in the dev state directory: what `volctl dev up` started,
//! with each process's full argv so a harness can restart it identically.
//!
//! ```json
//! {"volumed": [{"node_id": 1, "node_name": "node-1", "api": "http://127.0.0.2:7400",
//!               "nbd": "127.0.0.2:10809", "pid": 11, "local_socket": "/s/node-1/run/volumed.sock", …}],
//!  "state_dir": "/s",
//!  "csi_controller": "unix:///s/csi/controller.sock",
//!  "csi_controller_process": {"endpoint": "unix:///s/csi/controller.sock", "pid": 14, "args": […], …},
//!  "csi_nodes": [{"node_id": "1", "node_name": "node-1", "endpoint": "unix:///s/node-1/csi.sock",
//!                 "kubelet_dir": "/s/node-1/kubelet", "pid": 15, "args": […], …}]}
//! ```
//!
//! `csi_controller` is the CSI controller endpoint; `csi_nodes[].node_id` is
//! the CSI node id (volumed's node id). Keys written by other tools are kept
//! verbatim when volctl rewrites the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CliError;

pub const FILE_NAME: &str = "cluster.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterFile {
    pub volumed: Vec<VolumedEntry>,
    #[serde(default)]
    pub state_dir: PathBuf,
    /// Endpoint of the CSI controller plugin (`unix:///…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi_controller: Option<String>,
    /// The process serving [`ClusterFile::csi_controller`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi_controller_process: Option<CsiProcess>,
    /// One CSI node plugin per volumed node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub csi_nodes: Vec<CsiNodeEntry>,
    /// Everything else (keys of other tools).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A CSI plugin process `dev up` started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CsiProcess {
    /// `unix:///…`, the CSI endpoint it serves.
    pub endpoint: String,
    pub pid: u32,
    pub log: PathBuf,
    /// Full argv; `args[0]` is the absolute path of the binary.
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The CSI node plugin of one volumed node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CsiNodeEntry {
    /// The CSI node id: the volumed node id, as NodeGetInfo reports it.
    pub node_id: String,
    pub node_name: String,
    /// Staging and target paths must lie below it (`--kubelet-dir`).
    pub kubelet_dir: PathBuf,
    #[serde(flatten)]
    pub process: CsiProcess,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumedEntry {
    pub node_id: u64,
    pub node_name: String,
    /// `http://IP:PORT`, the Admin API.
    pub api: String,
    /// `IP:PORT`, the NBD server.
    pub nbd: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub local_socket: PathBuf,
    pub log: PathBuf,
    /// Full argv; `args[0]` is the absolute path of the binary.
    pub args: Vec<String>,
    /// The whole environment the process was started with.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A process recorded anywhere in the file (volumed or another tool's).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedProcess {
    pub label: String,
    pub pid: u32,
    pub args: Option<Vec<String>>,
}

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

impl ClusterFile {
    /// `Ok(None)` when the state directory holds no cluster.json.
    pub fn load(state_dir: &Path) -> Result<Option<ClusterFile>, CliError> {
        let path = path_in(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CliError::io(format!("read {}", path.display()), source)),
        };
        serde_json::from_str(&text).map(Some).map_err(|source| CliError::StateFile { path, source })
    }

    /// Written to a temporary file and renamed, so a reader never sees half a file.
    pub fn save(&self, state_dir: &Path) -> Result<(), CliError> {
        let path = path_in(state_dir);
        let tmp = state_dir.join(format!(".{FILE_NAME}.tmp"));
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| CliError::StateFile { path: path.clone(), source })?;
        text.push('\n');
        std::fs::write(&tmp, text).map_err(|e| CliError::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| CliError::io(format!("rename {} to {}", tmp.display(), path.display()), e))
    }

    /// Every process the file records: volumed nodes, then any object with a
    /// numeric `pid` among the other keys.
    pub fn processes(&self) -> Vec<RecordedProcess> {
        let mut out: Vec<RecordedProcess> = self
            .volumed
            .iter()
            .filter(|v| v.pid != 0)
            .map(|v| RecordedProcess { label: v.node_name.clone(), pid: v.pid, args: Some(v.args.clone()) })
            .collect();
        let csi = self
            .csi_controller_process
            .iter()
            .map(|p| ("csi-controller".to_string(), p))
            .chain(self.csi_nodes.iter().map(|n| (format!("csi-node of {}", n.node_name), &n.process)));
        for (label, p) in csi.filter(|(_, p)| p.pid != 0) {
            out.push(RecordedProcess { label, pid: p.pid, args: Some(p.args.clone()) });
        }
        for (key, value) in &self.extra {
            collect_pids(key, value, &mut out);
        }
        out
    }
}

fn collect_pids(label: &str, value: &Value, out: &mut Vec<RecordedProcess>) {
    match value {
        Value::Object(map) => {
            if let Some(pid) = map.get("pid").and_then(Value::as_u64).filter(|p| *p > 0 && *p <= u32::MAX as u64) {
                let args = map
                    .get("args")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>());
                out.push(RecordedProcess { label: label.to_string(), pid: pid as u32, args });
            }
            for (k, v) in map {
                if k != "pid" && k != "args" {
                    collect_pids(&format!("{label}.{k}"), v, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                collect_pids(&format!("{label}[{i}]"), v, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn entry(i: u64, api: &str) -> VolumedEntry {
        VolumedEntry {
            node_id: i,
            node_name: format!("node-{i}"),
            api: api.into(),
            nbd: format!("127.0.0.{}:10809", i + 1),
            pid: 100 + i as u32,
            data_dir: format!("/s/node-{i}/data").into(),
            run_dir: format!("/s/node-{i}/run").into(),
            local_socket: format!("/s/node-{i}/run/volumed.sock").into(),
            log: format!("/s/node-{i}/volumed.log").into(),
            args: vec!["/bin/volumed".into(), "--node-name".into(), format!("node-{i}")],
            env: [("PATH".to_string(), "/bin".to_string())].into(),
            extra: Map::new(),
        }
    }

    #[test]
    fn round_trip_keeps_other_tools_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ClusterFile::load(dir.path()).unwrap(), None);
        std::fs::write(
            path_in(dir.path()),
            r#"{"volumed":[{"node_id":1,"node_name":"node-1","api":"http://127.0.0.2:7400","nbd":"127.0.0.2:10809",
                "pid":7,"data_dir":"/d","run_dir":"/r","local_socket":"/r/s","log":"/l","args":["/bin/volumed"],
                "future_field":true}],
                "state_dir":"/s",
                "csi_controller":"unix:///s/c.sock",
                "csi_controller_process":{"endpoint":"unix:///s/c.sock","pid":8,"log":"/s/c.log",
                    "args":["/bin/csi-controller"]},
                "csi_nodes":[{"node_id":"1","node_name":"node-1","endpoint":"unix:///s/n1.sock",
                    "kubelet_dir":"/s/k1","pid":9,"log":"/s/n1.log","args":["/bin/csi-node"]}],
                "other_tool":{"sidecar":{"pid":10}}}"#,
        )
        .unwrap();
        let mut c = ClusterFile::load(dir.path()).unwrap().unwrap();
        assert_eq!(c.volumed[0].extra.get("future_field"), Some(&Value::Bool(true)));
        assert!(c.volumed[0].env.is_empty());
        let procs = c.processes();
        assert_eq!(
            procs,
            vec![
                RecordedProcess { label: "node-1".into(), pid: 7, args: Some(vec!["/bin/volumed".into()]) },
                RecordedProcess {
                    label: "csi-controller".into(),
                    pid: 8,
                    args: Some(vec!["/bin/csi-controller".into()])
                },
                RecordedProcess {
                    label: "csi-node of node-1".into(),
                    pid: 9,
                    args: Some(vec!["/bin/csi-node".into()])
                },
                RecordedProcess { label: "other_tool.sidecar".into(), pid: 10, args: None },
            ]
        );
        assert_eq!(c.csi_nodes[0].kubelet_dir, PathBuf::from("/s/k1"));
        c.volumed[0].pid = 70;
        c.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(path_in(dir.path())).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["volumed"][0]["pid"], 70);
        assert_eq!(v["volumed"][0]["future_field"], true);
        assert_eq!(v["csi_controller"], "unix:///s/c.sock");
        assert_eq!(v["csi_controller_process"]["pid"], 8);
        assert_eq!(v["csi_nodes"][0]["pid"], 9);
        assert_eq!(v["csi_nodes"][0]["node_id"], "1");
        assert_eq!(v["csi_nodes"][0]["endpoint"], "unix:///s/n1.sock");
        assert_eq!(v["csi_nodes"][0]["kubelet_dir"], "/s/k1");
        assert_eq!(v["other_tool"]["sidecar"]["pid"], 10);
        assert_eq!(v["state_dir"], "/s");
    }

    #[test]
    fn written_format_has_the_documented_keys() {
        let c = ClusterFile {
            volumed: vec![entry(1, "http://127.0.0.2:7400")],
            state_dir: "/s".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert!(v.get("csi_nodes").is_none() && v.get("csi_controller").is_none(), "no CSI keys without plugins: {v}");
        let node = v["volumed"][0].as_object().unwrap();
        for key in
            ["node_id", "node_name", "api", "nbd", "pid", "data_dir", "run_dir", "local_socket", "log", "args", "env"]
        {
            assert!(node.contains_key(key), "missing {key}: {v}");
        }
        assert_eq!(v["state_dir"], "/s");
    }

    #[test]
    fn a_broken_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path_in(dir.path()), "{").unwrap();
        let e = ClusterFile::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("cluster.json"), "{e}");
    }
}
