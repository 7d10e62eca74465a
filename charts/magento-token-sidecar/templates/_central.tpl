{{/*
Central mode (`mode: central`): the daemon alone in a Deployment of several replicas; the holder
of a coordination.k8s.io Lease logs in and writes every customer's token into a Secret, which
the app's pods mount. Sidecar mode (the default) uses none of these templates.
*/}}

{{/* "true" in central mode, "" otherwise (a string: Helm's include returns one). */}}
{{- define "magento-token-sidecar.isCentral" -}}
{{- if eq (toString .Values.mode) "central" }}true{{ end }}
{{- end }}

{{- define "magento-token-sidecar.kubernetesOutput" -}}
{{- toYaml ((.Values.output | default dict).kubernetes | default dict) }}
{{- end }}

{{/* The Secret the Lease holder writes: output.kubernetes.secret, else <fullname>-tokens. */}}
{{- define "magento-token-sidecar.tokenSecretName" -}}
{{- $k := include "magento-token-sidecar.kubernetesOutput" . | fromYaml }}
{{- default (include "magento-token-sidecar.suffixed" (list . "tokens")) $k.secret }}
{{- end }}

{{/* "true" when central mode's token API is on (output.kubernetes.token_api), "" otherwise. */}}
{{- define "magento-token-sidecar.tokenApi" -}}
{{- $k := include "magento-token-sidecar.kubernetesOutput" . | fromYaml }}
{{- if and (include "magento-token-sidecar.isCentral" .) $k.token_api }}true{{ end }}
{{- end }}

{{/* Every Secret the holder writes, as a JSON list: the token Secret, then each customers[].secret. */}}
{{- define "magento-token-sidecar.tokenSecretNames" -}}
{{- $names := list (include "magento-token-sidecar.tokenSecretName" .) }}
{{- range .Values.customers }}
{{- if .secret }}{{ $names = append $names .secret }}{{ end }}
{{- end }}
{{- toJson ($names | uniq) }}
{{- end }}

{{/* The Lease: output.kubernetes.lease, else the token Secret's name. */}}
{{- define "magento-token-sidecar.leaseName" -}}
{{- $k := include "magento-token-sidecar.kubernetesOutput" . | fromYaml }}
{{- default (include "magento-token-sidecar.tokenSecretName" .) $k.lease }}
{{- end }}

{{/*
The daemon's `output` in central mode: `kubernetes` instead of `dir`, in the release's namespace
(where the Role grants its verbs). A Secret's keys have no mode, owner or group, and the token
Secret is the index of every token already: those settings are refused rather than ignored.
*/}}
{{- define "magento-token-sidecar.centralOutput" -}}
{{- $o := .Values.output | default dict }}
{{- range $key := list "index" "uid" "gid" }}
{{- if not (kindIs "invalid" (index $o $key)) }}
{{- fail (printf "output.%s: does not apply in mode: central, where the tokens go into a Secret (one key per customer); remove it" $key) }}
{{- end }}
{{- end }}
{{- $k := include "magento-token-sidecar.kubernetesOutput" . | fromYaml }}
{{- $kube := dict
  "secret" (include "magento-token-sidecar.tokenSecretName" .)
  "namespace" .Release.Namespace
  "lease" (include "magento-token-sidecar.leaseName" .)
  "lease_duration" (default "15s" $k.lease_duration) }}
{{- if $k.token_api }}
{{- $_ := set $kube "token_api" true }}
{{- end }}
{{- toYaml (dict "kubernetes" $kube "format" $o.format) }}
{{- end }}

{{/* The central Deployment's only container: the daemon, told its replica identity. */}}
{{- define "magento-token-sidecar.centralContainer" -}}
- name: {{ .Values.sidecar.name }}
  image: {{ include "magento-token-sidecar.centralImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - run
    - --config
    - {{ include "magento-token-sidecar.configFile" . }}
  env:
    # The replica's identity in the Lease (holderIdentity): the pod's name.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    # POST /refresh through the Service as <service>.<namespace>: a Host the daemon accepts.
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- with .Values.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  {{- if .Values.sidecar.livenessProbe.enabled }}
  livenessProbe:
    {{- include "magento-token-sidecar.probe" (list .Values.sidecar.livenessProbe "/healthz") | nindent 4 }}
  {{- end }}
  {{- if .Values.central.readinessProbe.enabled }}
  readinessProbe:
    {{- include "magento-token-sidecar.probe" (list .Values.central.readinessProbe "/readyz") | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "magento-token-sidecar.configMounts" . | nindent 4 }}
{{- end }}
