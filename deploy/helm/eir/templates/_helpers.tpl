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

{{- if not .Values.fleet.nats }}

[bundles.model]
dir = "/mnt/models"
{{- end }}

# Bundles the fleet assigns are pulled only if signed by these keys.
[trust]
mode = "enforce"
scopes = [{ prefix = "{{ include "eir.trustScope" . }}", keys = [{{ range $i, $f := keys .Values.trust.keys | sortAlpha }}{{ if $i }}, {{ end }}"/etc/eir/trust/{{ $f }}"{{ end }}] }]
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


{{/* The registry scope the trusted keys cover: trust.scope, or the bundle's registry. */}}
{{- define "eir.trustScope" -}}
{{- if .Values.trust.scope -}}
{{- .Values.trust.scope -}}
{{- else if .Values.bundle -}}
{{- regexReplaceAll "/.*$" .Values.bundle "" -}}
{{- else -}}
{{- fail "set `trust.scope` (the registry, e.g. registry.example.com/eir) when serving from a fleet" -}}
{{- end -}}
{{- end -}}
