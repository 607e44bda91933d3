#!/usr/bin/env bash
# make e2e-kind: the pinned-pipeline scenario on a kind cluster, for machines with a Docker engine.
#
# It builds the two images (docker/*.Dockerfile), creates a kind cluster with two worker nodes labelled
# as the two GPU pools of examples/llmpipeline-pinned.yaml, advertises fake `nvidia.com/gpu` capacity
# on them (kind nodes have no GPUs; the agents run on CPU), loads the images, installs the chart,
# applies the example with a generated model copied into the nodes, and sends one completion.
# The CPU-only CI machines have no Docker engine, so this never runs there: `make e2e` (a real
# API server, scheduler and controllers with a process kubelet) is what the test suite runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: '$tool' is not on PATH" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e-kind: no Docker engine answers ('docker info' failed)" >&2; exit 2; }

cluster=${PIPESHIFT_KIND_CLUSTER:-pipeshift-e2e}
tag=e2e
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${KEEP_CLUSTER:-}" ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true' EXIT

echo "== images"
docker build -q -f docker/operator.Dockerfile -t "ghcr.io/pipeshift/operator:$tag" .
docker build -q -f docker/runtime.Dockerfile -t "ghcr.io/pipeshift/runtime:$tag" .

echo "== model"
.venv/bin/pipeshift make-model "$work/models/tiny" --layers 4 --hidden 64 --heads 4 --kv-heads 2 \
  --intermediate 128 --vocab 512 --seed 0 >/dev/null

echo "== cluster"
cat >"$work/kind.yaml" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {pipeshift.dev/pool: a100}
    extraMounts: [{hostPath: $work/models, containerPath: /models, readOnly: true}]
  - role: worker
    labels: {pipeshift.dev/pool: l40s}
    extraMounts: [{hostPath: $work/models, containerPath: /models, readOnly: true}]
YAML
kind create cluster --name "$cluster" --config "$work/kind.yaml" --wait 120s
kind load docker-image --name "$cluster" "ghcr.io/pipeshift/operator:$tag" "ghcr.io/pipeshift/runtime:$tag"

# Fake GPUs: the status subresource takes extended resources the way a device plugin would report them.
kubectl proxy --port=0 >"$work/proxy.log" 2>&1 &
proxy=$!
for _ in $(seq 50); do grep -q "Starting to serve" "$work/proxy.log" && break; sleep 0.1; done
port=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$work/proxy.log")
for node in $(kubectl get nodes -l pipeshift.dev/pool -o name); do
  curl -fsS -X PATCH -H 'Content-Type: application/json-patch+json' \
    --data '[{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "4"}]' \
    "http://127.0.0.1:$port/api/v1/nodes/${node#node/}/status" >/dev/null
done
kill "$proxy"

echo "== chart"
helm install pipeshift helm/pipeshift --wait --timeout 180s --set image.tag="$tag" --set image.pullPolicy=Never

echo "== pipeline"
sed "s#ghcr.io/pipeshift/runtime:0.1.0#ghcr.io/pipeshift/runtime:$tag#" examples/llmpipeline-pinned.yaml \
  | kubectl apply -f -
kubectl wait llmpipeline/tiny-pinned --for=condition=Ready --timeout=300s
kubectl get llmpipeline tiny-pinned

# kind has kube-proxy and DNS, so the client goes through the frontend's Service.
kubectl run e2e-client --rm -i --restart=Never --image=curlimages/curl -- \
  curl -fsS "http://tiny-pinned-frontend:8000/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny-pinned", "prompt": "hello", "max_tokens": 8}'

echo "== cleanup"
kubectl delete llmpipeline tiny-pinned --wait --timeout=120s
test -z "$(kubectl get pods -l pipeshift.dev/pipeline=tiny-pinned -o name)"
echo "e2e-kind: passed"
