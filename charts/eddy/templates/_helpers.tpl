{{- define "eddy.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "eddy.labels" -}}
app.kubernetes.io/name: {{ include "eddy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "eddy.selector" -}}
app.kubernetes.io/name: {{ include "eddy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "eddy.containerdSocket" -}}
{{- .Values.containerdSocket | default (index .Values.presets .Values.distro).containerdSocket -}}
{{- end -}}
{{- define "eddy.trustBundle" -}}
{{- .Values.trustBundle | default (index .Values.presets .Values.distro).trustBundle -}}
{{- end -}}
{{- define "eddy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
Whether a Prometheus Operator object is rendered: enabled, and either its CRD is served
by the cluster or rendering is forced. Call with (list $ .Values.serviceMonitor "ServiceMonitor").
Prints "true" or nothing.
*/}}
{{- define "eddy.monitoringObject" -}}
{{- $root := index . 0 -}}{{- $v := index . 1 -}}{{- $kind := index . 2 -}}
{{- if and $v.enabled (or $v.force ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind))) -}}true{{- end -}}
{{- end -}}

{{/* Whether Prometheus scrapes eddy (a ServiceMonitor or PodMonitor is rendered). */}}
{{- define "eddy.scraped" -}}
{{- if or (include "eddy.monitoringObject" (list . .Values.serviceMonitor "ServiceMonitor")) (include "eddy.monitoringObject" (list . .Values.podMonitor "PodMonitor")) -}}true{{- end -}}
{{- end -}}

{{/* eddy's trust flags, shared by the CA install step and the agent. */}}
{{- define "eddy.trustEnv" -}}
- {name: EDDY_DATA_DIR, value: /var/lib/eddy}
{{- with .Values.registries }}
- {name: EDDY_REGISTRY, value: {{ join "," . | quote }}}
{{- end }}
{{- with .Values.mirrors }}
- {name: EDDY_MIRROR, value: {{ join ";" . | quote }}}
{{- end }}
{{- with .Values.fallbacks }}
- {name: EDDY_FALLBACK, value: {{ join ";" . | quote }}}
{{- end }}
- {name: EDDY_CA_UNCONSTRAINED, value: {{ .Values.caUnconstrained | quote }}}
{{- if .Values.ca.clusterSecret }}
- {name: EDDY_CA_DIR, value: /etc/eddy/ca}
{{- end }}
{{- end -}}

{{/* The Secret holding the P2P swarm key: the user's, or the one the chart generates. */}}
{{- define "eddy.p2pSecretName" -}}
{{- .Values.p2p.psk.existingSecret | default (printf "%s-p2p-psk" (include "eddy.name" .)) -}}
{{- end -}}

{{/* The headless Service peers bootstrap from. */}}
{{- define "eddy.p2pServiceName" -}}
{{- printf "%s-p2p" (include "eddy.name" .) -}}
{{- end -}}
