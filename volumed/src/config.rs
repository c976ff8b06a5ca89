//! Daemon configuration: flags, each with an environment variable, checked
//! into a typed [`NodeConfig`]. `--check-config` prints the result as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

use crate::storage::log_store::NodeId;

#[derive(Debug, Clone, Parser)]
#[command(name = "volumed", version, about = "Volumed storage daemon: replicated volumes for Kubernetes")]
pub struct Flags {
    /// Name of this node (the Kubernetes node name).
    #[arg(long, env = "VOLUMED_NODE_NAME")]
    pub node_name: String,
    /// Numeric Raft id of this node; default: a stable hash of the node name.
    #[arg(long, env = "VOLUMED_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// gRPC listen address (admin API and peer traffic).
    #[arg(long, env = "VOLUMED_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach --listen.
    #[arg(long, env = "VOLUMED_ADVERTISE")]
    pub advertise: Option<String>,
    /// NBD listen address.
    #[arg(long, env = "VOLUMED_NBD_LISTEN", default_value = "0.0.0.0:10809")]
    pub nbd_listen: SocketAddr,
    /// Address clients use to reach --nbd-listen.
    #[arg(long, env = "VOLUMED_NBD_ADVERTISE")]
    pub nbd_advertise: Option<String>,
    /// Directory of the node's RocksDB and identity.
    #[arg(long, env = "VOLUMED_DATA_DIR", default_value = "/var/lib/volumed")]
    pub data_dir: PathBuf,
    /// Directory for FUSE mounts backing devices and the local socket.
    #[arg(long, env = "VOLUMED_RUN_DIR", default_value = "/run/volumed")]
    pub run_dir: PathBuf,
    /// Unix socket of the node-local API (default: <run-dir>/volumed.sock).
    #[arg(long, env = "VOLUMED_LOCAL_SOCKET")]
    pub local_socket: Option<PathBuf>,
    /// Seed addresses (host:port, comma-separated; DNS names are re-resolved).
    #[arg(long, env = "VOLUMED_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Form a new cluster once this many nodes know each other.
    #[arg(long, env = "VOLUMED_BOOTSTRAP_EXPECT", default_value_t = 3)]
    pub bootstrap_expect: usize,
    /// Voters of the catalog group (3 or 5; fewer while the cluster is smaller).
    #[arg(long, env = "VOLUMED_CATALOG_VOTERS", default_value_t = 3)]
    pub catalog_voters: usize,
    /// Topology label KEY=VALUE (repeatable, or comma-separated in the env).
    #[arg(long = "label", env = "VOLUMED_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// File of KEY=VALUE lines with more labels (read at startup).
    #[arg(long, env = "VOLUMED_LABELS_FILE")]
    pub labels_file: Option<PathBuf>,
    /// Bytes this node offers for replicas (e.g. 500Gi); default: size of
    /// the data directory's filesystem.
    #[arg(long, env = "VOLUMED_CAPACITY")]
    pub capacity: Option<String>,
    /// Most volumes attached on this node at once.
    #[arg(long, env = "VOLUMED_MAX_VOLUMES", default_value_t = 64)]
    pub max_volumes: u32,
    /// How long a node may be unreachable before its replicas are rebuilt
    /// elsewhere (e.g. 5m, 30s).
    #[arg(long, env = "VOLUMED_NODE_DOWN_GRACE", default_value = "5m")]
    pub node_down_grace: String,
    /// Most bytes per second this node sends to one rebuilding or lagging
    /// replica (e.g. 200Mi), so a rebuild leaves room for client I/O;
    /// 0 = unlimited.
    #[arg(long, env = "VOLUMED_REBUILD_BANDWIDTH", default_value = "0")]
    pub rebuild_bandwidth: String,
    /// Device frontend for attached volumes.
    #[arg(long, env = "VOLUMED_FRONTEND", default_value = "auto", value_parser = ["auto", "kernel-nbd", "fuse-loop"])]
    pub frontend: String,
    /// Prometheus metrics listen address (off when unset).
    #[arg(long, env = "VOLUMED_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "VOLUMED_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Validate the configuration, print it as JSON and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The checked configuration.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub node_name: String,
    pub listen: SocketAddr,
    pub advertise: String,
    pub nbd_listen: SocketAddr,
    pub nbd_advertise: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub local_socket: PathBuf,
    pub join: Vec<String>,
    pub bootstrap_expect: usize,
    pub catalog_voters: usize,
    pub labels: BTreeMap<String, String>,
    pub capacity_bytes: Option<u64>,
    pub max_volumes: u32,
    #[serde(with = "duration_secs")]
    pub node_down_grace: Duration,
    /// Bytes per second per snapshot transfer; 0 = unlimited.
    pub rebuild_bandwidth: u64,
    pub frontend: String,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: String,
}

mod duration_secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {msg}")]
    Invalid { flag: &'static str, msg: String },
    #[error("--labels-file {path}: {source}")]
    LabelsFile { path: PathBuf, source: std::io::Error },
}

fn invalid(flag: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { flag, msg: msg.into() }
}

/// Stable 63-bit id from a node name (FNV-1a), never 0.
pub fn node_id_from_name(name: &str) -> NodeId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h >> 1).max(1)
}

/// Parses sizes like `1048576`, `512Mi`, `10Gi`, `1T`, `100G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (examples: 1073741824, 512Mi, 10Gi)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" => 1_000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use Ki, Mi, Gi, Ti)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses durations like `300`, `30s`, `5m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (examples: 30s, 5m, 1h)"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("unknown duration unit {other:?} in {s:?} (use ms, s, m, h)")),
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))?;
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl Flags {
    pub fn check(&self) -> Result<NodeConfig, ConfigError> {
        if self.node_name.trim().is_empty() {
            return Err(invalid("node-name", "must not be empty"));
        }
        let node_id = match self.node_id {
            Some(0) => return Err(invalid("node-id", "0 is reserved; use a positive number")),
            Some(id) => id,
            None => node_id_from_name(&self.node_name),
        };
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None if self.listen.ip().is_unspecified() => {
                return Err(invalid("advertise", "required when --listen is a wildcard address"))
            }
            None => self.listen.to_string(),
        };
        let nbd_advertise = match &self.nbd_advertise {
            Some(a) => a.clone(),
            None if self.nbd_listen.ip().is_unspecified() => {
                // Same host as the API address, NBD port.
                let host = advertise.rsplit_once(':').map(|(h, _)| h).unwrap_or(&advertise);
                format!("{host}:{}", self.nbd_listen.port())
            }
            None => self.nbd_listen.to_string(),
        };
        if !matches!(self.catalog_voters, 1 | 3 | 5) {
            return Err(invalid("catalog-voters", "must be 3 or 5 (1 for a single-node test cluster)"));
        }
        if self.bootstrap_expect == 0 {
            return Err(invalid("bootstrap-expect", "must be at least 1"));
        }
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            if l.trim().is_empty() {
                continue;
            }
            let (k, v) = parse_label(l).map_err(|m| invalid("label", m))?;
            labels.insert(k, v);
        }
        if let Some(path) = &self.labels_file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::LabelsFile { path: path.clone(), source })?;
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let (k, v) = parse_label(line).map_err(|m| invalid("labels-file", m))?;
                labels.insert(k, v);
            }
        }
        let capacity_bytes = match &self.capacity {
            Some(c) => Some(parse_size(c).map_err(|m| invalid("capacity", m))?),
            None => None,
        };
        let node_down_grace = parse_duration(&self.node_down_grace).map_err(|m| invalid("node-down-grace", m))?;
        let rebuild_bandwidth = parse_size(&self.rebuild_bandwidth).map_err(|m| invalid("rebuild-bandwidth", m))?;
        let local_socket = self.local_socket.clone().unwrap_or_else(|| self.run_dir.join("volumed.sock"));
        Ok(NodeConfig {
            node_id,
            node_name: self.node_name.clone(),
            listen: self.listen,
            advertise,
            nbd_listen: self.nbd_listen,
            nbd_advertise,
            data_dir: self.data_dir.clone(),
            run_dir: self.run_dir.clone(),
            local_socket,
            join: self.join.iter().filter(|s| !s.trim().is_empty()).cloned().collect(),
            bootstrap_expect: self.bootstrap_expect,
            catalog_voters: self.catalog_voters,
            labels,
            capacity_bytes,
            max_volumes: self.max_volumes,
            node_down_grace,
            rebuild_bandwidth,
            frontend: self.frontend.clone(),
            metrics_listen: self.metrics_listen,
            log_format: self.log_format.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(extra: &[&str]) -> Flags {
        let mut args =
            vec!["volumed", "--node-name", "n1", "--listen", "127.0.0.2:7400", "--nbd-listen", "127.0.0.2:10809"];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args).unwrap()
    }

    #[test]
    fn defaults_and_derived_values() {
        let c = flags(&[]).check().unwrap();
        assert_eq!(c.advertise, "127.0.0.2:7400");
        assert_eq!(c.node_id, node_id_from_name("n1"));
        assert_eq!(c.node_down_grace, Duration::from_secs(300));
        assert!(c.local_socket.ends_with("volumed.sock"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = flags(&["--capacity", "10Qi"]).check().unwrap_err().to_string();
        assert!(e.starts_with("--capacity"), "{e}");
        let e = flags(&["--label", "novalue"]).check().unwrap_err().to_string();
        assert!(e.starts_with("--label"), "{e}");
        let e = flags(&["--catalog-voters", "4"]).check().unwrap_err().to_string();
        assert!(e.starts_with("--catalog-voters"), "{e}");
        let e = flags(&["--rebuild-bandwidth", "fast"]).check().unwrap_err().to_string();
        assert!(e.starts_with("--rebuild-bandwidth"), "{e}");
        let e = flags(&["--node-down-grace", "soon"]).check().unwrap_err().to_string();
        assert!(e.starts_with("--node-down-grace"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn wildcard_listen_needs_advertise() {
        let f = Flags::try_parse_from(["volumed", "--node-name", "x"]).unwrap();
        assert!(f.check().unwrap_err().to_string().contains("--advertise"));
        let f = Flags::try_parse_from(["volumed", "--node-name", "x", "--advertise", "10.1.2.3:7400"]).unwrap();
        assert_eq!(f.check().unwrap().nbd_advertise, "10.1.2.3:10809");
    }
}
