//! `csi-node --check-config`: the flag contract the Helm chart relies on.

use std::process::Command;

fn cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_csi-node"));
    for v in ["CSI_ENDPOINT", "VOLUMED_LOCAL_SOCKET", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        c.env_remove(v);
    }
    c
}

#[test]
fn check_config_prints_effective_config() {
    let out = cmd()
        .args(["--check-config", "--kubelet-dir", "/tmp/kubelet", "--log-format", "json"])
        .env("VOLUMED_LOCAL_SOCKET", "/run/v/v.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["endpoint"], "unix:///csi/csi.sock");
    assert_eq!(v["volumed_socket"], "/run/v/v.sock");
    assert_eq!(v["kubelet_dir"], "/tmp/kubelet");
    assert_eq!(v["driver_name"], "csi.volumed.dev");
    assert_eq!(v["log_format"], "json");
}

#[test]
fn check_config_exits_2_on_bad_config() {
    for args in [
        vec!["--check-config", "--kubelet-dir", "var/lib/kubelet"],
        vec!["--check-config", "--kubelet-dir", "/var/lib/../x"],
        vec!["--check-config", "--volumed-socket", "rel.sock"],
        vec!["--check-config", "--endpoint", "nowhere"],
        vec!["--check-config", "--no-such-flag"],
    ] {
        let out = cmd().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}
