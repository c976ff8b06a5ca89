//! Checks of what a platform team installs: the Helm chart
//! (deploy/helm/volumed), the image recipe (deploy/Dockerfile) and the
//! scripts the image carries (deploy/scripts).
//!
//! The tools come from `.ci/install-helm-tools.sh`: helm, kubernetes-validate,
//! hadolint and shellcheck under `$VOLUMED_TOOLS_DIR/bin` (default
//! /opt/volumed-tools/bin). A missing tool fails the test with a message
//! naming the installer: a check that skipped itself would let a broken chart
//! through.
//!
//! Every chart check runs on two renders: the default values, and
//! tests/helm/values-all-on.yaml, which turns every option on.

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NAMESPACE: &str = "volumed-system";
const RELEASE: &str = "volumed";
/// Kinds whose schemas are CRDs, not part of the Kubernetes API: skipped by
/// name in schema validation (asserted to be present, so the skip is real).
const CRD_KINDS: &[&str] = &["VolumeSnapshotClass", "ServiceMonitor"];
/// Values the downward API would give, for running the binaries.
const FAKE_NODE: &str = "node-a";
const FAKE_POD_IP: &str = "127.0.0.1";
const PROXY_VARS: &[&str] =
    &["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"];

// ---------------------------------------------------------------- tools

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests crate lives in the repository").to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("deploy/helm/volumed")
}

fn all_on_values() -> PathBuf {
    repo_root().join("tests/helm/values-all-on.yaml")
}

fn tool(name: &str) -> PathBuf {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("VOLUMED_TOOLS_DIR") {
        dirs.push(PathBuf::from(d).join("bin"));
    }
    dirs.push(PathBuf::from("/opt/volumed-tools/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} not found in $VOLUMED_TOOLS_DIR/bin, /opt/volumed-tools/bin or PATH: \
                 run .ci/install-helm-tools.sh first"
        )
    })
}

fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", out.status.code(), text(&out.stdout), text(&out.stderr))
}

// ---------------------------------------------------------------- renders

struct Render {
    label: &'static str,
    values: Vec<PathBuf>,
    yaml: String,
    docs: Vec<Value>,
}

fn helm_template(values: &[PathBuf], extra: &[&str]) -> Output {
    let mut cmd = command(tool("helm"));
    cmd.args(["template", RELEASE]).arg(chart_dir()).args(["--namespace", NAMESPACE]);
    for v in values {
        cmd.arg("--values").arg(v);
    }
    cmd.args(extra);
    run(&mut cmd)
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("helm output is YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn render(label: &'static str, values: Vec<PathBuf>) -> Render {
    let out = helm_template(&values, &[]);
    assert!(out.status.success(), "helm template ({label}) failed: {}", describe(&out));
    let yaml = text(&out.stdout);
    let docs = parse_docs(&yaml);
    assert!(!docs.is_empty(), "helm template ({label}) rendered nothing");
    Render { label, values, yaml, docs }
}

fn renders() -> [&'static Render; 2] {
    static DEFAULT: OnceLock<Render> = OnceLock::new();
    static ALL_ON: OnceLock<Render> = OnceLock::new();
    [
        DEFAULT.get_or_init(|| render("default values", vec![])),
        ALL_ON.get_or_init(|| render("values-all-on.yaml", vec![all_on_values()])),
    ]
}

impl Render {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| s(&d["kind"]) == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "{}: want exactly one {kind}, got {}", self.label, all.len());
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .into_iter()
            .find(|d| s(&d["metadata"]["name"]) == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.label))
    }

    /// A value from the values files of this render, falling back to the
    /// chart's values.yaml (leaf-level override is all these tests need).
    fn value(&self, path: &[&str]) -> Value {
        let mut files: Vec<PathBuf> = self.values.iter().rev().cloned().collect();
        files.push(chart_dir().join("values.yaml"));
        for f in files {
            let v: Value = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            let mut cur = &v;
            for key in path {
                cur = &cur[*key];
            }
            if !cur.is_null() {
                return cur.clone();
            }
        }
        panic!("no value at {path:?}")
    }

    fn driver(&self) -> String {
        s(&self.one("CSIDriver")["metadata"]["name"]).to_string()
    }

    fn daemonset(&self) -> &Value {
        self.one("DaemonSet")
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(|x| x.as_slice()).unwrap_or(&[])
}

fn strs(v: &Value) -> Vec<String> {
    seq(v).iter().map(|x| s(x).to_string()).collect()
}

fn pod_spec(workload: &Value) -> &Value {
    if s(&workload["kind"]) == "CronJob" {
        &workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &workload["spec"]["template"]["spec"]
    }
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    let spec = pod_spec(workload);
    seq(&spec["containers"])
        .iter()
        .chain(seq(&spec["initContainers"]))
        .find(|c| s(&c["name"]) == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", s(&workload["metadata"]["name"])))
}

fn args(c: &Value) -> Vec<String> {
    strs(&c["args"])
}

/// The value of `--flag=value` (the chart always uses that form).
fn flag(c: &Value, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    args(c).iter().find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
}

fn has_flag(c: &Value, name: &str) -> bool {
    args(c).iter().any(|a| a == name || a.starts_with(&format!("{name}=")))
}

fn want_flag(c: &Value, name: &str) -> String {
    flag(c, name).unwrap_or_else(|| panic!("container {} has no {name}=...: {:?}", s(&c["name"]), args(c)))
}

fn mount<'a>(c: &'a Value, volume: &str) -> &'a Value {
    seq(&c["volumeMounts"])
        .iter()
        .find(|m| s(&m["name"]) == volume)
        .unwrap_or_else(|| panic!("container {} does not mount {volume}", s(&c["name"])))
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    seq(&pod_spec(workload)["volumes"])
        .iter()
        .find(|v| s(&v["name"]) == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
}

fn yaml_int(v: &Value) -> i64 {
    v.as_i64().or_else(|| v.as_str().and_then(|x| x.parse().ok())).unwrap_or_else(|| panic!("not an integer: {v:?}"))
}

// ---------------------------------------------------------------- lint + schema

#[test]
fn helm_lint_strict_passes_with_default_and_all_on_values() {
    for values in [vec![], vec![all_on_values()]] {
        let mut cmd = command(tool("helm"));
        cmd.args(["lint", "--strict"]).arg(chart_dir());
        for v in &values {
            cmd.arg("--values").arg(v);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "helm lint --strict {values:?}: {}", describe(&out));
        assert!(text(&out.stdout).contains("0 chart(s) failed"), "{}", describe(&out));
    }
}

fn kubernetes_validate(render: &Render, k8s_version: &str) {
    let mut skipped = BTreeSet::new();
    let mut kept = String::new();
    for d in &render.docs {
        let kind = s(&d["kind"]);
        if CRD_KINDS.contains(&kind) {
            skipped.insert(kind.to_string());
            continue;
        }
        kept.push_str("---\n");
        kept.push_str(&serde_yaml::to_string(d).unwrap());
    }
    let dir = tempdir("validate");
    let file = dir.join("manifests.yaml");
    std::fs::write(&file, kept).unwrap();
    let out = run(command(tool("kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", k8s_version])
        .arg(&file));
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && !report.contains("ERROR") && !report.contains("WARN"),
        "{} against Kubernetes {k8s_version}: {}",
        render.label,
        describe(&out)
    );
    // Nothing but the CRD kinds may be skipped, and the snapshot class is
    // always there in these renders: the skip list is not hiding anything.
    assert!(skipped.contains("VolumeSnapshotClass"), "{}: skipped {skipped:?}", render.label);
}

#[test]
fn rendered_manifests_pass_kubernetes_schema_validation() {
    let [default, all_on] = renders();
    // Oldest supported (Chart.yaml kubeVersion) and the pinned recent one.
    kubernetes_validate(default, "1.30.0");
    kubernetes_validate(default, "1.35.0");
    // VolumeAttributesClass storage.k8s.io/v1 exists from 1.34 on.
    kubernetes_validate(all_on, "1.35.0");
    assert_eq!(all_on.of_kind("ServiceMonitor").len(), 1);
}

#[test]
fn schema_validation_catches_a_broken_manifest() {
    // The validator really looks at our objects: one wrong field type fails.
    let [default, _] = renders();
    let broken = default.yaml.replacen("attachRequired: true", "attachRequired: \"yes\"", 1);
    assert_ne!(broken, default.yaml);
    let dir = tempdir("validate-broken");
    let file = dir.join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let out = run(command(tool("kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", "1.35.0"])
        .arg(&file));
    assert!(!out.status.success(), "a CSIDriver with a string attachRequired passed: {}", describe(&out));
}

// ---------------------------------------------------------------- invariants

#[test]
fn csi_driver_object_matches_the_issue() {
    for r in renders() {
        let d = r.one("CSIDriver");
        assert_eq!(r.driver(), "csi.volumed.dev", "{}", r.label);
        let spec = &d["spec"];
        assert_eq!(spec["attachRequired"], Value::Bool(true));
        assert_eq!(spec["podInfoOnMount"], Value::Bool(true));
        assert_eq!(s(&spec["fsGroupPolicy"]), "File");
        assert_eq!(strs(&spec["volumeLifecycleModes"]), vec!["Persistent"]);
    }
}

#[test]
fn driver_name_is_the_same_everywhere() {
    for r in renders() {
        let driver = r.driver();
        let classes = r.of_kind("StorageClass");
        assert!(classes.len() >= 3, "{}", r.label);
        for sc in classes {
            assert_eq!(s(&sc["provisioner"]), driver, "{}: {}", r.label, s(&sc["metadata"]["name"]));
        }
        assert_eq!(s(&r.one("VolumeSnapshotClass")["driver"]), driver, "{}", r.label);
        for vac in r.of_kind("VolumeAttributesClass") {
            assert_eq!(s(&vac["driverName"]), driver, "{}", r.label);
        }
        let controller = container(r.deployment(), "csi-controller");
        assert_eq!(want_flag(controller, "--driver-name"), driver, "{}", r.label);
        let node = container(r.daemonset(), "csi-node");
        assert_eq!(want_flag(node, "--driver-name"), driver, "{}", r.label);
        let registrar = container(r.daemonset(), "node-driver-registrar");
        let reg_path = want_flag(registrar, "--kubelet-registration-path");
        assert!(
            reg_path.ends_with(&format!("/plugins/{driver}/csi.sock")),
            "{}: registration path {reg_path} is not under plugins/{driver}",
            r.label
        );
    }
}

#[test]
fn node_pod_runs_volumed_and_csi_node_as_separate_containers() {
    for r in renders() {
        let ds = r.daemonset();
        let spec = pod_spec(ds);
        let names: Vec<String> = seq(&spec["containers"]).iter().map(|c| s(&c["name"]).to_string()).collect();
        for want in ["volumed", "csi-node", "node-driver-registrar", "liveness-probe"] {
            assert!(names.contains(&want.to_string()), "{}: node pod containers {names:?}", r.label);
        }
        let volumed = container(ds, "volumed");
        let csi_node = container(ds, "csi-node");
        assert_eq!(strs(&volumed["command"]), vec!["volumed"], "{}", r.label);
        assert_eq!(strs(&csi_node["command"]), vec!["csi-node"], "{}", r.label);
        // Each restarts on its own: its own probes, and neither runs the other.
        assert!(!volumed["livenessProbe"].is_null() && !csi_node["livenessProbe"].is_null());
        assert_eq!(s(&spec["priorityClassName"]), "system-node-critical", "{}", r.label);
        assert_eq!(spec["hostNetwork"], Value::Bool(true), "{}", r.label);
        assert_eq!(s(&spec["dnsPolicy"]), "ClusterFirstWithHostNet", "{}", r.label);
        for c in [volumed, csi_node] {
            assert_eq!(c["securityContext"]["privileged"], Value::Bool(true), "{}: {}", r.label, s(&c["name"]));
        }
        // Sidecars do not need privileges.
        for name in ["node-driver-registrar", "liveness-probe"] {
            let c = container(ds, name);
            assert_ne!(c["securityContext"]["privileged"], Value::Bool(true), "{}: {name}", r.label);
        }
    }
}

#[test]
fn node_pod_mounts_and_propagation() {
    for r in renders() {
        let ds = r.daemonset();
        let volumed = container(ds, "volumed");
        let csi_node = container(ds, "csi-node");
        let kubelet_dir = r.value(&["node", "kubeletDir"]);
        let kubelet_dir = s(&kubelet_dir).trim_end_matches('/').to_string();

        // kubelet dir: same path in the container as on the host, Bidirectional.
        let kd = mount(csi_node, "kubelet-dir");
        assert_eq!(s(&kd["mountPath"]), kubelet_dir, "{}", r.label);
        assert_eq!(s(&kd["mountPropagation"]), "Bidirectional", "{}", r.label);
        assert_eq!(s(&volume(ds, "kubelet-dir")["hostPath"]["path"]), kubelet_dir, "{}", r.label);
        assert_eq!(want_flag(csi_node, "--kubelet-dir"), kubelet_dir, "{}", r.label);

        // Run dir: volumed's FUSE mounts reach the host and csi-node.
        let run_v = mount(volumed, "run-dir");
        let run_n = mount(csi_node, "run-dir");
        assert_eq!(s(&run_v["mountPropagation"]), "Bidirectional", "{}", r.label);
        assert_eq!(s(&run_n["mountPropagation"]), "HostToContainer", "{}", r.label);
        assert_eq!(s(&volume(ds, "run-dir")["hostPath"]["path"]), s(&r.value(&["node", "runDir"])), "{}", r.label);
        // csi-node reaches volumed's socket through that shared directory.
        let socket = want_flag(volumed, "--local-socket");
        assert_eq!(want_flag(csi_node, "--volumed-socket"), socket, "{}", r.label);
        assert_eq!(want_flag(volumed, "--run-dir"), s(&run_v["mountPath"]), "{}", r.label);
        assert!(socket.starts_with(&format!("{}/", s(&run_n["mountPath"]))), "{}: {socket}", r.label);

        // Devices.
        for c in [volumed, csi_node] {
            assert_eq!(s(&mount(c, "dev")["mountPath"]), "/dev", "{}", r.label);
        }
        assert_eq!(s(&volume(ds, "dev")["hostPath"]["path"]), "/dev");
        assert_eq!(s(&mount(volumed, "dev-fuse")["mountPath"]), "/dev/fuse");
        let fuse = &volume(ds, "dev-fuse")["hostPath"];
        assert_eq!((s(&fuse["path"]), s(&fuse["type"])), ("/dev/fuse", "CharDevice"));

        // Data directory: configurable hostPath, where --data-dir points.
        let data = mount(volumed, "data");
        assert_eq!(want_flag(volumed, "--data-dir"), s(&data["mountPath"]), "{}", r.label);
        assert_eq!(s(&volume(ds, "data")["hostPath"]["path"]), s(&r.value(&["node", "dataDir"])), "{}", r.label);

        // Socket dir for kubelet and the registrar.
        let plugin_dir = format!("{kubelet_dir}/plugins/{}", r.driver());
        assert_eq!(s(&volume(ds, "plugin-dir")["hostPath"]["path"]), plugin_dir, "{}", r.label);
        assert_eq!(
            want_flag(container(ds, "node-driver-registrar"), "--kubelet-registration-path"),
            format!("{plugin_dir}/csi.sock")
        );
        assert_eq!(s(&volume(ds, "registration-dir")["hostPath"]["path"]), format!("{kubelet_dir}/plugins_registry"));
        assert_eq!(want_flag(csi_node, "--endpoint"), "unix:///csi/csi.sock");
        assert_eq!(s(&mount(csi_node, "plugin-dir")["mountPath"]), "/csi");
        for name in ["node-driver-registrar", "liveness-probe"] {
            let c = container(ds, name);
            assert_eq!(want_flag(c, "--csi-address"), "/csi/csi.sock", "{name}");
            assert_eq!(s(&mount(c, "plugin-dir")["mountPath"]), "/csi", "{name}");
        }
    }
}

#[test]
fn volumed_gets_topology_labels_from_the_node_object() {
    for r in renders() {
        let ds = r.daemonset();
        let volumed = container(ds, "volumed");
        let init = container(ds, "node-labels");
        assert_eq!(strs(&init["command"]), vec!["volumed-node-labels"]);
        let env: BTreeMap<String, Value> =
            seq(&init["env"]).iter().map(|e| (s(&e["name"]).to_string(), e.clone())).collect();
        assert_eq!(s(&env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]), "spec.nodeName");
        let labels_file = s(&env["LABELS_FILE"]["value"]).to_string();
        assert_eq!(want_flag(volumed, "--labels-file"), labels_file, "{}", r.label);
        // Both see the file through the same pod-private volume.
        let m_init = mount(init, "node-labels");
        let m_vol = mount(volumed, "node-labels");
        assert_eq!(s(&m_init["mountPath"]), s(&m_vol["mountPath"]));
        assert!(labels_file.starts_with(&format!("{}/", s(&m_vol["mountPath"]))));
        assert!(!volume(ds, "node-labels")["emptyDir"].is_null());
        let map = s(&env["LABEL_MAP"]["value"]).to_string();
        assert!(map.split(',').any(|p| p == "zone=topology.kubernetes.io/zone"), "{}: LABEL_MAP {map}", r.label);
        // The node's ServiceAccount may read Nodes (and nothing else).
        let sa = s(&pod_spec(ds)["serviceAccountName"]).to_string();
        let perms = effective_permissions(r, &sa);
        assert_eq!(perms, perm_set(&[("", "nodes", &["get"])]), "{}", r.label);
        // volumed's own node name from the downward API.
        assert_eq!(want_flag(volumed, "--node-name"), "$(NODE_NAME)");
        let env_v = container_env(volumed);
        assert_eq!(env_v["NODE_NAME"], FAKE_NODE);
    }
}

#[test]
fn catalog_bootstrap_join_and_leave_need_no_manual_steps() {
    for r in renders() {
        let ds = r.daemonset();
        let volumed = container(ds, "volumed");
        let api_port = yaml_int(&r.value(&["node", "ports", "api"]));
        assert_eq!(
            yaml_int(&Value::String(want_flag(volumed, "--bootstrap-expect"))),
            yaml_int(&r.value(&["cluster", "bootstrapExpect"]))
        );
        assert_eq!(
            yaml_int(&Value::String(want_flag(volumed, "--catalog-voters"))),
            yaml_int(&r.value(&["cluster", "catalogVoters"]))
        );
        // Seeds: the headless Service that lists every node pod, ready or not.
        let join = want_flag(volumed, "--join");
        let peers = r
            .of_kind("Service")
            .into_iter()
            .find(|svc| {
                s(&svc["spec"]["clusterIP"]) == "None" && join.starts_with(&format!("{}.", s(&svc["metadata"]["name"])))
            })
            .unwrap_or_else(|| panic!("{}: --join {join} does not name a headless Service", r.label));
        assert_eq!(peers["spec"]["publishNotReadyAddresses"], Value::Bool(true));
        assert_eq!(
            join,
            format!("{}.{NAMESPACE}.svc.{}:{api_port}", s(&peers["metadata"]["name"]), s(&r.value(&["clusterDomain"])))
        );
        assert_selects_node_pods(r, peers);
        assert_eq!(port_of(&want_flag(volumed, "--listen")) as i64, api_port);
        assert_eq!(want_flag(volumed, "--advertise"), format!("$(POD_IP):{api_port}"));
        assert_eq!(container_env(volumed)["POD_IP"], FAKE_POD_IP);
        // Leaving: the node GC CronJob runs volctl against the API Service
        // and may list Nodes, nothing more.
        let gc = r.one("CronJob");
        let c = container(gc, "node-gc");
        assert_eq!(strs(&c["command"]), vec!["volumed-node-gc"]);
        let env = container_env(c);
        assert_eq!(env["VOLUMED_ENDPOINT"], api_endpoint(r));
        let sa = s(&pod_spec(gc)["serviceAccountName"]).to_string();
        assert_eq!(effective_permissions(r, &sa), perm_set(&[("", "nodes", &["list"])]));
    }
}

fn api_endpoint(r: &Render) -> String {
    let api = r
        .of_kind("Service")
        .into_iter()
        .find(|svc| s(&svc["metadata"]["name"]).ends_with("-api"))
        .expect("API service");
    format!(
        "http://{}.{NAMESPACE}.svc.{}:{}",
        s(&api["metadata"]["name"]),
        s(&r.value(&["clusterDomain"])),
        yaml_int(&api["spec"]["ports"][0]["port"])
    )
}

fn assert_selects_node_pods(r: &Render, svc: &Value) {
    let pod_labels = &r.daemonset()["spec"]["template"]["metadata"]["labels"];
    let selector = svc["spec"]["selector"].as_mapping().expect("selector");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod_labels[k.as_str().unwrap()], v, "{}: {} selector", r.label, s(&svc["metadata"]["name"]));
    }
}

#[test]
fn controller_deployment_runs_csi_controller_and_the_standard_sidecars() {
    for r in renders() {
        let dep = r.deployment();
        assert_eq!(yaml_int(&dep["spec"]["replicas"]), yaml_int(&r.value(&["controller", "replicas"])), "{}", r.label);
        assert!(yaml_int(&dep["spec"]["replicas"]) >= 2, "{}: controller needs a standby", r.label);
        let c = container(dep, "csi-controller");
        assert_eq!(strs(&c["command"]), vec!["csi-controller"]);
        assert_eq!(want_flag(c, "--endpoint"), "unix:///csi/csi.sock");
        assert_eq!(want_flag(c, "--volumed"), api_endpoint(r), "{}", r.label);
        let api = r.of_kind("Service").into_iter().find(|svc| s(&svc["metadata"]["name"]).ends_with("-api")).unwrap();
        assert_selects_node_pods(r, api);

        let sidecars = ["csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"];
        for name in sidecars {
            let sc = container(dep, name);
            assert_eq!(want_flag(sc, "--csi-address"), "/csi/csi.sock", "{name}");
            assert_eq!(s(&mount(sc, "socket-dir")["mountPath"]), "/csi", "{name}");
            assert!(has_flag(sc, "--leader-election"), "{}: {name} without leader election", r.label);
            assert_eq!(want_flag(sc, "--leader-election-namespace"), "$(NAMESPACE)");
            assert_eq!(container_env(sc)["NAMESPACE"], NAMESPACE);
        }
        let prov = container(dep, "csi-provisioner");
        assert!(has_flag(prov, "--extra-create-metadata"), "{}", r.label);
        let gates = want_flag(prov, "--feature-gates");
        assert!(gates.split(',').any(|g| g == "Topology=true"), "{}: {gates}", r.label);
        // The livenessprobe sidecar serves csi-controller's liveness check.
        let lp = container(dep, "liveness-probe");
        let lp_port = port_of(&want_flag(lp, "--http-endpoint"));
        let probe_port = &c["livenessProbe"]["httpGet"]["port"];
        let named = seq(&c["ports"]).iter().find(|p| &p["name"] == probe_port).expect("named probe port");
        assert_eq!(yaml_int(&named["containerPort"]) as u16, lp_port, "{}", r.label);
        // Same for csi-node.
        let ds = r.daemonset();
        let node_lp = port_of(&want_flag(container(ds, "liveness-probe"), "--http-endpoint"));
        let cn = container(ds, "csi-node");
        let named = seq(&cn["ports"])
            .iter()
            .find(|p| p["name"] == cn["livenessProbe"]["httpGet"]["port"])
            .expect("named probe port");
        assert_eq!(yaml_int(&named["containerPort"]) as u16, node_lp, "{}", r.label);
        // volumed answers grpc.health.v1 on its API port.
        let v = container(ds, "volumed");
        let api_port = port_of(&want_flag(v, "--listen")) as i64;
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(yaml_int(&v[probe]["grpc"]["port"]), api_port, "{}: volumed {probe}", r.label);
        }

        // PDB keeps one controller through drains.
        let pdb = r.one("PodDisruptionBudget");
        let min = yaml_int(&pdb["spec"]["minAvailable"]);
        assert!(min >= 1 && min < yaml_int(&dep["spec"]["replicas"]), "{}: minAvailable {min}", r.label);
        let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
        for (k, val) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
            assert_eq!(&pod_labels[k.as_str().unwrap()], val);
        }
    }
}

#[test]
fn every_container_has_resources_and_every_long_running_one_a_probe() {
    for r in renders() {
        for kind in ["Deployment", "DaemonSet", "CronJob"] {
            for w in r.of_kind(kind) {
                let spec = pod_spec(w);
                for c in seq(&spec["containers"]).iter().chain(seq(&spec["initContainers"])) {
                    let name = s(&c["name"]);
                    let res = &c["resources"];
                    assert!(
                        !res["requests"]["memory"].is_null() && !res["requests"]["cpu"].is_null(),
                        "{}: {kind}/{name} has no requests",
                        r.label
                    );
                    assert!(!res["limits"]["memory"].is_null(), "{}: {kind}/{name} has no memory limit", r.label);
                    let init = seq(&spec["initContainers"]).iter().any(|i| s(&i["name"]) == name);
                    if kind != "CronJob" && !init && name != "liveness-probe" {
                        assert!(!c["livenessProbe"].is_null(), "{}: {kind}/{name} has no liveness probe", r.label);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- RBAC

type Perm = (String, String, String); // (apiGroup, resource, verb)

fn perm_set(rules: &[(&str, &str, &[&str])]) -> BTreeSet<Perm> {
    rules
        .iter()
        .flat_map(|(g, res, verbs)| verbs.iter().map(move |v| (g.to_string(), res.to_string(), v.to_string())))
        .collect()
}

fn rules_of(role: &Value) -> BTreeSet<Perm> {
    let mut out = BTreeSet::new();
    for rule in seq(&role["rules"]) {
        for g in strs(&rule["apiGroups"]) {
            for res in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    assert!(g != "*" && res != "*" && v != "*", "wildcard in {}", s(&role["metadata"]["name"]));
                    out.insert((g.clone(), res.clone(), v));
                }
            }
        }
    }
    out
}

/// Everything the ServiceAccount may do, through (Cluster)RoleBindings.
fn effective_permissions(r: &Render, sa: &str) -> BTreeSet<Perm> {
    let mut out = BTreeSet::new();
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        for b in r.of_kind(kind) {
            let bound = seq(&b["subjects"]).iter().any(|sub| {
                s(&sub["kind"]) == "ServiceAccount" && s(&sub["name"]) == sa && s(&sub["namespace"]) == NAMESPACE
            });
            if !bound {
                continue;
            }
            let role = r.named(s(&b["roleRef"]["kind"]), s(&b["roleRef"]["name"]));
            out.extend(rules_of(role));
        }
    }
    out
}

/// What each controller sidecar needs, from the sidecars' documented RBAC.
fn sidecar_needs(sidecar: &str, vac: bool) -> BTreeSet<Perm> {
    let events: (&str, &str, &[&str]) = ("", "events", &["list", "watch", "create", "update", "patch"]);
    let mut p = match sidecar {
        "csi-provisioner" => perm_set(&[
            ("", "persistentvolumes", &["get", "list", "watch", "create", "patch", "delete"]),
            ("", "persistentvolumeclaims", &["get", "list", "watch", "update"]),
            ("storage.k8s.io", "storageclasses", &["get", "list", "watch"]),
            events,
            ("snapshot.storage.k8s.io", "volumesnapshots", &["get", "list"]),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents", &["get", "list"]),
            ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
            ("", "nodes", &["get", "list", "watch"]),
            ("storage.k8s.io", "volumeattachments", &["get", "list", "watch"]),
        ]),
        "csi-attacher" => perm_set(&[
            ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
            ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
            ("storage.k8s.io", "volumeattachments", &["get", "list", "watch", "patch"]),
            ("storage.k8s.io", "volumeattachments/status", &["patch"]),
        ]),
        "csi-snapshotter" => perm_set(&[
            events,
            ("snapshot.storage.k8s.io", "volumesnapshotclasses", &["get", "list", "watch"]),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents", &["get", "list", "watch", "update", "patch"]),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", &["update", "patch"]),
        ]),
        "csi-resizer" => perm_set(&[
            ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
            ("", "persistentvolumeclaims", &["get", "list", "watch"]),
            ("", "persistentvolumeclaims/status", &["patch"]),
            ("", "pods", &["get", "list", "watch"]),
            events,
        ]),
        other => panic!("unknown sidecar {other}"),
    };
    if vac && matches!(sidecar, "csi-provisioner" | "csi-resizer") {
        p.extend(perm_set(&[("storage.k8s.io", "volumeattributesclasses", &["get", "list", "watch"])]));
    }
    // Leader election, namespaced.
    p.extend(perm_set(&[(
        "coordination.k8s.io",
        "leases",
        &["get", "list", "watch", "create", "update", "patch", "delete"],
    )]));
    p
}

#[test]
fn controller_rbac_covers_every_sidecar_and_nothing_more() {
    for r in renders() {
        let dep = r.deployment();
        let sa = s(&pod_spec(dep)["serviceAccountName"]).to_string();
        let have = effective_permissions(r, &sa);
        let vac = r.value(&["volumeAttributesClass", "enabled"]) == Value::Bool(true);
        let mut needed = BTreeSet::new();
        for sidecar in ["csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"] {
            let need = sidecar_needs(sidecar, vac);
            let missing: Vec<_> = need.difference(&have).collect();
            assert!(missing.is_empty(), "{}: {sidecar} lacks {missing:?}", r.label);
            needed.extend(need);
        }
        let extra: Vec<_> = have.difference(&needed).collect();
        assert!(extra.is_empty(), "{}: controller may do more than its sidecars need: {extra:?}", r.label);
        // Leases only in the release namespace.
        for crb in r.of_kind("ClusterRole") {
            assert!(
                !rules_of(crb).iter().any(|(_, res, _)| res == "leases"),
                "{}: cluster-wide lease access in {}",
                r.label,
                s(&crb["metadata"]["name"])
            );
        }
        // Nobody reads Secrets.
        for role in r.of_kind("ClusterRole").into_iter().chain(r.of_kind("Role")) {
            assert!(!rules_of(role).iter().any(|(_, res, _)| res == "secrets"));
        }
    }
}

// ---------------------------------------------------------------- classes

#[test]
fn storage_classes_and_snapshot_class() {
    for r in renders() {
        let repl = r.named("StorageClass", "volumed-replicated");
        let p = &repl["parameters"];
        assert_eq!(s(&p["replicas"]), "3");
        assert_eq!(s(&p["kind"]), "block");
        assert_eq!(s(&p["csi.storage.k8s.io/fstype"]), "ext4");
        assert_eq!(s(&repl["volumeBindingMode"]), "WaitForFirstConsumer");
        assert_eq!(repl["allowVolumeExpansion"], Value::Bool(true));
        let shared = r.named("StorageClass", "volumed-shared");
        assert_eq!(s(&shared["parameters"]["kind"]), "file");
        let single = r.named("StorageClass", "volumed-single");
        assert_eq!(s(&single["parameters"]["replicas"]), "1");
        // Every parameter is one csi-controller knows (docs/storageclass.md).
        let known = [
            "replicas",
            "kind",
            "fsType",
            "zoneSpread",
            "qos.readIOPS",
            "qos.writeIOPS",
            "qos.readBps",
            "qos.writeBps",
        ];
        for sc in r.of_kind("StorageClass") {
            for (k, v) in sc["parameters"].as_mapping().into_iter().flatten() {
                let k = k.as_str().unwrap();
                assert!(known.contains(&k) || k.starts_with("csi.storage.k8s.io/"), "{}: {k}", r.label);
                assert!(v.is_string(), "{}: parameter {k} must render as a string", r.label);
            }
        }
        let vsc = r.one("VolumeSnapshotClass");
        assert!(["Delete", "Retain"].contains(&s(&vsc["deletionPolicy"])));
    }
    let [default, all_on] = renders();
    // No default StorageClass unless asked for; exactly one when asked.
    let defaults = |r: &Render| {
        r.of_kind("StorageClass")
            .into_iter()
            .filter(|sc| s(&sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"]) == "true")
            .count()
    };
    assert_eq!(defaults(default), 0);
    assert_eq!(defaults(all_on), 1);
    let fast = all_on.named("StorageClass", "volumed-fast-xfs");
    for key in ["zoneSpread", "qos.readIOPS", "qos.writeIOPS", "qos.readBps", "qos.writeBps"] {
        assert!(!fast["parameters"][key].is_null(), "all-on values must exercise {key}");
    }
}

#[test]
fn service_monitor_scrapes_volumed_metrics() {
    let [default, all_on] = renders();
    assert!(default.of_kind("ServiceMonitor").is_empty(), "ServiceMonitor must be opt-in");
    let sm = all_on.one("ServiceMonitor");
    let svc = all_on
        .of_kind("Service")
        .into_iter()
        .find(|svc| {
            sm["spec"]["selector"]["matchLabels"]
                .as_mapping()
                .unwrap()
                .iter()
                .all(|(k, v)| &svc["metadata"]["labels"][k.as_str().unwrap()] == v)
        })
        .expect("ServiceMonitor selects no Service");
    assert_selects_node_pods(all_on, svc);
    let port_name = s(&sm["spec"]["endpoints"][0]["port"]);
    let port = seq(&svc["spec"]["ports"]).iter().find(|p| s(&p["name"]) == port_name).expect("metrics port");
    let volumed = container(all_on.daemonset(), "volumed");
    assert_eq!(port_of(&want_flag(volumed, "--metrics-listen")) as i64, yaml_int(&port["port"]));
}

#[test]
fn bad_values_are_rejected_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "storageClasses.volumed-single.parameters.colour=red"], "colour"),
        (&["--set", "storageClasses.volumed-single.parameters.replicas=7"], "replicas"),
        (&["--set", "cluster.catalogVoters=4"], "catalogVoters"),
        (&["--set", "node.frontend=nbd"], "frontend"),
        (&["--set", "storageClasses.volumed-single.parameters.kind=object"], "kind"),
    ];
    for (extra, needle) in cases {
        let out = helm_template(&[], extra);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(text(&out.stderr).contains(needle), "{extra:?}: message does not name {needle}: {}", describe(&out));
    }
    // The templates check too, for installs that skip the values schema.
    let template_cases: &[(&[&str], &str)] = &[
        (&["--set", "storageClasses.volumed-single.parameters.colour=red"], "unknown parameter \"colour\""),
        (&["--set-string", "storageClasses.volumed-single.parameters.replicas=0"], "must be 1..5"),
        (&["--set", "cluster.catalogVoters=4"], "must be 3 or 5"),
        (
            &[
                "--set",
                "storageClasses.volumed-replicated.default=true",
                "--set",
                "storageClasses.volumed-single.default=true",
            ],
            "more than one StorageClass",
        ),
        (
            &["--set", "volumeAttributesClass.enabled=true", "--set", "volumeAttributesClass.classes.x.replicas=2"],
            "cannot be changed on an existing volume",
        ),
        (&["--set", "sidecars.snapshotter.enabled=false"], "needs sidecars.snapshotter.enabled"),
    ];
    for (extra, needle) in template_cases {
        let mut args: Vec<&str> = extra.to_vec();
        args.push("--skip-schema-validation");
        let out = helm_template(&[], &args);
        assert!(!out.status.success(), "{extra:?} was accepted by the templates");
        assert!(text(&out.stderr).contains(needle), "{extra:?}: {}", describe(&out));
    }
}

// ---------------------------------------------------------------- image

fn dockerfile() -> String {
    std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap()
}

/// Logical Dockerfile lines: continuations joined, comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in dockerfile().lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
        }
    }
    out
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = run(command(tool("hadolint")).arg(repo_root().join("deploy/Dockerfile")));
    assert!(out.status.success(), "hadolint: {}", describe(&out));
}

#[test]
fn dockerfile_is_multi_stage_with_the_runtime_tools() {
    let ins = dockerfile_instructions();
    let froms: Vec<&String> = ins.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage build expected: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    let runtime_start = ins.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
    let runtime = &ins[runtime_start..];
    assert!(runtime[0].contains("-slim"), "runtime stage should be slim: {}", runtime[0]);
    let install = runtime
        .iter()
        .find(|i| i.starts_with("RUN ") && i.contains("apt-get install"))
        .expect("runtime stage installs packages");
    let words: BTreeSet<&str> = install.split_whitespace().collect();
    for pkg in ["e2fsprogs", "xfsprogs", "util-linux", "mount", "fuse3", "curl", "jq", "ca-certificates"] {
        assert!(words.contains(pkg), "runtime image lacks {pkg}: {install}");
    }
    assert!(install.contains("--no-install-recommends") && install.contains("rm -rf /var/lib/apt/lists"));
    // Everything the chart runs from our image is in it.
    let copied: BTreeSet<String> = runtime
        .iter()
        .filter(|i| i.starts_with("COPY "))
        .flat_map(|i| {
            let parts: Vec<&str> = i.split_whitespace().filter(|p| !p.starts_with("--")).collect();
            parts[1..parts.len() - 1].iter().map(|p| p.rsplit('/').next().unwrap().to_string()).collect::<Vec<_>>()
        })
        .collect();
    for r in renders() {
        let repo = s(&r.value(&["image", "repository"])).to_string();
        for kind in ["Deployment", "DaemonSet", "CronJob"] {
            for w in r.of_kind(kind) {
                let spec = pod_spec(w);
                for c in seq(&spec["containers"]).iter().chain(seq(&spec["initContainers"])) {
                    if !s(&c["image"]).starts_with(&repo) {
                        continue;
                    }
                    let cmd = strs(&c["command"]);
                    assert!(!cmd.is_empty(), "{}: {} runs our image without a command", r.label, s(&c["name"]));
                    assert!(
                        copied.contains(&cmd[0]),
                        "{}: {} runs {}, not in the image {copied:?}",
                        r.label,
                        s(&c["name"]),
                        cmd[0]
                    );
                }
            }
        }
    }
    for script in ["volumed-node-labels", "volumed-node-gc"] {
        assert!(copied.contains(script));
        let meta = std::fs::metadata(repo_root().join("deploy/scripts").join(script)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert!(meta.permissions().mode() & 0o111 != 0, "{script} is not executable");
    }
}

#[test]
fn dockerfile_copies_the_binaries_the_workspace_builds() {
    let ins = dockerfile_instructions();
    let build = ins.iter().find(|i| i.contains("cargo build")).expect("Dockerfile builds with cargo");
    let bins = built_binaries();
    for pkg in ["volumed", "volctl", "volumed-csi-controller", "volumed-csi-node"] {
        assert!(build.split_whitespace().any(|w| w == pkg), "Dockerfile does not build -p {pkg}: {build}");
    }
    for bin in ["volumed", "volctl", "csi-controller", "csi-node"] {
        assert!(bins.contains_key(bin), "the workspace does not build {bin}: {bins:?}");
        assert!(build.contains(&format!("target/release/{bin}")), "Dockerfile does not copy {bin} out of the build");
        let copy = ins
            .iter()
            .find(|i| i.starts_with("COPY --from=build") && i.contains(&format!("/{bin} ")))
            .unwrap_or_else(|| panic!("runtime stage does not copy {bin}"));
        assert!(copy.ends_with("/usr/local/bin/"), "{copy}");
    }
}

#[test]
fn chart_app_version_is_the_workspace_version() {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let in_package = cargo
        .split("[workspace.package]")
        .nth(1)
        .expect("[workspace.package]")
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = "))
        .expect("workspace version")
        .trim_matches('"')
        .to_string();
    assert_eq!(s(&chart["appVersion"]), in_package, "image tag default must be the binaries' version");
}

// ---------------------------------------------------------------- scripts

#[test]
fn scripts_pass_shellcheck() {
    let root = repo_root();
    let out = run(command(tool("shellcheck")).args([
        root.join("deploy/scripts/volumed-node-labels"),
        root.join("deploy/scripts/volumed-node-gc"),
        root.join(".ci/install-helm-tools.sh"),
    ]));
    assert!(out.status.success(), "shellcheck: {}", describe(&out));
}

/// A one-connection-at-a-time HTTP server on 127.0.0.1 standing in for the
/// API server: answers `GET <path>` with a fixed status and body, and records
/// the Authorization header it was sent.
struct FakeApi {
    url: String,
    auth: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

impl FakeApi {
    fn start(routes: Vec<(String, u16, String)>) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (auth2, stop2) = (auth.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.strip_prefix("Authorization: ") {
                        auth2.lock().unwrap().push(v.trim().to_string());
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                let (status, body) = routes
                    .iter()
                    .find(|(p, _, _)| *p == path)
                    .map(|(_, st, b)| (*st, b.clone()))
                    .unwrap_or((404, "{\"kind\":\"Status\",\"code\":404}".to_string()));
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(resp.as_bytes()).ok();
            }
        });
        FakeApi { url: format!("http://{addr}"), auth, stop, thread: Some(thread), addr }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// A scratch directory removed on drop, also when the test fails.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("volumed-helm-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn service_account_dir() -> TempDir {
    let d = tempdir("sa");
    std::fs::write(d.join("token"), "test-token-123").unwrap();
    d
}

fn script(name: &str) -> Command {
    let mut cmd = command(repo_root().join("deploy/scripts").join(name));
    cmd.env_remove("KUBERNETES_SERVICE_HOST");
    cmd
}

#[test]
fn node_labels_script_copies_the_node_labels_volumed_needs() {
    let node = serde_json::json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": "node-a", "labels": {
            "topology.kubernetes.io/zone": "zone-b",
            "topology.kubernetes.io/region": "eu-1",
            "kubernetes.io/hostname": "node-a"}}
    });
    let api = FakeApi::start(vec![("/api/v1/nodes/node-a".into(), 200, node.to_string())]);
    let sa = service_account_dir();
    let out_dir = tempdir("labels");
    let labels = out_dir.join("sub/labels");
    let out = run(script("volumed-node-labels")
        .env("NODE_NAME", "node-a")
        .env("LABELS_FILE", &labels)
        .env("LABEL_MAP", "zone=topology.kubernetes.io/zone,region=topology.kubernetes.io/region,rack=example.com/rack")
        .env("KUBERNETES_API", &api.url)
        .env("SERVICEACCOUNT_DIR", &sa));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read_to_string(&labels).unwrap(), "zone=zone-b\nregion=eu-1\n");
    assert!(text(&out.stderr).contains("no label example.com/rack"), "{}", describe(&out));
    assert_eq!(api.auth.lock().unwrap().as_slice(), ["Bearer test-token-123"]);

    // Forbidden (RBAC missing) is an error naming the cause; no file is left.
    let api403 = FakeApi::start(vec![("/api/v1/nodes/node-a".into(), 403, "{}".into())]);
    let labels2 = out_dir.join("labels2");
    let out = run(script("volumed-node-labels")
        .env("NODE_NAME", "node-a")
        .env("LABELS_FILE", &labels2)
        .env("LABEL_MAP", "zone=topology.kubernetes.io/zone")
        .env("KUBERNETES_API", &api403.url)
        .env("SERVICEACCOUNT_DIR", &sa));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("get nodes"), "{}", describe(&out));
    assert!(!labels2.exists());

    // A malformed map is refused.
    let out = run(script("volumed-node-labels")
        .env("NODE_NAME", "node-a")
        .env("LABELS_FILE", &labels2)
        .env("LABEL_MAP", "zone")
        .env("KUBERNETES_API", &api.url)
        .env("SERVICEACCOUNT_DIR", &sa));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("bad LABEL_MAP entry 'zone'"), "{}", describe(&out));
}

#[test]
fn node_gc_script_refuses_to_act_on_an_empty_or_unreadable_node_list() {
    let sa = service_account_dir();
    let empty = FakeApi::start(vec![("/api/v1/nodes".into(), 200, r#"{"kind":"NodeList","items":[]}"#.into())]);
    let out = run(script("volumed-node-gc")
        .env("VOLUMED_ENDPOINT", "http://127.0.0.1:1")
        .env("KUBERNETES_API", &empty.url)
        .env("SERVICEACCOUNT_DIR", &sa));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("refusing to remove anything"), "{}", describe(&out));

    let denied = FakeApi::start(vec![("/api/v1/nodes".into(), 403, "{}".into())]);
    let out = run(script("volumed-node-gc")
        .env("VOLUMED_ENDPOINT", "http://127.0.0.1:1")
        .env("KUBERNETES_API", &denied.url)
        .env("SERVICEACCOUNT_DIR", &sa));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("list nodes"), "{}", describe(&out));

    let out = run(script("volumed-node-gc")
        .env("VOLUMED_ENDPOINT", "http://127.0.0.1:1")
        .env("MAX_REMOVALS", "all")
        .env("KUBERNETES_API", &denied.url)
        .env("SERVICEACCOUNT_DIR", &sa));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("MAX_REMOVALS must be a number"), "{}", describe(&out));
}

// ---------------------------------------------------------------- binaries

/// Builds the binaries the chart runs; bin name -> path. Built, not looked
/// up, so CI from a fresh clone checks the current flags.
fn built_binaries() -> &'static BTreeMap<String, PathBuf> {
    static BINS: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    BINS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = command(cargo)
            .current_dir(repo_root())
            .args([
                "build",
                "-p",
                "volumed",
                "-p",
                "volctl",
                "-p",
                "volumed-csi-controller",
                "-p",
                "volumed-csi-node",
                "--bins",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "cargo build -p volumed -p volctl -p volumed-csi-controller -p volumed-csi-node --bins failed \
             (exit {:?}); the chart's binaries must build",
            out.status.code()
        );
        let mut bins = BTreeMap::new();
        for line in text(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] == "compiler-artifact" {
                if let Some(exe) = msg["executable"].as_str() {
                    let name = msg["target"]["name"].as_str().unwrap_or_default().to_string();
                    bins.insert(name, PathBuf::from(exe));
                }
            }
        }
        bins
    })
}

/// A container's environment as the kubelet would set it: downward-API
/// fields replaced by stand-ins, `$(VAR)` references expanded in order.
fn container_env(c: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in seq(&c["env"]) {
        let name = s(&e["name"]).to_string();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else {
            match s(&e["valueFrom"]["fieldRef"]["fieldPath"]) {
                "spec.nodeName" => FAKE_NODE.to_string(),
                "status.podIP" | "status.hostIP" => FAKE_POD_IP.to_string(),
                "metadata.namespace" => NAMESPACE.to_string(),
                "metadata.name" => format!("{RELEASE}-pod-x1y2z"),
                other => panic!("env {name}: no stand-in for {other:?}"),
            }
        };
        env.insert(name, value);
    }
    env
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a
/// literal `$`, anything else is left as written.
fn expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) if env.contains_key(&inner[..end]) => {
                    out.push_str(&env[&inner[..end]]);
                    rest = &inner[end + 1..];
                }
                _ => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Runs `bin args... extra...` with the container's env only; a binary that
/// does not exit within a minute was not in check mode and fails the test.
fn run_binary(bin: &Path, args: &[String], env: &BTreeMap<String, String>) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!("{bin:?} {args:?} did not exit within 60s (not in check mode?): {}", describe(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
    Output { status: child.wait().unwrap(), stdout, stderr }
}

/// Every string in a JSON document.
fn json_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(x) => out.push(x.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

struct Invocation {
    label: String,
    bin: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    _scratch: Vec<TempDir>,
}

/// Our binaries as the chart runs them. Pod-private emptyDir mounts are
/// given a scratch directory here (the labels file the init container would
/// have written is put there); host paths are passed unchanged.
fn chart_invocations(r: &Render, bins: &BTreeMap<String, PathBuf>) -> Vec<Invocation> {
    let mut out = Vec::new();
    for kind in ["Deployment", "DaemonSet"] {
        for w in r.of_kind(kind) {
            let spec = pod_spec(w);
            for c in seq(&spec["containers"]) {
                let cmd = strs(&c["command"]);
                let Some(bin) = cmd.first().and_then(|b| bins.get(b)) else {
                    continue;
                };
                let env = container_env(c);
                let mut args: Vec<String> = args(c).iter().map(|a| expand(a, &env)).collect();
                for a in &args {
                    assert!(!a.contains("$("), "{}: {} arg {a} references an undefined variable", r.label, cmd[0]);
                }
                let mut scratch = Vec::new();
                for m in seq(&c["volumeMounts"]) {
                    let vol = volume(w, s(&m["name"]));
                    if vol["emptyDir"].is_null() {
                        continue;
                    }
                    let dir = tempdir(s(&m["name"]));
                    let mount_path = s(&m["mountPath"]).to_string();
                    for init in seq(&spec["initContainers"]) {
                        let ienv = container_env(init);
                        if let (Some(file), Some(map)) = (ienv.get("LABELS_FILE"), ienv.get("LABEL_MAP")) {
                            if let Some(rel) = file.strip_prefix(&format!("{mount_path}/")) {
                                let body: String = map
                                    .split(',')
                                    .map(|p| format!("{}=test-{}\n", p.split('=').next().unwrap(), FAKE_NODE))
                                    .collect();
                                std::fs::write(dir.join(rel), body).unwrap();
                            }
                        }
                    }
                    for a in args.iter_mut() {
                        *a = a.replace(&mount_path, dir.to_str().unwrap());
                    }
                    scratch.push(dir);
                }
                out.push(Invocation {
                    label: format!("{} {}/{}", r.label, s(&w["metadata"]["name"]), s(&c["name"])),
                    bin: bin.clone(),
                    args,
                    env,
                    _scratch: scratch,
                });
            }
        }
    }
    out
}

#[test]
fn kubernetes_variable_expansion() {
    let env: BTreeMap<String, String> =
        [("A".to_string(), "1".to_string()), ("POD_IP".to_string(), "10.0.0.1".to_string())].into();
    assert_eq!(expand("$(POD_IP):7400", &env), "10.0.0.1:7400");
    assert_eq!(expand("x$(A)y$(A)", &env), "x1y1");
    assert_eq!(expand("$$(A)", &env), "$(A)");
    assert_eq!(expand("$(UNDEFINED)", &env), "$(UNDEFINED)");
    assert_eq!(expand("$A $", &env), "$A $");
}

#[test]
fn chart_invocations_resolve_every_variable_and_pod_private_path() {
    // Runs nothing: checks what binaries_accept_the_args_the_chart_passes
    // will run, so a typo in an env reference fails even before the
    // binaries exist.
    let bins: BTreeMap<String, PathBuf> = ["volumed", "csi-controller", "csi-node"]
        .iter()
        .map(|b| (b.to_string(), PathBuf::from(format!("/nonexistent/{b}"))))
        .collect();
    for r in renders() {
        let invs = chart_invocations(r, &bins);
        let volumed = invs.iter().find(|i| i.bin.ends_with("volumed")).expect("volumed invocation");
        assert!(volumed.args.contains(&format!("--node-name={FAKE_NODE}")), "{:?}", volumed.args);
        let labels = volumed.args.iter().find_map(|a| a.strip_prefix("--labels-file=")).expect("--labels-file");
        let body = std::fs::read_to_string(labels).expect("labels file written where the init container would");
        assert!(body.lines().any(|l| l.starts_with("zone=")), "{body}");
        assert_eq!(invs.len(), 3, "{}: {:?}", r.label, invs.iter().map(|i| &i.label).collect::<Vec<_>>());
    }
}

#[test]
fn binaries_accept_the_args_the_chart_passes() {
    let mut seen = BTreeSet::new();
    for r in renders() {
        let driver = r.driver();
        for inv in chart_invocations(r, built_binaries()) {
            let name = inv.bin.file_name().unwrap().to_string_lossy().to_string();
            seen.insert(name.clone());
            let mut args = inv.args.clone();
            args.push("--check-config".into());
            let out = run_binary(&inv.bin, &args, &inv.env);
            assert!(
                out.status.success(),
                "{}: {name} rejects the chart's args {args:?}: {}",
                inv.label,
                describe(&out)
            );
            let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!("{}: --check-config did not print JSON ({e}): {}", inv.label, describe(&out))
            });
            let mut values = Vec::new();
            json_strings(&config, &mut values);
            match name.as_str() {
                "volumed" => assert!(
                    values.iter().any(|v| v == FAKE_NODE),
                    "{}: effective config does not carry the node name: {config}",
                    inv.label
                ),
                _ => assert!(values.contains(&driver), "{}: effective config lacks {driver}: {config}", inv.label),
            }

            // The check is real: an unknown flag is refused with exit 2.
            let mut bad = args.clone();
            bad.insert(0, "--no-such-flag-volumed-test".into());
            let out = run_binary(&inv.bin, &bad, &inv.env);
            assert_eq!(out.status.code(), Some(2), "{}: an unknown flag was accepted: {}", inv.label, describe(&out));

            // The binaries' default driver name is the chart's.
            if name.starts_with("csi-") {
                let without: Vec<String> = args.iter().filter(|a| !a.starts_with("--driver-name")).cloned().collect();
                let out = run_binary(&inv.bin, &without, &inv.env);
                assert!(out.status.success(), "{}: {}", inv.label, describe(&out));
                let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let mut values = Vec::new();
                json_strings(&config, &mut values);
                assert!(
                    values.iter().any(|v| v == "csi.volumed.dev"),
                    "{}: default driver name is not csi.volumed.dev: {config}",
                    inv.label
                );
            }
        }
    }
    let want: BTreeSet<String> = ["volumed", "csi-controller", "csi-node"].iter().map(|x| x.to_string()).collect();
    assert_eq!(seen, want, "the chart must run each binary at least once");
}

#[test]
fn volctl_accepts_the_invocations_of_the_scripts_and_docs() {
    let bins = built_binaries();
    let volctl = bins.get("volctl").expect("volctl is built");
    let gc = std::fs::read_to_string(repo_root().join("deploy/scripts/volumed-node-gc")).unwrap();
    // The exact command lines the node GC job runs.
    assert!(gc.contains("volctl --output json node list"));
    assert!(gc.contains("volctl node remove \"$node\""));
    let env: BTreeMap<String, String> = [("VOLUMED_ENDPOINT".to_string(), "http://127.0.0.1:1".to_string())].into();
    // `--help` after the arguments: clap parses (and rejects) everything
    // before it, then prints help and exits 0 without contacting a server.
    for argv in [
        &["--output", "json", "node", "list", "--help"][..],
        &["node", "remove", "node-a", "--help"],
        &["--endpoint", "http://127.0.0.1:1", "cluster", "status", "--help"],
        &["volume", "list", "--help"],
        &["node", "list", "--help"],
    ] {
        let args: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let out = run_binary(volctl, &args, &env);
        assert!(out.status.success(), "volctl {argv:?}: {}", describe(&out));
    }
    let out = run_binary(volctl, &["no-such-command".to_string()], &env);
    assert!(!out.status.success(), "volctl accepted an unknown command");
}

// ---------------------------------------------------------------- docs

#[test]
fn notes_tell_the_user_the_real_object_names() {
    let out = run(command(tool("helm")).args(["install", RELEASE]).arg(chart_dir()).args([
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
    ]));
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let notes = stdout.split("NOTES:").nth(1).expect("NOTES rendered");
    let [default, _] = renders();
    let ds = s(&default.daemonset()["metadata"]["name"]);
    let dep = s(&default.deployment()["metadata"]["name"]);
    assert!(notes.contains(&format!("daemonset/{ds}")), "{notes}");
    assert!(notes.contains(&format!("deployment/{dep}")), "{notes}");
    assert!(notes.contains(&api_endpoint(default)), "{notes}");
    for sc in default.of_kind("StorageClass") {
        assert!(notes.contains(s(&sc["metadata"]["name"])), "{notes}");
    }
}

#[test]
fn install_doc_matches_the_default_install() {
    // docs/install.md installs release "volumed" into "volumed-system":
    // every object name it uses must be what the chart creates.
    let doc = std::fs::read_to_string(repo_root().join("docs/install.md")).unwrap();
    let [default, _] = renders();
    assert!(doc.contains(&format!("helm install {RELEASE} deploy/helm/volumed")));
    assert!(doc.contains(&format!("--namespace {NAMESPACE}")));
    assert!(doc.contains(&format!("daemonset/{}", s(&default.daemonset()["metadata"]["name"]))));
    assert!(doc.contains(&format!("deployment/{}", s(&default.deployment()["metadata"]["name"]))));
    assert!(doc.contains(&api_endpoint(default)));
    assert!(doc.contains(&format!("kubectl get csidriver {}", default.driver())));
    assert!(doc
        .contains(&format!("volumeSnapshotClassName: {}", s(&default.one("VolumeSnapshotClass")["metadata"]["name"]))));
    for sc in ["volumed-replicated", "volumed-shared", "volumed-single"] {
        default.named("StorageClass", sc);
        assert!(doc.contains(sc), "install.md does not mention {sc}");
    }
    for section in ["Build and push the image", "A first volume and Pod", "A snapshot and a restore", "Uninstall"] {
        assert!(doc.contains(section), "install.md lacks the section {section}");
    }
}

#[test]
fn storageclass_doc_covers_every_parameter() {
    let doc = std::fs::read_to_string(repo_root().join("docs/storageclass.md")).unwrap();
    for key in [
        "replicas",
        "kind",
        "fsType",
        "csi.storage.k8s.io/fstype",
        "zoneSpread",
        "qos.readIOPS",
        "qos.writeIOPS",
        "qos.readBps",
        "qos.writeBps",
    ] {
        assert!(doc.contains(&format!("| `{key}` |")), "docs/storageclass.md has no table row for {key}");
    }
    let [default, _] = renders();
    for sc in default.of_kind("StorageClass") {
        assert!(doc.contains(&format!("`{}`", s(&sc["metadata"]["name"]))));
    }
    assert!(doc.contains("INVALID_ARGUMENT"));
}
