#!/usr/bin/env bash
# The demo: a local control plane, the operator, and a small Colossus of
# simulated H100/H200 nodes. `hack/demo.sh down` stops all of it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/.local-cluster"
venv="${VENV:-$root/.venv}"
operator_pid="$state/operator.pid"

stop_operator() {
  if [[ -f "$operator_pid" ]] && kill -0 "$(cat "$operator_pid")" 2>/dev/null; then
    kill "$(cat "$operator_pid")"
  fi
  rm -f "$operator_pid"
}

if [[ "${1:-}" == "down" ]]; then
  stop_operator
  exec "$root/hack/cluster.sh" down
fi

if ! "$root/hack/cluster.sh" status >/dev/null 2>&1; then
  "$root/hack/cluster.sh" up >/dev/null
fi
eval "$("$root/hack/cluster.sh" env)"
kubectl apply -f "$root/crds/"
kubectl wait --for=condition=Established --timeout=30s crd --all >/dev/null

stop_operator
"$venv/bin/gpucluster" run --metrics-port 8080 --liveness-port 8081 \
  >"$state/logs/operator.log" 2>&1 &
echo $! >"$operator_pid"
echo "operator running (pid $(cat "$operator_pid"), log $state/logs/operator.log, metrics http://127.0.0.1:8080/metrics)"

kubectl apply -f "$root/examples/colossus.yaml"
kubectl wait --for=condition=Ready --timeout=60s trainingcluster/colossus
echo
kubectl get trainingclusters
echo
kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count,gpucluster.dev/pool,gpucluster.dev/block,gpucluster.dev/rack
echo
cat <<MSG
The cluster is still up. Try:
  eval "\$(hack/cluster.sh env)"
  kubectl patch tc colossus --type=json -p '[{"op":"replace","path":"/spec/pools/0/nodes","value":16}]'
  kubectl get tc -w
Stop everything with: hack/demo.sh down
MSG
