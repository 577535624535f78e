#!/usr/bin/env bash
# End-to-end tests on kind, for hosts with a Docker engine (a laptop, a CI
# runner with Docker; not the project's build machines, which have none):
#
#   hack/kind-e2e.sh            build the image, create a kind cluster, load
#                               the image, install the chart with the fake GPU
#                               device plugin and the agent's fake backend,
#                               run `pytest -m e2e tests/e2e`, delete the cluster
#   KEEP_CLUSTER=1 hack/kind-e2e.sh   ... and leave the cluster up afterwards
#
# Environment: KIND_CLUSTER (default gpucluster-e2e), KIND_VERSION (see
# hack/build-kind.sh), VENV (default .venv, with `pip install -e '.[dev]'`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KIND_CLUSTER="${KIND_CLUSTER:-gpucluster-e2e}"
IMAGE="gpucluster:e2e"  # ci/kind-values.yaml runs this tag, never pulled
NAMESPACE="gpucluster-system"
VENV="${VENV:-$REPO_ROOT/.venv}"
start=$SECONDS

if ! docker info >/dev/null 2>&1; then
  echo "hack/kind-e2e.sh needs a running Docker engine (docker info failed)" >&2
  exit 2
fi

"$HACK_DIR/build-binaries.sh"  # kubectl and helm, pinned in versions.env
kind="$("$HACK_DIR/build-kind.sh")"
export PATH="$BIN_DIR:$PATH"

echo "--- building $IMAGE" >&2
docker build --tag "$IMAGE" \
  --build-arg VERSION="$(grep -m1 '^version' "$REPO_ROOT/pyproject.toml" | cut -d'"' -f2)" \
  --build-arg REVISION="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$REPO_ROOT"

kubeconfig="$(mktemp)"
cleanup() {
  rm -f "$kubeconfig"
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then
    "$kind" delete cluster --name "$KIND_CLUSTER" >/dev/null 2>&1 || true
  else
    echo "kept: $kind get kubeconfig --name $KIND_CLUSTER" >&2
  fi
}
trap cleanup EXIT

if ! "$kind" get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
  echo "--- creating kind cluster $KIND_CLUSTER" >&2
  # The worker carries GPU feature discovery's labels, as a GPU node would:
  # the agent DaemonSet selects nvidia.com/gpu.present=true.
  "$kind" create cluster --name "$KIND_CLUSTER" --wait 180s --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
  labels:
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    nvidia.com/gpu.count: "8"
KIND
fi
"$kind" get kubeconfig --name "$KIND_CLUSTER" >"$kubeconfig"
export KUBECONFIG="$kubeconfig"

echo "--- loading $IMAGE into $KIND_CLUSTER" >&2
"$kind" load docker-image "$IMAGE" --name "$KIND_CLUSTER"

echo "--- installing the chart" >&2
helm upgrade --install gpucluster "$REPO_ROOT/helm/gpucluster" \
  --namespace "$NAMESPACE" --create-namespace \
  --values "$REPO_ROOT/helm/gpucluster/ci/kind-values.yaml" \
  --wait --timeout 5m

echo "--- pytest -m e2e tests/e2e" >&2
KIND_CLUSTER="$KIND_CLUSTER" GPUCLUSTER_E2E_NAMESPACE="$NAMESPACE" GPUCLUSTER_E2E_IMAGE="$IMAGE" \
  "$VENV/bin/pytest" -m e2e "$REPO_ROOT/tests/e2e" -v
echo "kind e2e took $((SECONDS - start)) s" >&2
