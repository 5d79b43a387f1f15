{{/* The release's resource name. */}}
{{- define "eir.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "eir.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What selects the pods. */}}
{{- define "eir.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The registry Secret's name, if any. */}}
{{- define "eir.registrySecret" -}}
{{- if .Values.registry.existingSecret -}}
{{- .Values.registry.existingSecret -}}
{{- else if .Values.registry.username -}}
{{- printf "%s-registry" (include "eir.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* eir.toml: the gateway, the bundle from /mnt/models, the tenants. */}}
{{- define "eir.config" -}}
[server]
listen = "0.0.0.0:{{ .Values.service.port }}"
{{- if .Values.adminKey }}
admin_key_sha256 = "{{ sha256sum .Values.adminKey }}"
{{- end }}

[bundles.model]
dir = "/mnt/models"
{{- range $name, $t := .Values.tenants }}

[tenants.{{ $name }}]
keys_sha256 = [{{ range $i, $k := $t.keysSha256 }}{{ if $i }}, {{ end }}"{{ $k }}"{{ end }}]
plugins = [{{ range $i, $p := (default (list "*") $t.plugins) }}{{ if $i }}, {{ end }}"{{ $p }}"{{ end }}]
{{- if $t.rps }}
rps = {{ $t.rps }}
{{- end }}
{{- if $t.maxConcurrent }}
max_concurrent = {{ $t.maxConcurrent }}
{{- end }}
{{- end }}
{{- end -}}
