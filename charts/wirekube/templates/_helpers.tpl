{{/* Chart name, truncated to fit DNS labels. */}}
{{- define "wirekube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix: the release name, plus the chart name unless it already contains it. */}}
{{- define "wirekube.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "wirekube.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "wirekube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wirekube
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "agent") */}}
{{- define "wirekube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wirekube.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "wirekube.componentLabels" -}}
{{ include "wirekube.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference from a component's image values: digest wins over tag; tag defaults to appVersion. */}}
{{- define "wirekube.image" -}}
{{- $img := .image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* ServiceAccount name of a component: (dict "ctx" $ "component" "agent" "sa" .Values.agent.serviceAccount) */}}
{{- define "wirekube.serviceAccountName" -}}
{{- if .sa.create -}}
{{- default (printf "%s-%s" (include "wirekube.fullname" .ctx) .component) .sa.name -}}
{{- else -}}
{{- default "default" .sa.name -}}
{{- end -}}
{{- end -}}

{{/* A component's pod labels: its selector labels plus <component>.podLabels.
     (dict "ctx" $ "component" "agent" "extra" .Values.agent.podLabels) */}}
{{- define "wirekube.podLabels" -}}
{{ include "wirekube.selectorLabels" (dict "ctx" .ctx "component" .component) }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A component's topology spread constraints; an entry without labelSelector selects the
     component's own pods. (dict "ctx" $ "component" "relay" "constraints" .Values.relay.topologySpreadConstraints) */}}
{{- define "wirekube.topologySpreadConstraints" -}}
{{- $selector := dict "matchLabels" (include "wirekube.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml) -}}
{{- range .constraints }}
- {{ merge (deepCopy .) (dict "labelSelector" $selector) | toYaml | nindent 2 | trim }}
{{- end }}
{{- end -}}
