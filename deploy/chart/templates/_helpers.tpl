{{/* The image of both the agent and the CA (one binary). */}}
{{- define "mesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* How the agents reach the CA: by the Service's name unless told otherwise. */}}
{{- define "mesh.caAddress" -}}
{{ .Values.ca.address | default (printf "mesh-ca.%s.svc:15012" .Release.Namespace) }}
{{- end -}}

{{- define "mesh.labels" -}}
app.kubernetes.io/part-of: mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
