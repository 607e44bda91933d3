{{/* The release's full name, 63 characters at most (a DNS label). */}}
{{- define "pipeshift.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pipeshift.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "pipeshift.labels" -}}
{{ include "pipeshift.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pipeshift
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "pipeshift.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pipeshift.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does in a namespace it watches, and nothing more (docs/kubernetes.md explains each):
LLMPipelines it reconciles (kopf patches annotations and finalizers on the object, the operator the
status), the AutoscalingPolicies they name (read, and a Valid condition written), the children it owns
(stage Pods, the frontend Deployment and Service, the control-token Secret), the ReplicaSets its frontend
Deployment leaves when removed, the ConfigMap holding a model's config.json, and Events.
*/}}
{{- define "pipeshift.namespacedRules" -}}
- apiGroups: [pipeshift.dev]
  resources: [llmpipelines]
  verbs: [get, list, watch, patch]
- apiGroups: [pipeshift.dev]
  resources: [llmpipelines/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion need this where the OwnerReferencesPermissionEnforcement
# admission plugin is on (OpenShift and hardened clusters).
- apiGroups: [pipeshift.dev]
  resources: [llmpipelines/finalizers]
  verbs: [update]
- apiGroups: [pipeshift.dev]
  resources: [autoscalingpolicies]
  verbs: [get, list, watch]
- apiGroups: [pipeshift.dev]
  resources: [autoscalingpolicies/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [create, get, list, watch, delete, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [list, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/*
Cluster-scoped reads, whatever the namespaces: Nodes (a pool's capacity is the allocatable nvidia.com/gpu
of its nodes). Nothing else: the operator runs kopf with resource scanning off and without peering, so
kopf needs neither CustomResourceDefinitions, Namespaces nor its peering resources.
*/}}
{{- define "pipeshift.clusterRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
{{- end -}}
