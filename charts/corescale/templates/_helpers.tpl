{{/* Chart name, overridable. */}}
{{- define "corescale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object name. A release named like the chart ("corescale", the
documented default) gives "corescale", hence corescale-operator and corescale-node-vmm,
the names the e2e and the docs use.
*/}}
{{- define "corescale.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "corescale.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "corescale.operator.fullname" -}}
{{- printf "%s-operator" (include "corescale.fullname" .) -}}
{{- end -}}

{{- define "corescale.nodeVmm.fullname" -}}
{{- printf "%s-node-vmm" (include "corescale.fullname" .) -}}
{{- end -}}

{{- define "corescale.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "corescale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: corescale
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "corescale.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "corescale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "corescale.nodeVmm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "corescale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-vmm
{{- end -}}

{{/* image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "corescale.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Path of the guest images inside the node-vmm image (see the Dockerfile). */}}
{{- define "corescale.guestImageDir" -}}
/usr/share/corescale/guest
{{- end -}}

{{/* Directory of the launcher's socket, shared by the two node-vmm containers. */}}
{{- define "corescale.socketDir" -}}
/run/corescale
{{- end -}}

{{/* Fail early on value combinations the schema cannot express clearly. */}}
{{- define "corescale.validate" -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: enable one, or every target is scraped twice" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled (a ServiceMonitor selects the Services); use metrics.podMonitor instead" -}}
{{- end -}}
{{- if and (not .Values.operator.leaderElection.enabled) (gt (int .Values.operator.replicas) 1) -}}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled: two replicas without it would both act" -}}
{{- end -}}
{{- if and (eq .Values.nodeVmm.kvm.mode "none") (eq .Values.nodeVmm.agent.accel "kvm") -}}
{{- fail "nodeVmm.agent.accel is kvm but nodeVmm.kvm.mode is none: no /dev/kvm reaches the containers; set kvm.mode to devicePlugin or hostPath, or accel to auto/tcg" -}}
{{- end -}}
{{- if and (eq .Values.nodeVmm.kvm.mode "devicePlugin") (not .Values.nodeVmm.kvm.resourceName) -}}
{{- fail "nodeVmm.kvm.mode is devicePlugin but nodeVmm.kvm.resourceName is empty" -}}
{{- end -}}
{{- $alerts := include "corescale.alertNames" . | fromYamlArray -}}
{{- range $name := .Values.prometheusRule.disabled -}}
{{- if not (has $name $alerts) -}}
{{- fail (printf "prometheusRule.disabled names %q, which is not an alert of files/alerts.yaml (%s)" $name (join ", " $alerts)) -}}
{{- end -}}
{{- end -}}
{{- range $name, $_ := .Values.prometheusRule.for -}}
{{- if not (has $name $alerts) -}}
{{- fail (printf "prometheusRule.for names %q, which is not an alert of files/alerts.yaml (%s)" $name (join ", " $alerts)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the alerts in files/alerts.yaml, as a YAML list. */}}
{{- define "corescale.alertNames" -}}
{{- $names := list -}}
{{- range $g := (.Files.Get "files/alerts.yaml" | fromYaml).groups -}}
{{- range $r := $g.rules -}}
{{- if $r.alert -}}{{- $names = append $names $r.alert -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $names -}}
{{- end -}}

{{/*
node-vmm container security: unprivileged, except that kvm.mode hostPath needs
privileged containers for the device cgroup to let them open /dev/kvm.
*/}}
{{- define "corescale.nodeVmm.securityContext" -}}
{{- if eq .kvm.mode "hostPath" -}}
privileged: true
readOnlyRootFilesystem: true
{{- else -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
{{- end -}}

{{/* A container's resources, plus one KVM device from the device plugin (kvm.mode devicePlugin). */}}
{{- define "corescale.nodeVmm.kvmResources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if eq .kvm.mode "devicePlugin" -}}
{{- $limits := $res.limits | default dict -}}
{{- $_ := set $limits .kvm.resourceName 1 -}}
{{- $_ := set $res "limits" $limits -}}
{{- $requests := $res.requests | default dict -}}
{{- $_ := set $requests .kvm.resourceName 1 -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
