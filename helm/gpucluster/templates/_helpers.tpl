{{/* The chart's name, truncated to the 63 characters of a label value. */}}
{{- define "gpucluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix for every object's name. */}}
{{- define "gpucluster.fullname" -}}
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

{{/* A component's object name: <fullname>-<component>. */}}
{{- define "gpucluster.componentName" -}}
{{- printf "%s-%s" (include "gpucluster.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object but its selector's. */}}
{{- define "gpucluster.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpucluster
{{- end -}}

{{/* Labels of an object that belongs to no one component. */}}
{{- define "gpucluster.labels" -}}
{{ include "gpucluster.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
A component's selector labels. app.kubernetes.io/name is gpucluster-<component>
whatever the release is called: the ServiceMonitors make it Prometheus's job
label, and the alert rules and the dashboard select job="gpucluster-operator"
and job="gpucluster-agent".
*/}}
{{- define "gpucluster.selectorLabels" -}}
app.kubernetes.io/name: gpucluster-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gpucluster.componentLabels" -}}
{{ include "gpucluster.commonLabels" .root }}
{{ include "gpucluster.selectorLabels" . }}
{{- end -}}

{{/* repository/image:version of a component, the version defaulting to appVersion. */}}
{{- define "gpucluster.image" -}}
{{- $version := .values.version | default .root.Chart.AppVersion -}}
{{- if .values.repository -}}
{{- printf "%s/%s:%s" .values.repository .values.image $version -}}
{{- else -}}
{{- printf "%s:%s" .values.image $version -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount of a component. */}}
{{- define "gpucluster.serviceAccountName" -}}
{{- include "gpucluster.componentName" . -}}
{{- end -}}
