{{/* Names and labels shared by every template. */}}

{{- define "ratelimit-svc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ratelimit-svc.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ratelimit-svc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ratelimit-svc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ratelimit-svc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ratelimit-svc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ratelimit-svc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ratelimit-svc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ratelimit-svc.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "ratelimit-svc.rulesConfigMap" -}}
{{- default (printf "%s-rules" (include "ratelimit-svc.fullname" .)) .Values.existingRulesConfigMap }}
{{- end }}

{{- define "ratelimit-svc.redisSecret" -}}
{{- default (printf "%s-redis" (include "ratelimit-svc.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* A probe from values, with a gRPC probe's port set to ports.grpc (it takes no port name). */}}
{{- define "ratelimit-svc.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if hasKey $probe "grpc" }}
{{- $_ := set $probe.grpc "port" (int .ports.grpc) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}
