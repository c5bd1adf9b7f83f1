{{/* Names and labels shared by every object. */}}
{{- define "vlaserve.name" -}}
{{- printf "%s-vlaserve" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "vlaserve.labels" -}}
app.kubernetes.io/name: vlaserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vlaserve.tritonSelector" -}}
app.kubernetes.io/name: vlaserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end -}}

{{- define "vlaserve.gatewaySelector" -}}
app.kubernetes.io/name: vlaserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "vlaserve.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* The spec inside the image (deploy/triton/Dockerfile copies model_repository/spec.yaml there). */}}
{{- define "vlaserve.spec" -}}/opt/vlaserve/model_repository/spec.yaml{{- end -}}

{{/* The export's folder on the model volume, named by what it exports, so that other values export afresh
     (modelRepository.exportDir, for a claim that holds an export under another name). */}}
{{- define "vlaserve.exportDir" -}}
{{- if .Values.modelRepository.exportDir -}}
{{ printf "/models/%s" .Values.modelRepository.exportDir }}
{{- else -}}
{{ printf "/models/exports/%s-%dv-%s-%s" .Values.model.preset (int .Values.model.views) .Values.model.dtype (.Values.model.checkpoint | default "random" | sha256sum | trunc 8) }}
{{- end -}}
{{- end -}}
