//! Command line of `csi-node` (a contract the Helm chart relies on).

use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;
use volumed_csi::logging::LogFormat;
use volumed_csi::serve::Endpoint;

#[derive(Debug, Clone, Parser)]
#[command(name = "csi-node", version, about = "CSI node plugin of volumed")]
pub struct Args {
    /// CSI endpoint to serve on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// Unix socket of the volumed on this node (NodeLocal service).
    #[arg(long, env = "VOLUMED_LOCAL_SOCKET", default_value = "/run/volumed/volumed.sock")]
    pub volumed_socket: PathBuf,

    /// CSI driver name.
    #[arg(long, default_value = volumed_csi::DRIVER_NAME)]
    pub driver_name: String,

    /// Staging and target paths must lie under this directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Validate the configuration, print it as JSON and exit (0 valid, 2 not).
    #[arg(long)]
    pub check_config: bool,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub endpoint: Endpoint,
    pub volumed_socket: PathBuf,
    pub driver_name: String,
    pub kubelet_dir: PathBuf,
    pub log_format: LogFormat,
}

fn normalised_absolute(p: &std::path::Path) -> bool {
    use std::path::Component;
    p.is_absolute()
        && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !p.to_string_lossy().ends_with('/')
        && p != std::path::Path::new("/")
}

impl Args {
    pub fn validate(&self) -> Result<Config, String> {
        let endpoint: Endpoint = self.endpoint.parse().map_err(|e| format!("--endpoint: {e}"))?;
        volumed_csi::validate_driver_name(&self.driver_name).map_err(|e| format!("--driver-name: {e}"))?;
        if !self.volumed_socket.is_absolute() {
            return Err(format!("--volumed-socket: {} must be an absolute path", self.volumed_socket.display()));
        }
        if !normalised_absolute(&self.kubelet_dir) {
            return Err(format!(
                "--kubelet-dir: {} must be an absolute, normalised path other than /",
                self.kubelet_dir.display()
            ));
        }
        Ok(Config {
            endpoint,
            volumed_socket: self.volumed_socket.clone(),
            driver_name: self.driver_name.clone(),
            kubelet_dir: self.kubelet_dir.clone(),
            log_format: self.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("csi-node").chain(v.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = args(&[]).unwrap().validate().unwrap();
        assert_eq!(c.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["endpoint"], "unix:///csi/csi.sock");
        assert_eq!(json["volumed_socket"], "/run/volumed/volumed.sock");
    }

    #[test]
    fn bad_values_are_named() {
        for (flag, value) in [
            ("--kubelet-dir", "relative"),
            ("--kubelet-dir", "/var/lib/../kubelet"),
            ("--kubelet-dir", "/"),
            ("--volumed-socket", "volumed.sock"),
            ("--endpoint", "tcp://host:1"),
            ("--driver-name", "bad_name"),
        ] {
            let e = args(&[flag, value]).unwrap().validate().unwrap_err();
            assert!(e.starts_with(flag), "{flag}={value}: {e}");
        }
    }
}
