{{/* Chart name, possibly overridden. */}}
{{- define "volumed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name. */}}
{{- define "volumed.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "volumed.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "volumed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: volumed
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "node"). */}}
{{- define "volumed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "volumed.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "volumed.componentLabels" -}}
{{ include "volumed.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "volumed.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* A sidecar image from its values block. */}}
{{- define "volumed.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}

{{/* Service names: peers (headless, for --join) and api (ClusterIP). */}}
{{- define "volumed.peersService" -}}
{{- printf "%s-peers" (include "volumed.fullname" .) -}}
{{- end -}}
{{- define "volumed.apiService" -}}
{{- printf "%s-api" (include "volumed.fullname" .) -}}
{{- end -}}

{{/* http://<api service>.<ns>.svc.<domain>:<port>: what csi-controller and volctl use. */}}
{{- define "volumed.apiEndpoint" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "volumed.apiService" .) .Release.Namespace .Values.clusterDomain (int .Values.node.ports.api) -}}
{{- end -}}

{{/* Seed address for --join: the headless Service resolves to every node pod. */}}
{{- define "volumed.joinAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "volumed.peersService" .) .Release.Namespace .Values.clusterDomain (int .Values.node.ports.api) -}}
{{- end -}}

{{/* Directory of the node plugin socket under kubelet's plugin dir. */}}
{{- define "volumed.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.node.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/* Container securityContext of the unprivileged controller containers. */}}
{{- define "volumed.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
Checks that turn a bad values file into a clear message at install time
instead of a pod that crash-loops later.
*/}}
{{- define "volumed.validate" -}}
{{- $known := list "replicas" "kind" "fsType" "zoneSpread" "qos.readIOPS" "qos.writeIOPS" "qos.readBps" "qos.writeBps" -}}
{{- range $scName, $sc := .Values.storageClasses -}}
{{- if $sc.enabled -}}
{{- range $key, $value := ($sc.parameters | default dict) -}}
{{- if not (or (has $key $known) (hasPrefix "csi.storage.k8s.io/" $key)) -}}
{{- fail (printf "storageClasses.%s.parameters: unknown parameter %q (known: %s, and csi.storage.k8s.io/* keys; see docs/storageclass.md)" $scName $key (join ", " $known)) -}}
{{- end -}}
{{- end -}}
{{- with $sc.parameters -}}
{{- if hasKey . "replicas" -}}
{{- $r := toString .replicas -}}
{{- if not (has $r (list "1" "2" "3" "4" "5")) -}}
{{- fail (printf "storageClasses.%s.parameters.replicas must be 1..5, got %q" $scName $r) -}}
{{- end -}}
{{- end -}}
{{- if hasKey . "kind" -}}
{{- if not (has (toString .kind) (list "block" "file")) -}}
{{- fail (printf "storageClasses.%s.parameters.kind must be block or file, got %q" $scName (toString .kind)) -}}
{{- end -}}
{{- end -}}
{{- range $fsKey := list "fsType" "csi.storage.k8s.io/fstype" -}}
{{- if hasKey $sc.parameters $fsKey -}}
{{- $fs := toString (index $sc.parameters $fsKey) -}}
{{- if not (has $fs (list "ext4" "xfs")) -}}
{{- fail (printf "storageClasses.%s.parameters.%s must be ext4 or xfs, got %q" $scName $fsKey $fs) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if hasKey . "zoneSpread" -}}
{{- if not (has (toString .zoneSpread) (list "true" "false")) -}}
{{- fail (printf "storageClasses.%s.parameters.zoneSpread must be \"true\" or \"false\", got %q" $scName (toString .zoneSpread)) -}}
{{- end -}}
{{- end -}}
{{- range $q := list "qos.readIOPS" "qos.writeIOPS" "qos.readBps" "qos.writeBps" -}}
{{- if hasKey $sc.parameters $q -}}
{{- if not (regexMatch "^[0-9]+$" (toString (index $sc.parameters $q))) -}}
{{- fail (printf "storageClasses.%s.parameters.%s must be a non-negative integer, got %q" $scName $q (toString (index $sc.parameters $q))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $vacName, $params := .Values.volumeAttributesClass.classes -}}
{{- range $key, $value := $params -}}
{{- if not (has $key (list "qos.readIOPS" "qos.writeIOPS" "qos.readBps" "qos.writeBps")) -}}
{{- fail (printf "volumeAttributesClass.classes.%s: %q cannot be changed on an existing volume; only qos.readIOPS, qos.writeIOPS, qos.readBps, qos.writeBps can" $vacName $key) -}}
{{- end -}}
{{- if not (regexMatch "^[0-9]+$" (toString $value)) -}}
{{- fail (printf "volumeAttributesClass.classes.%s.%s must be a non-negative integer, got %q" $vacName $key (toString $value)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.volumeAttributesClass.classes (not .Values.volumeAttributesClass.enabled) -}}
{{- fail "volumeAttributesClass.classes needs volumeAttributesClass.enabled: without it the resizer ignores class changes" -}}
{{- end -}}
{{- $defaults := 0 -}}
{{- range $scName, $sc := .Values.storageClasses -}}
{{- if and $sc.enabled $sc.default -}}{{- $defaults = add1 $defaults -}}{{- end -}}
{{- end -}}
{{- if gt $defaults 1 -}}
{{- fail "storageClasses: more than one StorageClass has default: true" -}}
{{- end -}}
{{- if not (has (int .Values.cluster.catalogVoters) (list 3 5)) -}}
{{- fail (printf "cluster.catalogVoters must be 3 or 5, got %v" .Values.cluster.catalogVoters) -}}
{{- end -}}
{{- if lt (int .Values.cluster.bootstrapExpect) 1 -}}
{{- fail "cluster.bootstrapExpect must be at least 1" -}}
{{- end -}}
{{- if and .Values.volumeSnapshotClass.enabled (not .Values.sidecars.snapshotter.enabled) -}}
{{- fail "volumeSnapshotClass.enabled needs sidecars.snapshotter.enabled: nothing would take the snapshots" -}}
{{- end -}}
{{- end -}}
