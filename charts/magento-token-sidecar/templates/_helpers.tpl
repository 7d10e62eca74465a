{{/*
Names, labels and the reusable pieces of the sidecar.

Every template below takes the chart's context: `.` inside this chart, and
`(index .Subcharts "magento-token-sidecar")` in a parent chart that lists this chart as a
dependency (see the README, "Adding the sidecar to an existing chart"). None of them uses
`.Template`, which a subchart's context does not carry.

Public pieces, for a pod spec of your own:
  magento-token-sidecar.initContainers   items for `initContainers:` (the native sidecar, or the `once` container)
  magento-token-sidecar.containers       items for `containers:` (the daemon in the classic layout; empty when native)
  magento-token-sidecar.container        the daemon container alone
  magento-token-sidecar.onceContainer    the `once` init container alone
  magento-token-sidecar.volumes          items for `volumes:` (tokens, config, passwords or the auth Secret)
  magento-token-sidecar.volume           the token volume alone
  magento-token-sidecar.volumeMount      item for the app container's `volumeMounts:` (read-only tokens)
  magento-token-sidecar.podAnnotations   checksum/config and checksum/secret, for the pod template
*/}}

{{- define "magento-token-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "magento-token-sidecar.fullname" -}}
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

{{/* A name derived from the full name, kept within 63 characters: (list $ctx "suffix"). */}}
{{- define "magento-token-sidecar.suffixed" -}}
{{- $ctx := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "magento-token-sidecar.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "magento-token-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "magento-token-sidecar.labels" -}}
helm.sh/chart: {{ include "magento-token-sidecar.chart" . }}
{{ include "magento-token-sidecar.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels: name and instance only, so they never change on upgrade. */}}
{{- define "magento-token-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "magento-token-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "magento-token-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "magento-token-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "magento-token-sidecar.configMapName" -}}
{{- include "magento-token-sidecar.fullname" . }}
{{- end }}

{{- define "magento-token-sidecar.secretName" -}}
{{- default (include "magento-token-sidecar.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: (list $image $defaultTag). */}}
{{- define "magento-token-sidecar.imageRef" -}}
{{- $image := index . 0 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (toString (default (index . 1) $image.tag)) }}
{{- end }}
{{- end }}

{{- define "magento-token-sidecar.image" -}}
{{- include "magento-token-sidecar.imageRef" (list .Values.image .Chart.AppVersion) }}
{{- end }}

{{/* `mode: central`'s image: the variant built with the `kubernetes` feature, the tag with
image.centralSuffix appended. A digest names one image: in central mode, give the central one's. */}}
{{- define "magento-token-sidecar.centralImage" -}}
{{- $image := deepCopy .Values.image }}
{{- $_ := set $image "tag" (printf "%s%s" (toString (default .Chart.AppVersion .Values.image.tag)) .Values.image.centralSuffix) }}
{{- include "magento-token-sidecar.imageRef" (list $image .Chart.AppVersion) }}
{{- end }}

{{/* Where the pieces live inside the daemon's containers. */}}
{{- define "magento-token-sidecar.configDir" -}}/etc/magento-token-sidecar/config{{- end }}
{{- define "magento-token-sidecar.configFile" -}}/etc/magento-token-sidecar/config/config.yaml{{- end }}
{{- define "magento-token-sidecar.secretDir" -}}/etc/magento-token-sidecar/secrets{{- end }}

{{- define "magento-token-sidecar.adminDir" -}}/etc/magento-token-sidecar/admin{{- end }}
{{- define "magento-token-sidecar.imsDir" -}}/etc/magento-token-sidecar/ims{{- end }}

{{/* auth.method: password (the default), login_as_customer or cloud_service_otp. */}}
{{- define "magento-token-sidecar.authMethod" -}}
{{- default "password" (.Values.auth | default dict).method }}
{{- end }}

{{/* "true" when customers log in with their own passwords (auth.method password), "" otherwise:
then there is no password Secret, no password volume and no password_file. */}}
{{- define "magento-token-sidecar.usesPasswords" -}}
{{- if eq (include "magento-token-sidecar.authMethod" .) "password" }}true{{ end }}
{{- end }}

{{/* The key holding a customer's password in the Secret. */}}
{{- define "magento-token-sidecar.passwordKey" -}}
{{- default .name .passwordKey }}
{{- end }}

{{/* Fails the render, naming the value to fix, when the customers cannot work. */}}
{{- define "magento-token-sidecar.validate" -}}
{{- if not .Values.customers }}
{{- fail "customers: list at least one customer (name, username, password or existingSecret)" }}
{{- end }}
{{- $method := include "magento-token-sidecar.authMethod" . }}
{{- $passwords := include "magento-token-sidecar.usesPasswords" . }}
{{- $seen := dict }}
{{- range $i, $c := .Values.customers }}
{{- if hasKey $seen $c.name }}
{{- fail (printf "customers[%d].name: %q is used twice; names must be unique" $i $c.name) }}
{{- end }}
{{- $_ := set $seen $c.name true }}
{{- if and $c.secret (not (include "magento-token-sidecar.isCentral" $)) }}
{{- fail (printf "customers[%d].secret: applies only to mode: central, where tokens go into Secrets; in sidecar mode every token is a file" $i) }}
{{- end }}
{{- if $passwords }}
{{- if and (not $.Values.existingSecret) (not $c.password) }}
{{- fail (printf "customers[%d].password: required unless existingSecret names a Secret holding it (customer %q)" $i $c.name) }}
{{- end }}
{{- else }}
{{- range $key := list "password" "passwordKey" }}
{{- if not (kindIs "invalid" (index $c $key)) }}
{{- fail (printf "customers[%d].%s: auth.method %s logs customers in without their passwords (the daemon refuses one): remove it (customer %q)" $i $key $method $c.name) }}
{{- end }}
{{- end }}
{{- if and (eq $method "cloud_service_otp") (kindIs "invalid" $c.customer_id) }}
{{- fail (printf "customers[%d].customer_id: required with auth.method cloud_service_otp: Magento's numeric id of customer %q (the ID column of Customers > All Customers)" $i $c.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not $passwords) .Values.existingSecret }}
{{- fail (printf "existingSecret: names a Secret of customer passwords, which auth.method %s does not use: remove it" $method) }}
{{- end }}
{{- if and (eq $method "login_as_customer") .Values.magento.cloud_service }}
{{- fail "auth.method: login_as_customer needs an admin token, which Adobe Commerce as a Cloud Service (magento.cloud_service: true) does not issue: use cloud_service_otp there" }}
{{- end }}
{{- if and (eq $method "cloud_service_otp") (not .Values.magento.cloud_service) }}
{{- fail "auth.method: cloud_service_otp is Adobe Commerce as a Cloud Service's way: set magento.cloud_service: true (base_url https://<region>.api.commerce.adobe.com/<tenant-id>), or use login_as_customer on other stores" }}
{{- end }}
{{- $k := include "magento-token-sidecar.kubernetesOutput" . | fromYaml }}
{{- if and $k.token_api (not (include "magento-token-sidecar.isCentral" .)) }}
{{- fail "output.kubernetes.token_api: the token API is central mode's (mode: central), which keeps the tokens in a Secret; in sidecar mode the app reads its token file beside it and asks POST /refresh/<name> on localhost after a 401" }}
{{- end }}
{{- if and $k.token_api (has (toString .Values.admin.bindAddress) (list "127.0.0.1" "localhost" "[::1]" "::1")) }}
{{- fail (printf "admin.bindAddress: %s is loopback, where no app pod reaches the token API (output.kubernetes.token_api); use 0.0.0.0 (or [::] on IPv6-only clusters)" .Values.admin.bindAddress) }}
{{- end }}
{{- if and .Values.nativeSidecar (not (include "magento-token-sidecar.isCentral" .)) (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "nativeSidecar: native sidecar containers need Kubernetes 1.29 or later (this is %s); set nativeSidecar=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}

{{/*
The daemon's `output`: the token directory, mode and format, and the files' owner. The group is
`output.gid`, else the pod's `fsGroup` (the daemon is a member of it: no privilege needed, and
the app reads the tokens through it); the owner only when `output.uid` is set, which needs a
daemon that may give files away: refused here for a non-root one or without CHOWN and FOWNER.
Ids go out as integers (Helm reads numbers as floats: 4294967294 would become 4.294967294e+09).
*/}}
{{- define "magento-token-sidecar.output" -}}
{{- if include "magento-token-sidecar.isCentral" . }}
{{- include "magento-token-sidecar.centralOutput" . }}
{{- else }}
{{- $out := dict "dir" .Values.tokens.mountPath "mode" .Values.output.mode "format" .Values.output.format }}
{{- if .Values.output.index }}
{{- $_ := set $out "index" .Values.output.index }}
{{- end }}
{{- $uid := .Values.output.uid }}
{{- if not (kindIs "invalid" $uid) }}
{{- $sc := .Values.sidecar.securityContext | default dict }}
{{- $runAs := $sc.runAsUser }}
{{- $nonRoot := or (and (kindIs "invalid" $runAs) $sc.runAsNonRoot) (and (not (kindIs "invalid" $runAs)) (ne (int64 $runAs) 0)) }}
{{- if and $nonRoot (or (kindIs "invalid" $runAs) (ne (int64 $runAs) (int64 $uid))) }}
{{- fail (printf "output.uid: %d: the daemon runs as a non-root user (sidecar.securityContext.runAsUser %v) and may not give files away; run it as root (runAsUser: 0, runAsNonRoot: false) with capabilities add [CHOWN, FOWNER], or drop output.uid (output.gid with mode \"0640\" lets the app read the tokens)" (int64 $uid) (default "unset" $runAs)) }}
{{- end }}
{{- if not $nonRoot }}
{{- $caps := $sc.capabilities | default dict }}
{{- $dropped := has "ALL" ($caps.drop | default list) }}
{{- $added := $caps.add | default list }}
{{- if and $dropped (not (and (has "CHOWN" $added) (has "FOWNER" $added))) }}
{{- fail (printf "output.uid: %d: the daemon needs the CHOWN and FOWNER capabilities to give files away; add them to sidecar.securityContext.capabilities.add" (int64 $uid)) }}
{{- end }}
{{- end }}
{{- $_ := set $out "uid" (int64 $uid) }}
{{- end }}
{{- $gid := .Values.output.gid }}
{{- if kindIs "invalid" $gid }}
{{- $gid = (.Values.podSecurityContext | default dict).fsGroup }}
{{- end }}
{{- if not (kindIs "invalid" $gid) }}
{{- $_ := set $out "gid" (int64 $gid) }}
{{- end }}
{{- toYaml $out }}
{{- end }}
{{- end }}

{{/* A copy of a map without its null and "" entries (the daemon takes absent keys as defaults). */}}
{{- define "magento-token-sidecar.compact" -}}
{{- $out := dict }}
{{- range $k, $v := . }}
{{- if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v ""))) }}
{{- $_ := set $out $k $v }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
The daemon's `auth`, for a method other than password: the admin's or the IMS credential's
secrets are files in their Secret's directory (as passwords are), the other keys as they are;
token_url and scopes left out when empty (the daemon's defaults).
*/}}
{{- define "magento-token-sidecar.authConfig" -}}
{{- $method := include "magento-token-sidecar.authMethod" . }}
{{- $auth := dict "method" $method }}
{{- if eq $method "login_as_customer" }}
{{- $a := .Values.auth.admin }}
{{- $dir := include "magento-token-sidecar.adminDir" . }}
{{- $admin := dict "username" $a.username "password_file" (printf "%s/%s" $dir $a.passwordKey) }}
{{- with $a.totpSecretKey }}
{{- $_ := set $admin "totp_secret_file" (printf "%s/%s" $dir .) }}
{{- end }}
{{- $_ := set $auth "admin" $admin }}
{{- else if eq $method "cloud_service_otp" }}
{{- $i := .Values.auth.ims }}
{{- $ims := include "magento-token-sidecar.compact" (pick $i "token_url" "client_id" "org_id") | fromYaml }}
{{- with $i.scopes }}
{{- $_ := set $ims "scopes" . }}
{{- end }}
{{- $_ := set $ims "client_secret_file" (printf "%s/%s" (include "magento-token-sidecar.imsDir" .) $i.clientSecretKey) }}
{{- $_ := set $auth "ims" $ims }}
{{- end }}
{{- toYaml $auth }}
{{- end }}

{{/*
The daemon's config file. Password files point into the mounted Secret directory, one file
per key (no subPath: a rotated Secret arrives through the kubelet's symlink swap and the
daemon re-reads the file before each login). Without customer passwords (auth.method other
than password) `auth` says how tokens are obtained and customers have no password_file.
Customer ids go out as integers (Helm reads numbers as floats).
*/}}
{{- define "magento-token-sidecar.config" -}}
{{- include "magento-token-sidecar.validate" . }}
{{- $passwords := include "magento-token-sidecar.usesPasswords" . }}
{{- $customers := list }}
{{- range .Values.customers }}
{{- $c := include "magento-token-sidecar.compact" (omit . "password" "passwordKey" "customer_id") | fromYaml }}
{{- if $passwords }}
{{- $_ := set $c "password_file" (printf "%s/%s" (include "magento-token-sidecar.secretDir" $) (include "magento-token-sidecar.passwordKey" .)) }}
{{- end }}
{{- if not (kindIs "invalid" .customer_id) }}
{{- $_ := set $c "customer_id" (int64 .customer_id) }}
{{- end }}
{{- $customers = append $customers $c }}
{{- end }}
{{- $cfg := dict
  "magento" (include "magento-token-sidecar.compact" .Values.magento | fromYaml)
  "refresh" (include "magento-token-sidecar.compact" .Values.refresh | fromYaml)
  "output" (include "magento-token-sidecar.output" . | fromYaml)
  "admin" (dict "listen" (printf "%s:%v" .Values.admin.bindAddress .Values.admin.port))
  "log" .Values.log
  "customers" $customers }}
{{- $n := .Values.notify | default dict }}
{{- $notify := dict }}
{{- with $n.exec }}{{ $_ := set $notify "exec" . }}{{ end }}
{{- with $n.webhook }}{{ $_ := set $notify "webhook" . }}{{ end }}
{{- with $n.signal }}{{ $_ := set $notify "signal" . }}{{ end }}
{{- if $notify }}
{{- with $n.timeout }}{{ $_ := set $notify "timeout" . }}{{ end }}
{{- $_ := set $cfg "notify" $notify }}
{{- end }}
{{- if not $passwords }}
{{- $_ := set $cfg "auth" (include "magento-token-sidecar.authConfig" . | fromYaml) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* What the chart puts into its Secret, or which Secret and keys it expects. */}}
{{- define "magento-token-sidecar.secretData" -}}
{{- if .Values.existingSecret }}
existingSecret: {{ .Values.existingSecret }}
keys:
{{- range .Values.customers }}
  - {{ include "magento-token-sidecar.passwordKey" . }}
{{- end }}
{{- else }}
{{- range .Values.customers }}
{{ include "magento-token-sidecar.passwordKey" . }}: {{ .password | toString | b64enc }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What checksum/secret covers: the password Secret (its content, or the existing Secret's name and
keys), or without customer passwords the admin's or the IMS credential's Secret and keys (their
content is not the chart's to see: the daemon reads a rotated secret before its next use).
*/}}
{{- define "magento-token-sidecar.secretsInUse" -}}
{{- if include "magento-token-sidecar.usesPasswords" . }}
{{- include "magento-token-sidecar.secretData" . }}
{{- else }}
{{- $method := include "magento-token-sidecar.authMethod" . }}
method: {{ $method }}
{{- if eq $method "login_as_customer" }}
adminSecret: {{ .Values.auth.admin.existingSecret }}
keys: {{ compact (list .Values.auth.admin.passwordKey .Values.auth.admin.totpSecretKey) | toJson }}
{{- else }}
imsSecret: {{ .Values.auth.ims.existingSecret }}
keys: {{ list .Values.auth.ims.clientSecretKey | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{- define "magento-token-sidecar.podAnnotations" -}}
checksum/config: {{ include "magento-token-sidecar.config" . | sha256sum }}
checksum/secret: {{ include "magento-token-sidecar.secretsInUse" . | sha256sum }}
{{- end }}

{{/* The volumes the daemon's containers mount. */}}
{{- define "magento-token-sidecar.volume" -}}
- name: magento-tokens
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.tokens.sizeLimit }}
{{- end }}

{{- define "magento-token-sidecar.volumes" -}}
{{ include "magento-token-sidecar.volume" . }}
{{ include "magento-token-sidecar.configVolumes" . }}
{{- end }}

{{/* The config and secret volumes alone (central mode has no token directory): the customer
passwords, or without them the admin's or the IMS credential's Secret. */}}
{{- define "magento-token-sidecar.configVolumes" -}}
{{- $method := include "magento-token-sidecar.authMethod" . -}}
- name: magento-token-sidecar-config
  configMap:
    name: {{ include "magento-token-sidecar.configMapName" . }}
{{- if include "magento-token-sidecar.usesPasswords" . }}
- name: magento-token-sidecar-secrets
  secret:
    secretName: {{ include "magento-token-sidecar.secretName" . }}
    # 0440: owned by root with the pod's fsGroup, readable by the daemon's group only.
    defaultMode: 288
{{- else if eq $method "login_as_customer" }}
- name: magento-token-sidecar-admin
  secret:
    secretName: {{ .Values.auth.admin.existingSecret }}
    # 0440, as the customer passwords: readable by the daemon's group only.
    defaultMode: 288
{{- else if eq $method "cloud_service_otp" }}
- name: magento-token-sidecar-ims
  secret:
    secretName: {{ .Values.auth.ims.existingSecret }}
    # 0440, as the customer passwords: readable by the daemon's group only.
    defaultMode: 288
{{- end }}
{{- end }}

{{/* The app container's mount of the token directory: the whole directory, read-only. */}}
{{- define "magento-token-sidecar.volumeMount" -}}
- name: magento-tokens
  mountPath: {{ .Values.tokens.mountPath }}
  readOnly: true
{{- end }}

{{- define "magento-token-sidecar.daemonMounts" -}}
- name: magento-tokens
  mountPath: {{ .Values.tokens.mountPath }}
{{ include "magento-token-sidecar.configMounts" . }}
{{- end }}

{{/* The daemon's mounts of its config and passwords (or the admin's or IMS credential's
Secret), and sidecar.extraVolumeMounts. */}}
{{- define "magento-token-sidecar.configMounts" -}}
{{- $method := include "magento-token-sidecar.authMethod" . -}}
- name: magento-token-sidecar-config
  mountPath: {{ include "magento-token-sidecar.configDir" . }}
  readOnly: true
{{- if include "magento-token-sidecar.usesPasswords" . }}
- name: magento-token-sidecar-secrets
  mountPath: {{ include "magento-token-sidecar.secretDir" . }}
  readOnly: true
{{- else if eq $method "login_as_customer" }}
- name: magento-token-sidecar-admin
  mountPath: {{ include "magento-token-sidecar.adminDir" . }}
  readOnly: true
{{- else if eq $method "cloud_service_otp" }}
- name: magento-token-sidecar-ims
  mountPath: {{ include "magento-token-sidecar.imsDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.sidecar.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "magento-token-sidecar.probe" -}}
{{- $probe := index . 0 -}}
httpGet:
  path: {{ index . 1 }}
  port: admin
{{- with omit $probe "enabled" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The daemon: a native sidecar (restartPolicy: Always) or an ordinary container. */}}
{{- define "magento-token-sidecar.container" -}}
- name: {{ .Values.sidecar.name }}
  image: {{ include "magento-token-sidecar.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  args:
    - run
    - --config
    - {{ include "magento-token-sidecar.configFile" . }}
  {{- with .Values.sidecar.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  {{- if .Values.sidecar.startupProbe.enabled }}
  startupProbe:
    {{- include "magento-token-sidecar.probe" (list .Values.sidecar.startupProbe "/readyz") | nindent 4 }}
  {{- end }}
  {{- if .Values.sidecar.livenessProbe.enabled }}
  livenessProbe:
    {{- include "magento-token-sidecar.probe" (list .Values.sidecar.livenessProbe "/healthz") | nindent 4 }}
  {{- end }}
  {{- if .Values.sidecar.readinessProbe.enabled }}
  readinessProbe:
    {{- include "magento-token-sidecar.probe" (list .Values.sidecar.readinessProbe "/readyz") | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "magento-token-sidecar.daemonMounts" . | nindent 4 }}
{{- end }}

{{/* The classic layout's init container: the first tokens exist before the app starts. */}}
{{- define "magento-token-sidecar.onceContainer" -}}
- name: {{ .Values.init.name }}
  image: {{ include "magento-token-sidecar.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - once
    - --config
    - {{ include "magento-token-sidecar.configFile" . }}
    - --timeout
    - {{ .Values.init.timeout | quote }}
  {{- with .Values.sidecar.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.init.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "magento-token-sidecar.daemonMounts" . | nindent 4 }}
{{- end }}

{{- define "magento-token-sidecar.initContainers" -}}
{{- if .Values.nativeSidecar }}
{{- include "magento-token-sidecar.container" . }}
{{- else }}
{{- include "magento-token-sidecar.onceContainer" . }}
{{- end }}
{{- end }}

{{- define "magento-token-sidecar.containers" -}}
{{- if not .Values.nativeSidecar }}
{{- include "magento-token-sidecar.container" . }}
{{- end }}
{{- end }}

{{/* The pods the metrics Service and PodMonitor select: this chart's, or `metrics.selector`. */}}
{{- define "magento-token-sidecar.metricsSelector" -}}
{{- if .Values.metrics.selector }}
{{- toYaml .Values.metrics.selector }}
{{- else }}
{{- include "magento-token-sidecar.selectorLabels" . }}
{{- end }}
{{- end }}
