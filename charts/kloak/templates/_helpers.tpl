{{- define "kloak.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kloak.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kloak.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kloak.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Names the controller and the webhook agree on. */}}
{{- define "kloak.webhookService" -}}{{ include "kloak.fullname" . }}-webhook{{- end -}}
{{- define "kloak.webhookSecret" -}}{{ include "kloak.fullname" . }}-webhook-tls{{- end -}}
{{- define "kloak.stateKeySecret" -}}{{ include "kloak.fullname" . }}-state-key{{- end -}}

{{/* Every webhook: this release's own namespace is never intercepted. */}}
{{- define "kloak.notReleaseNamespace" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: [{{ .Release.Namespace | quote }}]
{{- end -}}
