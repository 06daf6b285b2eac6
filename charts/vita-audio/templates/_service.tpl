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
- --port={{ $c.port }}
- --metrics-port={{ $v.metrics.port }}
- --grace-s={{ $v.maxCallSeconds }}
- --log-level={{ $v.logLevel }}
- --log-format=json
{{- range $c.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{- define "vita-audio.serviceDeployment" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $c := index $v .component }}
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
          ports:
            - {name: grpc, containerPort: {{ $c.port }}, protocol: TCP}
            - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
          # native gRPC probes on grpc.health.v1; the kubelet stops liveness probes once a pod is
          # terminating, so the NOT_SERVING of a drain only takes the pod out of the endpoints
          startupProbe:
            grpc: {port: {{ $c.port }}}
            {{- include "vita-audio.startupBudget" $ctx | nindent 12 }}
          readinessProbe:
            grpc: {port: {{ $c.port }}}
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            grpc: {port: {{ $c.port }}}
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 6
          lifecycle: {{ include "vita-audio.preStop" $ctx | nindent 12 }}
          securityContext: {{ toYaml $v.securityContext | nindent 12 }}
          resources: {{ toYaml $c.resources | nindent 12 }}
          volumeMounts:
            - {name: checkpoints, mountPath: {{ $v.checkpoints.mountPath }}, readOnly: true}
            - {name: tmp, mountPath: /tmp}
      volumes:
        {{- include "vita-audio.checkpointVolume" $ctx | nindent 8 }}
        - name: tmp
          emptyDir: {}
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
