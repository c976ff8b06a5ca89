//! The seam between the CSI conformance / end-to-end suites and a running
//! cluster. The suites only see [`ClusterUnderTest`]; [`ClusterJson`] reads
//! the `cluster.json` that `volctl dev up` writes into its state directory
//! (the parts the suites need; everything else is ignored):
//!
//! ```json
//! {"volumed": [{"node_id": 1, "node_name": "node-1", "api": "http://127.0.0.2:7400",
//!               "nbd": "127.0.0.2:10809", "pid": 123, "data_dir": "/tmp/x/node-1/data",
//!               "local_socket": "/tmp/x/node-1/run/volumed.sock", "log": "/tmp/x/node-1/volumed.log"}],
//!  "csi_controller": "unix:///tmp/x/csi/controller.sock",
//!  "csi_nodes": [{"node_id": "1", "node_name": "node-1", "endpoint": "unix:///tmp/x/node-1/csi.sock",
//!                 "kubelet_dir": "/tmp/x/node-1/kubelet", "pid": 130, "log": "/tmp/x/node-1/csi-node.log"}]}
//! ```
//!
//! `kubelet_dir` is the `--kubelet-dir` the node plugin was started with;
//! staging and target paths of the suites are made under it. Node ids may be
//! numbers or strings; `csi_controller` may also be an object with an
//! `endpoint` key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::serve::Endpoint;

/// Environment variable naming the state directory of a running cluster.
pub const STATE_DIR_ENV: &str = "VOLUMED_CLUSTER_STATE";

#[derive(Debug, Clone)]
pub struct NodeUnderTest {
    /// The CSI node id (volumed's node id as a string).
    pub node_id: String,
    pub endpoint: Endpoint,
    pub kubelet_dir: PathBuf,
}

/// A running volumed cluster with its CSI plugins.
pub trait ClusterUnderTest {
    fn controller_endpoint(&self) -> Endpoint;
    fn node_endpoints(&self) -> Vec<NodeUnderTest>;
    /// volumed admin API addresses (`http://host:port`), for checks behind
    /// the CSI layer.
    fn volumed_api_endpoints(&self) -> Vec<String>;
}

#[derive(Debug, Clone, Deserialize)]
pub struct VolumedProcess {
    #[serde(deserialize_with = "string_or_number")]
    pub node_id: String,
    #[serde(default)]
    pub node_name: String,
    /// `http://host:port` (volctl) or a bare `host:port`.
    pub api: String,
    #[serde(default)]
    pub nbd: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub local_socket: Option<PathBuf>,
    #[serde(default)]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CsiNodeProcess {
    #[serde(deserialize_with = "string_or_number")]
    pub node_id: String,
    #[serde(default)]
    pub node_name: String,
    pub endpoint: String,
    #[serde(default)]
    pub kubelet_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClusterJson {
    pub volumed: Vec<VolumedProcess>,
    #[serde(deserialize_with = "endpoint_or_object")]
    pub csi_controller: String,
    pub csi_nodes: Vec<CsiNodeProcess>,
    #[serde(default)]
    pub csi_controller_process: Option<ControllerProcess>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ControllerProcess {
    #[serde(default)]
    pub log: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Endpoint(#[from] crate::serve::EndpointError),
}

impl ClusterJson {
    pub fn load(state_dir: &Path) -> Result<ClusterJson, HarnessError> {
        let path = state_dir.join("cluster.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| HarnessError::Read { path: path.clone(), source })?;
        let c: ClusterJson = serde_json::from_str(&text).map_err(|source| HarnessError::Parse { path, source })?;
        // Fail early on endpoints the suites could not use.
        c.csi_controller.parse::<Endpoint>()?;
        for n in &c.csi_nodes {
            n.endpoint.parse::<Endpoint>()?;
        }
        Ok(c)
    }

    /// The cluster named by `$VOLUMED_CLUSTER_STATE`, if set.
    pub fn from_env() -> Option<Result<ClusterJson, HarnessError>> {
        std::env::var_os(STATE_DIR_ENV).map(|d| ClusterJson::load(Path::new(&d)))
    }
}

impl ClusterUnderTest for ClusterJson {
    fn controller_endpoint(&self) -> Endpoint {
        // Validated in load().
        self.csi_controller.parse().unwrap_or_else(|_| Endpoint::Unix(PathBuf::from("/nonexistent")))
    }

    fn node_endpoints(&self) -> Vec<NodeUnderTest> {
        self.csi_nodes
            .iter()
            .map(|n| NodeUnderTest {
                node_id: n.node_id.clone(),
                endpoint: n.endpoint.parse().unwrap_or_else(|_| Endpoint::Unix(PathBuf::from("/nonexistent"))),
                kubelet_dir: n.kubelet_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/kubelet")),
            })
            .collect()
    }

    fn volumed_api_endpoints(&self) -> Vec<String> {
        self.volumed
            .iter()
            .map(|v| if v.api.contains("://") { v.api.clone() } else { format!("http://{}", v.api) })
            .collect()
    }
}

impl ClusterJson {
    /// Log files of every process, labelled, for failure reports.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for v in &self.volumed {
            if let Some(l) = &v.log {
                out.push((format!("volumed {}", v.node_id), l.clone()));
            }
        }
        if let Some(l) = self.csi_controller_process.as_ref().and_then(|p| p.log.clone()) {
            out.push(("csi-controller".into(), l));
        }
        for n in &self.csi_nodes {
            if let Some(l) = &n.log {
                out.push((format!("csi-node {}", n.node_id), l.clone()));
            }
        }
        out
    }
}

fn endpoint_or_object<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    struct WithEndpoint {
        endpoint: String,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum E {
        S(String),
        O(WithEndpoint),
    }
    Ok(match E::deserialize(d)? {
        E::S(s) => s,
        E::O(o) => o.endpoint,
    })
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_cluster_json() {
        let dir = tempfile::tempdir().unwrap();
        // What `volctl dev up` writes (abridged).
        std::fs::write(
            dir.path().join("cluster.json"),
            r#"{"volumed":[{"node_id":1,"node_name":"node-1","api":"http://127.0.0.2:7400",
                    "nbd":"127.0.0.2:10809","pid":5,"data_dir":"/d","run_dir":"/r",
                    "local_socket":"/r/volumed.sock","log":"/l1","args":["/bin/volumed"],"env":{}},
                   {"node_id":2,"node_name":"node-2","api":"127.0.0.3:7400","pid":6}],
                "state_dir":"/s",
                "csi_controller":"unix:///tmp/c.sock",
                "csi_controller_process":{"endpoint":"unix:///tmp/c.sock","pid":7,"log":"/lc","args":[]},
                "csi_nodes":[{"node_id":"1","node_name":"node-1","endpoint":"unix:///tmp/n1.sock",
                              "kubelet_dir":"/tmp/k1","pid":8,"log":"/ln1","args":[]},
                             {"node_id":2,"endpoint":"unix:///tmp/n2.sock"}]}"#,
        )
        .unwrap();
        let c = ClusterJson::load(dir.path()).unwrap();
        assert_eq!(c.controller_endpoint(), Endpoint::Unix("/tmp/c.sock".into()));
        let nodes = c.node_endpoints();
        assert_eq!(nodes[0].node_id, "1");
        assert_eq!(nodes[0].endpoint, Endpoint::Unix("/tmp/n1.sock".into()));
        assert_eq!(nodes[0].kubelet_dir, PathBuf::from("/tmp/k1"));
        assert_eq!(nodes[1].node_id, "2");
        assert_eq!(nodes[1].kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        assert_eq!(c.volumed_api_endpoints(), vec!["http://127.0.0.2:7400", "http://127.0.0.3:7400"]);
        assert_eq!(c.volumed[0].local_socket.as_deref(), Some(Path::new("/r/volumed.sock")));
        let logs: Vec<String> = c.logs().into_iter().map(|(l, _)| l).collect();
        assert_eq!(logs, ["volumed 1", "csi-controller", "csi-node 1"]);

        // The controller as an object with an endpoint.
        std::fs::write(
            dir.path().join("cluster.json"),
            r#"{"volumed":[],"csi_controller":{"endpoint":"unix:///tmp/o.sock"},"csi_nodes":[]}"#,
        )
        .unwrap();
        assert_eq!(ClusterJson::load(dir.path()).unwrap().controller_endpoint(), Endpoint::Unix("/tmp/o.sock".into()));

        std::fs::write(dir.path().join("cluster.json"), "{").unwrap();
        assert!(matches!(ClusterJson::load(dir.path()), Err(HarnessError::Parse { .. })));
        // A cluster started with --no-csi has no plugins to test.
        std::fs::write(dir.path().join("cluster.json"), r#"{"volumed":[{"node_id":1,"api":"http://127.0.0.2:7400"}]}"#)
            .unwrap();
        let e = ClusterJson::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("csi_controller"), "{e}");
    }
}
