{{- define "eddy.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "eddy.labels" -}}
app.kubernetes.io/name: {{ include "eddy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "eddy.selector" -}}
app.kubernetes.io/name: {{ include "eddy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "eddy.preset" -}}{{- index .Values.presets .Values.distro | toYaml -}}{{- end -}}
{{- define "eddy.containerdSocket" -}}
{{- .Values.containerdSocket | default (index .Values.presets .Values.distro).containerdSocket -}}
{{- end -}}
{{- define "eddy.trustBundle" -}}
{{- .Values.trustBundle | default (index .Values.presets .Values.distro).trustBundle -}}
{{- end -}}
{{- define "eddy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
