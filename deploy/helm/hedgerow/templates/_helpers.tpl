{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "hedgerow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already holds the chart name. */}}
{{- define "hedgerow.fullname" -}}
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

{{- define "hedgerow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hedgerow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hedgerow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Labels every object of the release carries (the component label is added per object). */}}
{{- define "hedgerow.commonLabels" -}}
helm.sh/chart: {{ include "hedgerow.chart" . }}
app.kubernetes.io/name: {{ include "hedgerow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hedgerow.labels" -}}
{{ include "hedgerow.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "hedgerow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hedgerow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The in-chart Redis: name and labels. */}}
{{- define "hedgerow.redis.fullname" -}}
{{- printf "%s-redis" (include "hedgerow.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hedgerow.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hedgerow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{/* Whether the gateway uses Redis: deployed here, or external by URL or Secret. */}}
{{- define "hedgerow.redis.used" -}}
{{- if or .Values.redis.enabled .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/*
The gateway config written to the ConfigMap: values.config, with server.host/port set for a pod and, when
Redis is used, accounting.store (and optionally the response cache) pointed at $HEDGEROW_REDIS_URL.
*/}}
{{- define "hedgerow.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $server := get $cfg "server" | default dict }}
{{- $_ := set $server "host" "0.0.0.0" }}
{{- $_ = set $server "port" (int .Values.containerPort) }}
{{- $_ = set $cfg "server" $server }}
{{- if include "hedgerow.redis.used" . }}
{{- $acct := get $cfg "accounting" | default dict }}
{{- $store := get $acct "store" | default dict }}
{{- $_ = set $store "kind" "redis" }}
{{- $_ = set $store "url" "${HEDGEROW_REDIS_URL}" }}
{{- $_ = unset $store "path" }}
{{- $_ = set $acct "store" $store }}
{{- $_ = set $cfg "accounting" $acct }}
{{- if .Values.redis.useForCache }}
{{- $cache := get $cfg "cache" | default dict }}
{{- $_ = set $cache "backend" "redis" }}
{{- $_ = set $cache "redis-url" "${HEDGEROW_REDIS_URL}" }}
{{- $_ = set $cfg "cache" $cache }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* server.drain-grace-s as whole seconds, rounded up (the gateway's default when unset: 30). */}}
{{- define "hedgerow.drainGraceSeconds" -}}
{{- $server := (.Values.config | default dict).server | default dict }}
{{- $grace := 30 }}
{{- if hasKey $server "drain-grace-s" }}
{{- $grace = index $server "drain-grace-s" }}
{{- end }}
{{- ceil $grace | int }}
{{- end }}

{{/* preStop sleep + drain grace + margin: SIGKILL never comes before a stream had its drain grace. */}}
{{- define "hedgerow.terminationGracePeriodSeconds" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (include "hedgerow.drainGraceSeconds" . | int) (int .Values.lifecycle.terminationExtraSeconds) }}
{{- end }}
