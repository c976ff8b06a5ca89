//! The csi-controller binary and service with no volumed reachable: flag
//! handling, the socket contract, readiness, and every request error the
//! controller must find before it asks volumed anything. (The behaviour
//! against a live cluster is in csi/tests/, run by the cluster harness.)

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Code;
use volumed_csi::proto::controller_client::ControllerClient;
use volumed_csi::proto::identity_client::IdentityClient;
use volumed_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use volumed_csi::proto::{self as csi};
use volumed_csi::serve::{self, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_csi-controller");

fn cmd() -> Command {
    let mut c = Command::new(BIN);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "CSI_ENDPOINT",
        "VOLUMED_ENDPOINT",
    ] {
        c.env_remove(v);
    }
    c
}

#[test]
fn check_config_prints_effective_config() {
    let out = cmd()
        .args(["--check-config", "--volumed", "127.0.0.1:7001,10.0.0.2:7001", "--endpoint", "unix:///tmp/c.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["endpoint"], "unix:///tmp/c.sock");
    assert_eq!(v["volumed"][1], "http://10.0.0.2:7001");
    assert_eq!(v["driver_name"], "csi.volumed.dev");
    assert_eq!(v["log_format"], "text");

    // The environment works as the flags do.
    let out = cmd()
        .arg("--check-config")
        .env("VOLUMED_ENDPOINT", "a.svc:1,b.svc:2")
        .env("CSI_ENDPOINT", "unix:///csi/x.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["volumed"].as_array().unwrap().len(), 2);
    assert_eq!(v["endpoint"], "unix:///csi/x.sock");
}

#[test]
fn check_config_exits_2_on_bad_config() {
    for args in [
        vec!["--check-config"],
        vec!["--check-config", "--volumed", "no-port"],
        vec!["--check-config", "--volumed", "a:1", "--endpoint", "ftp://x"],
        vec!["--check-config", "--volumed", "a:1", "--driver-name", "under_score"],
        vec!["--check-config", "--volumed", "a:1", "--log-format", "yaml"],
    ] {
        let out = cmd().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: says why");
    }
}

fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32 }),
    }
}

async fn wait_for(sock: &Path) {
    for _ in 0..250 {
        if sock.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never appeared", sock.display());
}

/// The real binary: stale socket replaced, not ready without volumed,
/// socket removed on SIGTERM.
#[tokio::test]
async fn binary_serves_on_unix_socket_and_reports_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi/csi.sock");
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A stale socket from a crashed predecessor.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut child = cmd()
        .args(["--endpoint", &format!("unix://{}", sock.display()), "--volumed", "127.0.0.1:1", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ch = serve::channel(&Endpoint::Unix(sock.clone()));
    let mut identity = IdentityClient::new(ch);
    let mut ready = None;
    for _ in 0..100 {
        match identity.probe(csi::ProbeRequest {}).await {
            Ok(r) => {
                ready = r.into_inner().ready;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(ready, Some(false), "not ready while volumed is unreachable");
    let info = identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.volumed.dev");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (s, err)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "clean exit on SIGTERM");
    assert!(!sock.exists(), "socket removed on shutdown");
    // Every RPC logged one structured line with outcome and duration.
    let probe_line = status
        .1
        .lines()
        .find(|l| l.contains("\"rpc\":\"Probe\"") && l.contains("\"outcome\""))
        .unwrap_or_else(|| panic!("no Probe log line in:\n{}", status.1));
    let v: serde_json::Value = serde_json::from_str(probe_line).unwrap();
    assert_eq!(v["rpc"], "Probe");
    assert_eq!(v["outcome"], "OK");
    assert!(v["duration_ms"].as_f64().is_some());
}

struct Served {
    _dir: tempfile::TempDir,
    ctrl: ControllerClient<Channel>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve_unreachable_volumed() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let args = volumed_csi_controller::Args {
        endpoint: format!("unix://{}", sock.display()),
        volumed: vec!["127.0.0.1:1".into()],
        driver_name: "csi.volumed.dev".into(),
        log_format: volumed_csi::logging::LogFormat::Text,
        check_config: false,
    };
    let config = args.validate().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        volumed_csi_controller::run(config, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    wait_for(&sock).await;
    Served { _dir: dir, ctrl: ControllerClient::new(serve::channel(&Endpoint::Unix(sock))), _stop: tx }
}

#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, c: Code) -> String {
    match r {
        Ok(v) => panic!("expected {c:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), c, "{}", s.message());
            s.message().to_string()
        }
    }
}

#[tokio::test]
async fn request_errors_come_before_volumed() {
    let s = serve_unreachable_volumed().await;
    let mut c = s.ctrl.clone();
    let create = |name: &str, params: &[(&str, &str)], caps: Vec<csi::VolumeCapability>, range: Option<(i64, i64)>| {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: range.map(|(r, l)| csi::CapacityRange { required_bytes: r, limit_bytes: l }),
            volume_capabilities: caps,
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    };
    let m = code(c.create_volume(create("", &[], vec![cap()], None)).await, Code::InvalidArgument);
    assert!(m.contains("name"));
    let m = code(c.create_volume(create("v", &[], vec![], None)).await, Code::InvalidArgument);
    assert!(m.contains("volume_capabilities"));
    for (k, v) in [
        ("replicas", "9"),
        ("fsType", "ntfs"),
        ("kind", "nfs"),
        ("zoneSpread", "maybe"),
        ("qos.readIOPS", "-3"),
        ("bogus", "1"),
    ] {
        let m = code(c.create_volume(create("v", &[(k, v)], vec![cap()], None)).await, Code::InvalidArgument);
        assert!(m.contains(k), "{k}: {m}");
    }
    code(c.create_volume(create("v", &[], vec![cap()], Some((10 << 20, 1 << 20)))).await, Code::InvalidArgument);
    code(c.create_volume(create("v", &[], vec![cap()], Some((-1, 0)))).await, Code::InvalidArgument);
    code(c.create_volume(create("v", &[], vec![cap()], Some(((1 << 20) + 1, (1 << 20) + 2)))).await, Code::OutOfRange);
    code(c.create_volume(create("v", &[], vec![cap()], Some((i64::MAX, 0)))).await, Code::OutOfRange);
    // A valid request reaches volumed, which is down: UNAVAILABLE, retryable.
    let m = code(c.create_volume(create("pvc-down", &[], vec![cap()], None)).await, Code::Unavailable);
    assert!(m.contains("pvc-down"), "{m}");

    code(c.delete_volume(csi::DeleteVolumeRequest::default()).await, Code::InvalidArgument);
    // Not a volumed id: already gone, without asking volumed.
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: "not-a-volume".into(), ..Default::default() }).await.unwrap();

    let m = code(
        c.list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: "forged".into() }).await,
        Code::Aborted,
    );
    assert!(m.contains("forged"));
    code(
        c.list_volumes(csi::ListVolumesRequest { max_entries: -1, starting_token: String::new() }).await,
        Code::InvalidArgument,
    );
    code(
        c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "v".into(),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    code(
        c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "v".into(),
            node_id: "1".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    code(c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default()).await, Code::InvalidArgument);
    code(
        c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "v".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    code(
        c.controller_expand_volume(csi::ControllerExpandVolumeRequest { volume_id: "v".into(), ..Default::default() })
            .await,
        Code::InvalidArgument,
    );
    code(c.controller_get_volume(csi::ControllerGetVolumeRequest::default()).await, Code::InvalidArgument);
    for (k, v) in [("replicas", "2"), ("fsType", "xfs"), ("kind", "file"), ("zoneSpread", "true"), ("speed", "fast")] {
        let m = code(
            c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: "0b7f6c1e-3f2a-4c1d-9e8f-000000000001".into(),
                mutable_parameters: HashMap::from([(k.to_string(), v.to_string())]),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );
        assert!(m.contains(k), "{m}");
    }
    code(
        c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: "0b7f6c1e-3f2a-4c1d-9e8f-000000000001".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    let m = code(c.create_snapshot(csi::CreateSnapshotRequest::default()).await, Code::InvalidArgument);
    assert!(m.contains("name") || m.contains("source_volume_id"), "{m}");
    code(c.delete_snapshot(csi::DeleteSnapshotRequest::default()).await, Code::InvalidArgument);
    code(c.get_snapshot(csi::GetSnapshotRequest::default()).await, Code::InvalidArgument);
    code(
        c.get_capacity(csi::GetCapacityRequest {
            parameters: HashMap::from([("replicas".to_string(), "x".to_string())]),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );

    let caps = c.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::controller_service_capability::{rpc::Type, Type as T};
    let types: Vec<i32> =
        caps.capabilities.iter().filter_map(|c| c.r#type.as_ref().map(|T::Rpc(r)| r.r#type)).collect();
    for t in [
        Type::CreateDeleteVolume,
        Type::PublishUnpublishVolume,
        Type::ListVolumes,
        Type::ListVolumesPublishedNodes,
        Type::GetCapacity,
        Type::ExpandVolume,
        Type::GetVolume,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
        Type::PublishReadonly,
        Type::ModifyVolume,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::GetSnapshot,
        Type::CloneVolume,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?} advertised");
    }
}
