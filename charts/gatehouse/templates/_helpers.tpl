{{/* Chart name, 63 characters at most. */}}
{{- define "gatehouse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless the release contains it. */}}
{{- define "gatehouse.fullname" -}}
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

{{- define "gatehouse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gatehouse.labels" -}}
helm.sh/chart: {{ include "gatehouse.chart" . }}
app.kubernetes.io/name: {{ include "gatehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gatehouse
{{- end }}

{{/* Selector labels of one component: include "gatehouse.selectorLabels" (list . "gateway") */}}
{{- define "gatehouse.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "gatehouse.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "gatehouse.componentLabels" -}}
{{- $ctx := index . 0 -}}
{{ include "gatehouse.labels" $ctx }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Image reference: include "gatehouse.image" (list . .Values.gateway.repository) */}}
{{- define "gatehouse.image" -}}
{{- $ctx := index . 0 -}}
{{- $repo := index . 1 -}}
{{- $tag := default $ctx.Chart.AppVersion $ctx.Values.image.tag -}}
{{- if or (not $ctx.Values.image.registry) (contains "/" $repo) -}}
{{- printf "%s:%s" $repo $tag -}}
{{- else -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $ctx.Values.image.registry) $repo $tag -}}
{{- end -}}
{{- end }}

{{- define "gatehouse.operator.fullname" -}}
{{- printf "%s-operator" (include "gatehouse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "gatehouse.gateway.fullname" -}}
{{- printf "%s-gateway" (include "gatehouse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "gatehouse.redis.fullname" -}}
{{- printf "%s-redis" (include "gatehouse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ConfigMap the operator publishes and the gateways watch. */}}
{{- define "gatehouse.configMapName" -}}
{{- printf "%s-gateway-config" (include "gatehouse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret and key holding the Redis password. */}}
{{- define "gatehouse.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-redis" (include "gatehouse.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- default (printf "%s-external-redis" (include "gatehouse.fullname" .)) .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end }}
{{- define "gatehouse.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.externalRedis.existingSecretPasswordKey -}}
{{- end -}}
{{- end }}
{{/* Whether the gateway gets a password at all. */}}
{{- define "gatehouse.redis.hasPassword" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.existingSecret .Values.externalRedis.password -}}true{{- end -}}
{{- end }}

{{/* GATEHOUSE_REDIS: the URL with $(REDIS_PASSWORD) expanded by the kubelet. */}}
{{- define "gatehouse.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc:6379" (include "gatehouse.redis.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- $url := required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url -}}
{{- if include "gatehouse.redis.hasPassword" . -}}
{{- $parts := splitList "://" $url -}}
{{- printf "%s://%s:$(REDIS_PASSWORD)@%s" (index $parts 0) .Values.externalRedis.username (index $parts 1) -}}
{{- else -}}
{{- $url -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Topology spread for one component: include "gatehouse.topologySpread" (list . "gateway") */}}
{{- define "gatehouse.topologySpread" -}}
{{- $ctx := index . 0 -}}
{{- $component := index . 1 -}}
{{- if $ctx.Values.topologySpread.enabled }}
topologySpreadConstraints:
{{- range $ctx.Values.topologySpread.topologyKeys }}
  - maxSkew: {{ $ctx.Values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $ctx.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "gatehouse.selectorLabels" (list $ctx $component) | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's rules on the gatehouse resources (ClusterRole or per-namespace Role). */}}
{{- define "gatehouse.operator.resourceRules" -}}
- apiGroups: [gatehouse.dev]
  resources: [apis, plans, applications, subscriptions]
  verbs: [get, list, watch]
- apiGroups: [gatehouse.dev]
  resources: [apis/status, plans/status, applications/status, subscriptions/status]
  verbs: [patch]
# Client-secret Secrets of confidential subscriptions (owned by the Subscription). The operator
# watches only Opaque Secrets' metadata and reads (get) only the Secrets subscriptions name, but
# RBAC cannot say so: list/watch here also allow reading data. It patches only the clientId of
# the Secrets it generated, when spec.clientId changes, and deletes one it just created when
# recording it in the Subscription's status was refused. RBAC cannot narrow create/patch/delete
# to those Secrets either: operator-secret-guard.yaml does (labelled Opaque Secrets owned by a
# Subscription only). No events: it reports through status.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
