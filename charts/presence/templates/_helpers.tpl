{{/* Chart name. */}}
{{- define "presence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, truncated to 63 characters (DNS label limit). */}}
{{- define "presence.fullname" -}}
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

{{/* chart-version label value. */}}
{{- define "presence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "presence.labels" -}}
helm.sh/chart: {{ include "presence.chart" . }}
{{ include "presence.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: presence
{{- end }}

{{/* Selector labels (both components). */}}
{{- define "presence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "presence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per-component names, labels and selector labels. */}}
{{- define "presence.gateway.fullname" -}}
{{- printf "%s-gateway" (include "presence.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "presence.streams.fullname" -}}
{{- printf "%s-streams" (include "presence.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "presence.streams.headless" -}}
{{- printf "%s-streams-headless" (include "presence.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "presence.gateway.headless" -}}
{{- printf "%s-gateway-headless" (include "presence.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "presence.gateway.labels" -}}
{{ include "presence.labels" . }}
app.kubernetes.io/component: gateway
{{- end }}
{{- define "presence.gateway.selectorLabels" -}}
{{ include "presence.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}
{{- define "presence.streams.labels" -}}
{{ include "presence.labels" . }}
app.kubernetes.io/component: streams
{{- end }}
{{- define "presence.streams.selectorLabels" -}}
{{ include "presence.selectorLabels" . }}
app.kubernetes.io/component: streams
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "presence.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "presence.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The product image. */}}
{{- define "presence.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the chart's own Secret. */}}
{{- define "presence.secretName" -}}
{{- include "presence.fullname" . }}
{{- end }}

{{/*
The worker's app id (consumer group, changelog and ticks topics): streams.appId, else derived from the namespace
and the release, so two releases on one Kafka (two RongCloud apps, staging and production) never share a group.
*/}}
{{- define "presence.appId" -}}
{{- default (printf "%s-%s-worker" .Release.Namespace (include "presence.fullname" .)) .Values.streams.appId }}
{{- end }}

{{/* A topic's name: topics.<name>, else <namespace>.<release full name>.<name>. Args: dict ctx, name. */}}
{{- define "presence.topic" -}}
{{- default (printf "%s.%s.%s" .ctx.Release.Namespace (include "presence.fullname" .ctx) .name) (index .ctx.Values.topics .name) }}
{{- end }}

{{/*
An upgrade must not move a release to another consumer group or other topics by accident: a new app id makes a new
group that reads RAW from its start and emits every transition again, with an empty table; renamed topics leave the
data behind. The values the release runs with are read from its ConfigMaps (lookup: on install and upgrade against
a cluster; `helm template` sees none); a change needs streams.allowAppIdChange or topics.allowRename.
*/}}
{{- define "presence.guardIdentity" -}}
{{- $streams := lookup "v1" "ConfigMap" .Release.Namespace (include "presence.streams.fullname" .) | default dict }}
{{- $running := dig "data" "PRESENCE_WORKER_APP_ID" "" $streams }}
{{- $appId := include "presence.appId" . }}
{{- if and $running (ne $running $appId) (not .Values.streams.allowAppIdChange) }}
{{- fail (printf "the worker app id would change from %q to %q: the workers would start as a new consumer group, read RAW from its start with an empty table and emit every transition again. If that is what you want (see docs/operations.md, 'Changing the app id'), set streams.allowAppIdChange=true; otherwise set streams.appId=%s" $running $appId $running) }}
{{- end }}
{{- $common := lookup "v1" "ConfigMap" .Release.Namespace (include "presence.fullname" .) | default dict }}
{{- range $name := list "raw" "dlq" "transitions" "state" }}
{{- $key := printf "PRESENCE_TOPIC_%s" (upper $name) }}
{{- $was := dig "data" $key "" $common }}
{{- $now := include "presence.topic" (dict "ctx" $ "name" $name) }}
{{- if and $was (ne $was $now) (not $.Values.topics.allowRename) }}
{{- fail (printf "topics.%s would change from %q to %q: the release would leave its data in the old topic. Set topics.%s=%s, or topics.allowRename=true after moving the data (docs/operations.md)" $name $was $now $name $was) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The gateway runs as a StatefulSet when each replica keeps its spool on its own volume (D3). */}}
{{- define "presence.gateway.kind" -}}
{{- if and .Values.gateway.spool.enabled .Values.gateway.spool.persistence.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* Checks no schema can express; each fails the render with the value to fix. */}}
{{- define "presence.validate" -}}
{{- if not .Values.app.key }}
{{- fail "app.key is required: the RongCloud appKey this release serves" }}
{{- end }}
{{- if and (not .Values.app.existingSecret) (lt (len .Values.app.secret) 8) }}
{{- fail "app.secret (at least 8 characters) or app.existingSecret is required" }}
{{- end }}
{{- if and .Values.app.previousSecret (eq .Values.app.previousSecret .Values.app.secret) }}
{{- fail "app.previousSecret equals app.secret; leave it empty when no rotation is in progress" }}
{{- end }}
{{- if not .Values.kafka.bootstrapServers }}
{{- fail "kafka.bootstrapServers is required (host:port,host:port)" }}
{{- end }}
{{- if and (hasPrefix "SASL" .Values.kafka.securityProtocol) (not .Values.strimzi.users.enabled) }}
{{- if or (not .Values.kafka.sasl.mechanism) (not .Values.kafka.sasl.username) }}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.mechanism and kafka.sasl.username" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and (not .Values.kafka.sasl.password) (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.password or kafka.sasl.existingSecret is required with SASL" }}
{{- end }}
{{- end }}
{{- $s := .Values.strimzi }}
{{- if and (or $s.topics.enabled $s.users.enabled) (not $s.cluster) }}
{{- fail "strimzi.topics.enabled and strimzi.users.enabled need strimzi.cluster: the name of the Strimzi Kafka cluster (its operators only act on resources labelled strimzi.io/cluster=<name>)" }}
{{- end }}
{{- if $s.users.enabled }}
{{- if not (and (hasPrefix "SASL" .Values.kafka.securityProtocol) (eq .Values.kafka.sasl.mechanism "SCRAM-SHA-512")) }}
{{- fail "strimzi.users.enabled (scram-sha-512) needs kafka.securityProtocol SASL_SSL or SASL_PLAINTEXT and kafka.sasl.mechanism SCRAM-SHA-512: the components log in as their KafkaUsers" }}
{{- end }}
{{- if and $s.namespace (ne $s.namespace .Release.Namespace) }}
{{- fail (printf "strimzi.users.enabled puts each user's password in a Secret next to its KafkaUser (namespace %s), which pods in %s cannot read: install the release in the namespace the User Operator watches, or create the users there yourself and set kafka.sasl.*" $s.namespace .Release.Namespace) }}
{{- end }}
{{- if .Values.topics.create }}
{{- fail "strimzi.users.enabled gives the components no Create right: set topics.create=false (and strimzi.topics.enabled, or create the topics beforehand)" }}
{{- end }}
{{- end }}
{{- if and .Values.kafka.tls.enabled (not .Values.kafka.tls.existingSecret) }}
{{- fail "kafka.tls.enabled needs kafka.tls.existingSecret" }}
{{- end }}
{{- if and .Values.kafka.tls.enabled (not (has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL"))) }}
{{- fail "kafka.tls.enabled needs kafka.securityProtocol SSL or SASL_SSL" }}
{{- end }}
{{- if gt (int .Values.streams.replicaCount) (int .Values.topics.partitions) }}
{{- fail (printf "streams.replicaCount (%d) exceeds topics.partitions (%d): the extra workers would own no partition" (int .Values.streams.replicaCount) (int .Values.topics.partitions)) }}
{{- end }}
{{- $sd := .Values.gateway.shutdown }}
{{- if $sd.preStopDrain.enabled }}
{{- $needed := add $sd.preStopSleepSeconds $sd.preStopDrain.timeoutSeconds $sd.graceSeconds $sd.drainSeconds 5 }}
{{- if lt (int .Values.gateway.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must be at least %d: preStopSleep + preStopDrain.timeout + grace + drain + 5 s, or the spool cannot drain before SIGKILL" (int .Values.gateway.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- else }}
{{- $needed := add $sd.preStopSleepSeconds $sd.graceSeconds $sd.drainSeconds 5 }}
{{- if lt (int .Values.gateway.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must be at least %d: preStopSleep + grace + drain + 5 s, or the spool cannot drain before SIGKILL" (int .Values.gateway.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (eq (include "presence.gateway.kind" .) "StatefulSet") (not $sd.preStopDrain.enabled) }}
{{- fail "gateway.autoscaling.enabled with a persistent spool strands events: a scaled-in replica stops after drainSeconds (at once when Kafka is down) and its spooled events wait on its volume until that replica returns. Set gateway.shutdown.preStopDrain.enabled=true (a leaving pod first waits until its spool is empty; raise terminationGracePeriodSeconds to match), or scale the gateway by hand (gateway.autoscaling.enabled=false)" }}
{{- end }}
{{- if and .Values.gateway.spool.enabled .Values.gateway.spool.persistence.enabled }}
{{- $volume := include "presence.quantityBytes" .Values.gateway.spool.persistence.size | float64 }}
{{- if gt (float64 .Values.gateway.spool.maxBytes) (mulf $volume 0.9) }}
{{- fail (printf "gateway.spool.maxBytes (%d) does not fit gateway.spool.persistence.size (%s): keep it at most 90%% of the volume (the filesystem needs the rest), i.e. at most %d, or enlarge the volume" (int64 .Values.gateway.spool.maxBytes) .Values.gateway.spool.persistence.size (int64 (mulf $volume 0.9))) }}
{{- end }}
{{- end }}
{{- if and .Values.kafkaExporter.enabled (has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL")) (not (and .Values.kafka.tls.enabled .Values.kafka.tls.caKey)) }}
{{- fail "kafkaExporter.enabled over TLS needs the brokers' CA: set kafka.tls.enabled, kafka.tls.existingSecret and kafka.tls.caKey (kafka-exporter does not use the system's CAs)" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas exceeds maxReplicas" }}
{{- end }}
{{- end }}

{{/* Environment shared by both components: the ConfigMap, the secrets, the TLS file paths. */}}
{{- define "presence.commonEnv" -}}
{{- if and (hasPrefix "SASL" .Values.kafka.securityProtocol) (not .Values.strimzi.users.enabled) }}
- name: PRESENCE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (include "presence.secretName" .) .Values.kafka.sasl.existingSecret }}
      key: {{ ternary .Values.kafka.sasl.passwordKey "kafka-sasl-password" (not (empty .Values.kafka.sasl.existingSecret)) }}
{{- end }}
{{- if .Values.kafka.tls.enabled }}
{{- if .Values.kafka.tls.caKey }}
- name: PRESENCE_KAFKA_SSL_CAFILE
  value: /etc/presence/kafka-tls/{{ .Values.kafka.tls.caKey }}
{{- end }}
{{- if .Values.kafka.tls.certKey }}
- name: PRESENCE_KAFKA_SSL_CERTFILE
  value: /etc/presence/kafka-tls/{{ .Values.kafka.tls.certKey }}
{{- end }}
{{- if .Values.kafka.tls.keyKey }}
- name: PRESENCE_KAFKA_SSL_KEYFILE
  value: /etc/presence/kafka-tls/{{ .Values.kafka.tls.keyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes and mounts shared by both components. */}}
{{- define "presence.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.kafka.tls.enabled }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- define "presence.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.tls.enabled }}
- name: kafka-tls
  mountPath: /etc/presence/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod-level settings shared by both components. */}}
{{- define "presence.podCommon" -}}
serviceAccountName: {{ include "presence.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
enableServiceLinks: false
{{- end }}

{{/* Default soft anti-affinity: spread a component's replicas over nodes. Arg: dict ctx, component. */}}
{{- define "presence.defaultAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include (printf "presence.%s.selectorLabels" .component) .ctx | nindent 12 }}
{{- end }}

{{/* Egress rules both components need: DNS and the Kafka brokers. */}}
{{- define "presence.egressDnsKafka" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
- ports:
    {{- range .Values.networkPolicy.egress.kafkaPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.egress.kafkaPeers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A setting's value as an environment string; whole numbers stay whole (YAML numbers arrive as floats). */}}
{{- define "presence.settingValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 .) (floor .)) }}{{ int64 . | toString | quote }}{{ else }}{{ toString . | quote }}{{ end }}
{{- end }}

{{/* kafka-exporter (broker-side consumer lag for the alerts), an option of the chart. */}}
{{- define "presence.kafkaExporter.fullname" -}}
{{- printf "%s-kafka-exporter" (include "presence.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "presence.kafkaExporter.labels" -}}
{{ include "presence.labels" . }}
app.kubernetes.io/component: kafka-exporter
{{- end }}
{{- define "presence.kafkaExporter.selectorLabels" -}}
{{ include "presence.selectorLabels" . }}
app.kubernetes.io/component: kafka-exporter
{{- end }}

{{/* Names of the Secrets the chart does not own but whose change should roll the pods. */}}
{{- define "presence.externalSecrets" -}}
{{- $names := list }}
{{- with .Values.app.existingSecret }}{{ $names = append $names . }}{{ end }}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol }}{{ with .Values.kafka.sasl.existingSecret }}{{ $names = append $names . }}{{ end }}{{ end }}
{{- if .Values.kafka.tls.enabled }}{{ with .Values.kafka.tls.existingSecret }}{{ $names = append $names . }}{{ end }}{{ end }}
{{- $names | uniq | join "," }}
{{- end }}

{{/*
Pod annotations that roll the pods when a Secret changes: the chart's own Secret by its rendered content, and the
existing Secrets by their content as far as the chart can see them (lookup: on `helm upgrade` against a cluster, so
an upgrade after a rotation rolls the pods; `helm template` sees nothing). Between upgrades a reloader does it:
secretRotation.reloaderAnnotation adds the annotation stakater/Reloader watches.
*/}}
{{- define "presence.secretAnnotations" -}}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- $external := include "presence.externalSecrets" . }}
{{- if $external }}
{{- $seen := list }}
{{- range $name := splitList "," $external }}
{{- $secret := lookup "v1" "Secret" $.Release.Namespace $name | default dict }}
{{- $seen = append $seen (printf "%s=%s" $name (get $secret "data" | default dict | toJson | sha256sum)) }}
{{- end }}
checksum/existing-secrets: {{ $seen | join "," | sha256sum }}
{{- if .Values.secretRotation.reloaderAnnotation }}
secret.reloader.stakater.com/reload: {{ $external | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity (2Gi, 500M, 1073741824) in bytes, as a float. */}}
{{- define "presence.quantityBytes" -}}
{{- $q := toString . }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $unit := trimPrefix $number $q }}
{{- $factors := dict "" 1.0 "k" 1e3 "K" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 }}
{{- if or (not $number) (not (hasKey $factors $unit)) }}
{{- fail (printf "cannot read the quantity %q (use a number with k, M, G, T, P, Ki, Mi, Gi, Ti or Pi)" $q) }}
{{- end }}
{{- mulf (float64 $number) (get $factors $unit) }}
{{- end }}

{{/* A setting from a values map (extraConfig) as a string, else the default. Args: dict values, key, default. */}}
{{- define "presence.settingString" -}}
{{- if hasKey .values .key }}{{ include "presence.settingValue" (index .values .key) | trimAll "\"" }}{{ else }}{{ .default | toString }}{{ end }}
{{- end }}

{{/* The Kafka user (Strimzi KafkaUser, and its Secret) of a component. Args: dict ctx, component. */}}
{{- define "presence.kafkaUser" -}}
{{- printf "%s-%s" (include "presence.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
With strimzi.users.enabled each component logs in as its own KafkaUser: the user name is the KafkaUser's, the password
the one the User Operator writes into the Secret of the same name. Arg: dict ctx, component.
*/}}
{{- define "presence.kafkaUserEnv" -}}
{{- if .ctx.Values.strimzi.users.enabled }}
- name: PRESENCE_KAFKA_SASL_USERNAME
  value: {{ include "presence.kafkaUser" . | quote }}
- name: PRESENCE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "presence.kafkaUser" . }}
      key: password
{{- end }}
{{- end }}
