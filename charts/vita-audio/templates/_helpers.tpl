{{/* Names, labels and the pieces every workload shares. */}}

{{- define "vita-audio.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vita-audio.fullname" -}}
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

{{/* Resource name of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "vita-audio.componentName" -}}
{{- printf "%s-%s" (include "vita-audio.fullname" .ctx | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "vita-audio.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "vita-audio.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: vita-audio
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vita-audio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vita-audio.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "vita-audio.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vita-audio.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* In-cluster DNS name of a component's Service. */}}
{{- define "vita-audio.host" -}}
{{- printf "%s.%s.svc.cluster.local" (include "vita-audio.componentName" .) .ctx.Release.Namespace }}
{{- end }}

{{/* Seconds a pod may take to stop: preStop sleep, the longest call, a margin. */}}
{{- define "vita-audio.terminationGrace" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.maxCallSeconds .Values.drain.marginSeconds }}
{{- end }}

{{- define "vita-audio.preStop" -}}
preStop:
  exec:
    command: ["sleep", "{{ .Values.drain.preStopSleepSeconds }}"]
{{- end }}

{{- define "vita-audio.startupBudget" -}}
periodSeconds: {{ .Values.startupProbe.periodSeconds }}
failureThreshold: {{ .Values.startupProbe.failureThreshold }}
{{- end }}

{{/* Name of the Secret of the bundled Redis: redis-password, redis-url, redis.conf. */}}
{{- define "vita-audio.redisSecretName" -}}
{{- default (include "vita-audio.componentName" (dict "ctx" . "component" "redis")) .Values.redis.existingSecret }}
{{- end }}

{{/*
The Redis URL as env VITA_REDIS_URL, read by the services from a Secret: the URL holds the password,
so it is never in args, in values or in a plain env value (`ps`, events and `kubectl get -o yaml`
would show it).
*/}}
{{- define "vita-audio.redisEnv" -}}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.existingSecret) }}
{{- fail "redis.enabled is false: set externalRedis.existingSecret to a Secret holding the Redis URL" }}
{{- end }}
- name: VITA_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.redis.enabled }}
      name: {{ include "vita-audio.redisSecretName" . }}
      key: redis-url
      {{- else }}
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.urlKey }}
      {{- end }}
{{- end }}

{{/* Volume holding the checkpoints, by checkpoints.source. */}}
{{- define "vita-audio.checkpointVolume" -}}
- name: checkpoints
{{- if eq .Values.checkpoints.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "checkpoints.claimName is required with checkpoints.source=pvc" .Values.checkpoints.claimName }}
    readOnly: true
{{- else if eq .Values.checkpoints.source "hostPath" }}
  hostPath:
    path: {{ required "checkpoints.hostPath is required with checkpoints.source=hostPath" .Values.checkpoints.hostPath }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.checkpoints.copy.sizeLimit }}
{{- end }}
{{- end }}

{{/* Init container filling the emptyDir when checkpoints.source is copy. */}}
{{- define "vita-audio.checkpointCopy" -}}
{{- if eq .Values.checkpoints.source "copy" }}
{{- if or (not .Values.checkpoints.copy.image) (not .Values.checkpoints.copy.command) }}
{{- fail "checkpoints.source=copy needs checkpoints.copy.image and checkpoints.copy.command" }}
{{- end }}
- name: copy-checkpoints
  image: {{ .Values.checkpoints.copy.image }}
  command: {{ toJson .Values.checkpoints.copy.command }}
  {{- with .Values.checkpoints.copy.env }}
  env: {{ toYaml . | nindent 4 }}
  {{- end }}
  securityContext: {{ toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: checkpoints, mountPath: {{ .Values.checkpoints.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end }}

{{/* Whether component's replicas belong to an autoscaler (then the Deployment leaves them out). */}}
{{- define "vita-audio.autoscaled" -}}
{{- if ne .Values.autoscaling.engine "none" }}true{{ end }}
{{- end }}

{{/* HPA/KEDA behaviour: fast up, slow down (reasons in values.yaml). */}}
{{- define "vita-audio.behavior" -}}
scaleUp:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleUp.stabilizationWindowSeconds }}
  selectPolicy: Max
  policies:
    - {type: Percent, value: {{ .Values.autoscaling.scaleUp.percent }}, periodSeconds: {{ .Values.autoscaling.scaleUp.periodSeconds }}}
    - {type: Pods, value: {{ .Values.autoscaling.scaleUp.pods }}, periodSeconds: {{ .Values.autoscaling.scaleUp.periodSeconds }}}
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleDown.stabilizationWindowSeconds }}
  selectPolicy: Min
  policies:
    - {type: Pods, value: {{ .Values.autoscaling.scaleDown.pods }}, periodSeconds: {{ .Values.autoscaling.scaleDown.periodSeconds }}}
{{- end }}

{{/*
Scaling signals of a component, one source for HPA and KEDA: name (as exported, kept by the
Prometheus adapter rules in README), per-pod target, and whether it is a counter (rate taken).
*/}}
{{- define "vita-audio.scaleMetrics" -}}
{{- $v := .ctx.Values }}
{{- if eq .component "gateway" }}
- {name: vita_gateway_active_streams, target: {{ $v.gateway.autoscaling.targetPerPod }}, rate: false}
{{- else if eq .component "encoder" }}
- {name: vita_encoder_in_flight, target: {{ $v.encoder.autoscaling.targetPerPod }}, rate: false}
{{- else if eq .component "decoder" }}
- {name: vita_decoder_active_streams, target: {{ $v.decoder.autoscaling.targetPerPod }}, rate: false}
{{- else if eq .component "triton" }}
- {name: vita_generator_requests_in_flight, target: {{ $v.triton.autoscaling.targetInFlight }}, rate: false}
- {name: nv_inference_queue_duration_us, target: {{ $v.triton.autoscaling.targetQueueMicrosPerSecond }}, rate: true}
{{- end }}
{{- end }}

{{/*
TLS (issue 13). Each identity is a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt:
public (the gateway's public server certificate), gateway (its internal client identity), encoder,
decoder, triton, redis (internal servers; the decoder's is also its client identity to Redis).
Called as (dict "ctx" $ "identity" "encoder").
*/}}
{{- define "vita-audio.tlsSecretName" -}}
{{- $t := .ctx.Values.tls }}
{{- if eq $t.source "existingSecrets" }}
{{- $name := index $t.existingSecrets .identity }}
{{- required (printf "tls.source=existingSecrets needs tls.existingSecrets.%s" .identity) $name }}
{{- else }}
{{- printf "%s-tls-%s" (include "vita-audio.fullname" .ctx | trunc 45 | trimSuffix "-") .identity }}
{{- end }}
{{- end }}

{{/* DNS names of a component's Service: short, namespaced, cluster-local. */}}
{{- define "vita-audio.dnsNames" -}}
{{- $name := include "vita-audio.componentName" . }}
- {{ $name }}
- {{ $name }}.{{ .ctx.Release.Namespace }}
- {{ $name }}.{{ .ctx.Release.Namespace }}.svc
- {{ $name }}.{{ .ctx.Release.Namespace }}.svc.cluster.local
{{- end }}

{{/* Where the TLS Secrets are mounted in the containers. */}}
{{- define "vita-audio.tlsDir" -}}/etc/vita/tls{{- end }}

{{/* The gateway's credentials: API keys and JWKS, mounted from Secrets (files, never args). */}}
{{- define "vita-audio.authDir" -}}/etc/vita/auth{{- end }}

{{/* Whether the services reach Redis over TLS (rediss://): the bundled one with tls.enabled, an external one with externalRedis.tlsSecret. */}}
{{- define "vita-audio.redisTls" -}}
{{- if or (and .Values.redis.enabled .Values.tls.enabled) (and (not .Values.redis.enabled) .Values.externalRedis.tlsSecret) }}true{{ end }}
{{- end }}
