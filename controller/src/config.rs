//! Command line of `csi-controller` (a contract the Helm chart relies on).

use clap::Parser;
use serde::Serialize;
use volumed_csi::logging::LogFormat;
use volumed_csi::serve::Endpoint;

use crate::volumed::VolumedUrl;

#[derive(Debug, Clone, Parser)]
#[command(name = "csi-controller", version, about = "CSI controller plugin of volumed")]
pub struct Args {
    /// CSI endpoint to serve on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// volumed admin API(s), tried in order; the next one is used when one
    /// is UNAVAILABLE. `host:port`, `http://host:port` or `unix:///path`.
    #[arg(long = "volumed", env = "VOLUMED_ENDPOINT", value_delimiter = ',', required = true)]
    pub volumed: Vec<String>,

    /// CSI driver name.
    #[arg(long, default_value = volumed_csi::DRIVER_NAME)]
    pub driver_name: String,

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
    pub volumed: Vec<VolumedUrl>,
    pub driver_name: String,
    pub log_format: LogFormat,
}

impl Args {
    pub fn validate(&self) -> Result<Config, String> {
        let endpoint: Endpoint = self.endpoint.parse().map_err(|e| format!("--endpoint: {e}"))?;
        volumed_csi::validate_driver_name(&self.driver_name).map_err(|e| format!("--driver-name: {e}"))?;
        let volumed = self
            .volumed
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<VolumedUrl>().map_err(|e| format!("--volumed: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if volumed.is_empty() {
            return Err("--volumed: at least one volumed address is required".into());
        }
        Ok(Config { endpoint, volumed, driver_name: self.driver_name.clone(), log_format: self.log_format })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("csi-controller").chain(v.iter().copied()))
    }

    #[test]
    fn defaults_and_list() {
        let a = args(&["--volumed", "127.0.0.1:7001,http://127.0.0.1:7002"]).unwrap();
        let c = a.validate().unwrap();
        assert_eq!(c.endpoint, Endpoint::Unix("/csi/csi.sock".into()));
        assert_eq!(c.volumed.len(), 2);
        assert_eq!(c.driver_name, "csi.volumed.dev");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["endpoint"], "unix:///csi/csi.sock");
        assert_eq!(json["volumed"][0], "http://127.0.0.1:7001");
    }

    #[test]
    fn bad_values_are_named() {
        let e = args(&["--volumed", "x", "--endpoint", "tcp://nowhere"]).unwrap().validate().unwrap_err();
        assert!(e.starts_with("--endpoint"), "{e}");
        let e = args(&["--volumed", "ftp://x"]).unwrap().validate().unwrap_err();
        assert!(e.starts_with("--volumed"), "{e}");
        let e = args(&["--volumed", "a:1", "--driver-name=-bad"]).unwrap().validate().unwrap_err();
        assert!(e.starts_with("--driver-name"), "{e}");
        assert!(args(&[]).is_err(), "--volumed is required");
        assert!(args(&["--volumed", "a:1", "--log-format", "xml"]).is_err());
    }
}
