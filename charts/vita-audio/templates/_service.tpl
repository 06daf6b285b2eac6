{{/*
Deployment of one Python service (gateway, encoder, decoder): `vita-audio serve <component>`.
Called as (dict "ctx" $ "component" "gateway"). Secrets (the Redis URL) come from the environment,
filled from a Secret, never from args. Drain: on SIGTERM the service turns its health
NOT_SERVING (readiness drops it from endpoints) and running calls get --grace-s = maxCallSeconds.
*/}}

{{- define "vita-audio.serviceArgs" -}}
{{- $v := .ctx.Values }}
{{- $ck := $v.checkpoints }}
{{- $c := index $v .component }}
- serve
- {{ .component }}
{{- if eq .component "gateway" }}
- --lm={{ $ck.mountPath }}/{{ $ck.lmDir }}
- --encoder=dns:///{{ include "vita-audio.host" (dict "ctx" .ctx "component" "encoder") }}:{{ $v.encoder.port }}
- --decoder=dns:///{{ include "vita-audio.host" (dict "ctx" .ctx "component" "decoder") }}:{{ $v.decoder.port }}
- --triton={{ include "vita-audio.host" (dict "ctx" .ctx "component" "triton") }}:8001
- --mode={{ $v.mode }}
- --context-tokens={{ $v.triton.maxLen }}
- --max-new-tokens={{ $c.maxNewTokens }}
- --chunk-plan={{ $c.chunkPlan }}
- --max-utterance-s={{ $c.maxUtteranceSeconds }}
- --max-calls={{ $c.maxCalls }}
- --first-message-s={{ $c.firstMessageSeconds }}
- --idle-s={{ $c.idleSeconds }}
- --max-reader-stall-s={{ $c.readerStallSeconds }}
- --max-call-s={{ $v.maxCallSeconds }}
{{- else if eq .component "encoder" }}
- --tokenizer={{ $ck.mountPath }}/{{ $ck.tokenizerDir }}
- --device={{ $c.device }}
- --max-batch={{ $c.maxBatch }}
- --max-connection-age-s={{ $c.maxConnectionAgeSeconds }}
- --max-connection-age-grace-s={{ $c.maxConnectionAgeGraceSeconds }}
- --threads={{ $c.threads }}
{{- else }}
- --decoder={{ $ck.mountPath }}/{{ $ck.decoderDir }}
- --device={{ $c.device }}
- --max-batch={{ $c.maxBatch }}
- --max-wait-ms={{ $c.maxWaitMs }}
- --threads={{ $c.threads }}
- --ode-steps={{ $c.odeSteps }}
- --max-connection-age-s={{ $c.maxConnectionAgeSeconds }}
- --max-connection-age-grace-s={{ $c.maxConnectionAgeGraceSeconds }}
{{- end }}
{{- include "vita-audio.securityArgs" . }}
- --port={{ $c.port }}
- --metrics-port={{ $v.metrics.port }}
- --grace-s={{ $v.maxCallSeconds }}
- --log-level={{ $v.logLevel }}
- --log-format=json
{{- range $c.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
TLS, caller authentication, quotas and retention flags (issue 13). Files only: certificates and keys
from mounted Secrets (`vita-audio.securityVolumes`), the API-key file named by $VITA_API_KEYS_FILE.
*/}}
{{- define "vita-audio.securityArgs" -}}
{{- $v := .ctx.Values }}
{{- $dir := include "vita-audio.tlsDir" .ctx }}
{{- if $v.tls.enabled }}
- --tls-cert={{ $dir }}/server/tls.crt
- --tls-key={{ $dir }}/server/tls.key
{{- if ne .component "gateway" }}
- --tls-client-ca={{ $dir }}/server/ca.crt
{{- else if $v.tls.clientCaSecret }}
- --tls-client-ca={{ $dir }}/callers/ca.crt
{{- end }}
- --health-port={{ $v.tls.healthPort }}
{{- if eq .component "gateway" }}
- --internal-ca={{ $dir }}/internal/ca.crt
- --internal-cert={{ $dir }}/internal/tls.crt
- --internal-key={{ $dir }}/internal/tls.key
{{- end }}
{{- else }}
- --plaintext
{{- end }}
{{- if and (ne .component "encoder") (include "vita-audio.redisTls" .ctx) }}
{{- $redisDir := ternary (printf "%s/internal" $dir) (printf "%s/server" $dir) (eq .component "gateway") }}
{{- if $v.redis.enabled }}
- --redis-ca={{ $redisDir }}/ca.crt
- --redis-cert={{ $redisDir }}/tls.crt
- --redis-key={{ $redisDir }}/tls.key
{{- else }}
- --redis-ca={{ $dir }}/redis/ca.crt
{{- if $v.externalRedis.tlsClientCert }}
- --redis-cert={{ $dir }}/redis/tls.crt
- --redis-key={{ $dir }}/redis/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- if eq .component "gateway" }}
{{- $a := $v.auth }}
{{- if $a.jwt.jwksSecret }}
- --jwks-file={{ include "vita-audio.authDir" .ctx }}/jwks/{{ $a.jwt.jwksKey }}
- --jwt-issuer={{ required "auth.jwt.issuer is required with auth.jwt.jwksSecret" $a.jwt.issuer }}
- --jwt-audience={{ required "auth.jwt.audience is required with auth.jwt.jwksSecret" $a.jwt.audience }}
- --jwt-tenant-claim={{ $a.jwt.tenantClaim }}
- --jwt-leeway-s={{ $a.jwt.leewaySeconds }}
{{- end }}
{{- if $a.allowAnonymous }}
- --allow-anonymous
{{- end }}
{{- if not (or $a.apiKeys.existingSecret $a.jwt.jwksSecret $a.allowAnonymous) }}
{{- fail "the gateway needs callers' credentials: set auth.apiKeys.existingSecret or auth.jwt.jwksSecret (auth.allowAnonymous only for local development)" }}
{{- end }}
- --tenant-max-calls={{ $a.quota.maxCalls }}
- --tenant-calls-per-minute={{ $a.quota.callsPerMinute }}
- --quota-lease-s={{ $a.quota.leaseSeconds }}
{{- with .ctx.Values.gateway.historyTtlSeconds }}
- --history-ttl-s={{ . }}
{{- end }}
{{- if not .ctx.Values.gateway.storeText }}
- --no-store-text
{{- end }}
{{- with .ctx.Values.gateway.twilio }}
{{- if .port }}
- --twilio-port={{ .port }}
- --twilio-preset={{ .preset }}
{{- with .publicUrl }}
- --twilio-public-url={{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- with .ctx.Values.gateway.realtime.port }}
- --realtime-port={{ . }}
{{- end }}
{{- with .ctx.Values.gateway.audiosocket }}
{{- if .port }}
{{- if not (or .apiKeySecret $a.allowAnonymous) }}
{{- fail "gateway.audiosocket.port needs gateway.audiosocket.apiKeySecret: AudioSocket carries no credential, its calls run with that API key" }}
{{- end }}
- --audiosocket-port={{ .port }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes of the TLS Secrets and the gateway's credentials. */}}
{{- define "vita-audio.securityVolumes" -}}
{{- $v := .ctx.Values }}
{{- if $v.tls.enabled }}
- name: tls-server
  secret:
    secretName: {{ include "vita-audio.tlsSecretName" (dict "ctx" .ctx "identity" (ternary "public" .component (eq .component "gateway"))) }}
    defaultMode: 0440
{{- if eq .component "gateway" }}
- name: tls-internal
  secret:
    secretName: {{ include "vita-audio.tlsSecretName" (dict "ctx" .ctx "identity" "gateway") }}
    defaultMode: 0440
{{- with $v.tls.clientCaSecret }}
- name: tls-callers
  secret: {secretName: {{ . }}, items: [{key: ca.crt, path: ca.crt}], defaultMode: 0440}
{{- end }}
{{- end }}
{{- end }}
{{- if and (ne .component "encoder") (not $v.redis.enabled) $v.externalRedis.tlsSecret }}
- name: tls-redis
  secret: {secretName: {{ $v.externalRedis.tlsSecret }}, defaultMode: 0440}
{{- end }}
{{- if eq .component "gateway" }}
{{- with $v.auth.apiKeys.existingSecret }}
- name: api-keys
  secret: {secretName: {{ . }}, items: [{key: {{ $v.auth.apiKeys.key }}, path: {{ $v.auth.apiKeys.key }}}], defaultMode: 0440}
{{- end }}
{{- with $v.auth.jwt.jwksSecret }}
- name: jwks
  secret: {secretName: {{ . }}, items: [{key: {{ $v.auth.jwt.jwksKey }}, path: {{ $v.auth.jwt.jwksKey }}}], defaultMode: 0440}
{{- end }}
{{- end }}
{{- end }}

{{/* Mounts of those volumes (whole directories, not subPath: a rotated Secret reaches the files). */}}
{{- define "vita-audio.securityMounts" -}}
{{- $v := .ctx.Values }}
{{- $dir := include "vita-audio.tlsDir" .ctx }}
{{- $auth := include "vita-audio.authDir" .ctx }}
{{- if $v.tls.enabled }}
- {name: tls-server, mountPath: {{ $dir }}/server, readOnly: true}
{{- if eq .component "gateway" }}
- {name: tls-internal, mountPath: {{ $dir }}/internal, readOnly: true}
{{- if $v.tls.clientCaSecret }}
- {name: tls-callers, mountPath: {{ $dir }}/callers, readOnly: true}
{{- end }}
{{- end }}
{{- end }}
{{- if and (ne .component "encoder") (not $v.redis.enabled) $v.externalRedis.tlsSecret }}
- {name: tls-redis, mountPath: {{ $dir }}/redis, readOnly: true}
{{- end }}
{{- if eq .component "gateway" }}
{{- if $v.auth.apiKeys.existingSecret }}
- {name: api-keys, mountPath: {{ $auth }}/api-keys, readOnly: true}
{{- end }}
{{- if $v.auth.jwt.jwksSecret }}
- {name: jwks, mountPath: {{ $auth }}/jwks, readOnly: true}
{{- end }}
{{- end }}
{{- end }}

{{- define "vita-audio.serviceDeployment" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $c := index $v .component }}
{{- $probePort := ternary $v.tls.healthPort $c.port $v.tls.enabled }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "vita-audio.componentName" . }}
  namespace: {{ $ctx.Release.Namespace }}
  labels: {{ include "vita-audio.labels" . | nindent 4 }}
spec:
  {{- if not (include "vita-audio.autoscaled" $ctx) }}
  replicas: {{ $c.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  selector:
    matchLabels: {{ include "vita-audio.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels: {{ include "vita-audio.selectorLabels" . | nindent 8 }}
    spec:
      serviceAccountName: {{ include "vita-audio.serviceAccountName" $ctx }}
      automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
      terminationGracePeriodSeconds: {{ include "vita-audio.terminationGrace" $ctx }}
      securityContext: {{ toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets: {{ toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "vita-audio.checkpointCopy" $ctx) }}
      initContainers: {{ . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: "{{ $v.image.repository }}:{{ default $ctx.Chart.AppVersion $v.image.tag }}"
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["vita-audio"]
          args: {{ include "vita-audio.serviceArgs" . | trim | nindent 12 }}
          env:
            - {name: HOME, value: /tmp}
            - {name: PYTHONUNBUFFERED, value: "1"}
            {{- if ne .component "encoder" }}
            {{- include "vita-audio.redisEnv" $ctx | trim | nindent 12 }}
            {{- end }}
            {{- if and (eq .component "gateway") $v.gateway.twilio.port $v.gateway.twilio.authTokenSecret }}
            - name: VITA_TWILIO_AUTH_TOKEN
              valueFrom: {secretKeyRef: {name: {{ $v.gateway.twilio.authTokenSecret }}, key: {{ $v.gateway.twilio.authTokenKey }}}}
            {{- end }}
            {{- if and (eq .component "gateway") $v.gateway.audiosocket.port $v.gateway.audiosocket.apiKeySecret }}
            - name: VITA_AUDIOSOCKET_API_KEY
              valueFrom: {secretKeyRef: {name: {{ $v.gateway.audiosocket.apiKeySecret }}, key: {{ $v.gateway.audiosocket.apiKeyKey }}}}
            {{- end }}
            {{- if and (eq .component "gateway") $v.auth.apiKeys.existingSecret }}
            - {name: VITA_API_KEYS_FILE, value: {{ printf "%s/api-keys/%s" (include "vita-audio.authDir" $ctx) $v.auth.apiKeys.key | quote }}}
            {{- end }}
          ports:
            - {name: grpc, containerPort: {{ $c.port }}, protocol: TCP}
            - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
            {{- if eq .component "gateway" }}
            {{- range $name := list "twilio" "realtime" "audiosocket" }}
            {{- with (index $v.gateway $name).port }}
            - {name: {{ $name }}, containerPort: {{ . }}, protocol: TCP}
            {{- end }}
            {{- end }}
            {{- end }}
            {{- if $v.tls.enabled }}
            - {name: health, containerPort: {{ $v.tls.healthPort }}, protocol: TCP}
            {{- end }}
          # native gRPC probes on grpc.health.v1 (its plaintext health-only port when the service port is
          # TLS: the kubelet's gRPC probes speak no TLS); the kubelet stops liveness probes once a pod is
          # terminating, so the NOT_SERVING of a drain only takes the pod out of the endpoints
          startupProbe:
            grpc: {port: {{ $probePort }}}
            {{- include "vita-audio.startupBudget" $ctx | nindent 12 }}
          readinessProbe:
            grpc: {port: {{ $probePort }}}
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            grpc: {port: {{ $probePort }}}
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 6
          lifecycle: {{ include "vita-audio.preStop" $ctx | nindent 12 }}
          securityContext: {{ toYaml $v.securityContext | nindent 12 }}
          resources: {{ toYaml $c.resources | nindent 12 }}
          volumeMounts:
            - {name: checkpoints, mountPath: {{ $v.checkpoints.mountPath }}, readOnly: true}
            - {name: tmp, mountPath: /tmp}
            {{- include "vita-audio.securityMounts" . | nindent 12 }}
      volumes:
        {{- include "vita-audio.checkpointVolume" $ctx | nindent 8 }}
        - name: tmp
          emptyDir: {}
        {{- include "vita-audio.securityVolumes" . | nindent 8 }}
      {{- with $c.nodeSelector }}
      nodeSelector: {{ toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.tolerations }}
      tolerations: {{ toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity: {{ toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
