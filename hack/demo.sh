#!/usr/bin/env bash
# The demo, as a story: a local control plane, the operator and the fleet's
# node agent; a small Colossus of simulated H100/H200 nodes comes up; a gang
# is admitted and a second job queues; a fatal GPU fault is injected through
# the agent, the node is quarantined and the gang restarts elsewhere; a few
# metrics; and `gpucluster plan` of a scale-up. Everything is left running.
# `hack/demo.sh down` stops all of it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/.local-cluster"
venv="${VENV:-$root/.venv}"
pids="$state/demo.pids"

stop_ours() {
  if [[ -f "$pids" ]]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$pids"
  fi
  rm -f "$pids"
}

if [[ "${1:-}" == "down" ]]; then
  stop_ours
  exec "$root/hack/cluster.sh" down
fi

step=0
say() { step=$((step + 1)); printf '\n\033[1m[%d] %s\033[0m\n' "$step" "$*"; }
# Polls a command until its output is non-empty, printing a dot a second.
wait_for() {
  local what="$1" limit="$2"; shift 2
  local waited=0
  until [[ -n "$("$@" 2>/dev/null)" ]]; do
    if ((waited >= limit)); then echo " gave up waiting for $what after ${limit}s" >&2; return 1; fi
    sleep 1; waited=$((waited + 1)); printf '.'
  done
  printf ' %s (%ds)\n' "$what" "$waited"
}
phase() { kubectl get tj "$1" -o jsonpath='{.status.phase}'; }

say "The local control plane: etcd, kube-apiserver, controller manager, scheduler and KWOK on 127.0.0.1"
if ! "$root/hack/cluster.sh" status >/dev/null 2>&1; then
  "$root/hack/cluster.sh" up >/dev/null
fi
eval "$("$root/hack/cluster.sh" env)"
kubectl version | sed 's/^/    /'
kubectl apply -f "$root/crds/" >/dev/null
kubectl wait --for=condition=Established --timeout=30s crd --all >/dev/null

say "The operator (gpucluster run) and the node agent of every KWOK node (gpucluster agent --fleet)"
stop_ours
"$venv/bin/gpucluster" run --metrics-port 8080 --liveness-port 8081 >"$state/logs/operator.log" 2>&1 &
echo $! >>"$pids"
"$venv/bin/gpucluster" agent --backend fake --fleet --interval 1 --node-selector gpucluster.dev/cluster \
  --metrics-port 9400 >"$state/logs/agent.log" 2>&1 &
echo $! >>"$pids"
echo "    operator log $state/logs/operator.log, metrics http://127.0.0.1:8080/metrics"
echo "    agent log $state/logs/agent.log, DCGM metrics http://127.0.0.1:9400/metrics"

say "A TrainingCluster: 8 H100 and 4 H200 nodes in racks and blocks (examples/colossus.yaml)"
kubectl apply -f "$root/examples/colossus.yaml"
shown=""
for _ in $(seq 120); do
  now="$(kubectl get tc colossus -o jsonpath='{.status.nodes}')"
  [[ -n "$now" && "$now" != "$shown" ]] && echo "    nodes ready/desired: $now" && shown="$now"
  [[ "$(kubectl get tc colossus -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]] && break
  sleep 1
done
kubectl get tc colossus
kubectl get nodes -L nvidia.com/gpu.product,gpucluster.dev/pool,gpucluster.dev/block,gpucluster.dev/rack

say "A gang: llama-pretrain, 4 workers x 8 H100s in one block, admitted all at once"
kubectl apply -f "$root/examples/llama-pretrain.yaml"
wait_for "llama-pretrain Running" 60 bash -c '[[ "$(kubectl get tj llama-pretrain -o jsonpath={.status.phase})" == Running ]] && echo y'
kubectl get tj -o wide

say "A second job that needs 6 of the 8 H100 nodes: it queues behind the running gang"
sed -e 's/name: llama-pretrain/name: mixtral-finetune/' -e 's/workers: 4/workers: 6/' -e 's/priority: 100/priority: 10/' \
    -e '/topology:/,/mode: required/d' "$root/examples/llama-pretrain.yaml" | kubectl apply -f -
wait_for "mixtral-finetune Queued" 30 bash -c '[[ "$(kubectl get tj mixtral-finetune -o jsonpath={.status.queuePosition})" == 1 ]] && echo y'
kubectl get tj -o wide

victim="$(kubectl get tj llama-pretrain -o jsonpath='{.status.nodes[0]}')"
say "A fatal GPU fault (XID 79, fallen off the bus) on $victim, injected through the node agent"
kubectl annotate node "$victim" --overwrite gpucluster.dev/inject-fault='gpu=3,xid=79'
wait_for "$victim quarantined" 30 bash -c "kubectl get node $victim -o jsonpath='{.spec.taints[*].key}' | grep -o nvidia.com/gpu-error"
kubectl get node "$victim" -o custom-columns='NODE:.metadata.name,UNSCHEDULABLE:.spec.unschedulable,GPU-HEALTHY:.status.conditions[?(@.type=="GPUHealthy")].reason'

say "The gang restarts at once on other nodes (a fatal fault gets no grace), avoiding $victim"
wait_for "llama-pretrain restarted" 60 bash -c '[[ "$(kubectl get tj llama-pretrain -o jsonpath={.status.restarts})" -ge 1 && "$(kubectl get tj llama-pretrain -o jsonpath={.status.phase})" == Running ]] && echo y'
kubectl get tj -o wide
kubectl get events --field-selector involvedObject.name=llama-pretrain --sort-by=.lastTimestamp \
  -o custom-columns='REASON:.reason,MESSAGE:.message' | tail -4

say "Metrics: the operator's gpucluster_* and the agent's dcgm-exporter DCGM_FI_DEV_* series"
curl -s http://127.0.0.1:8080/metrics | grep -E '^gpucluster_(pool_gpus|jobs|gang_restarts_total|remediations_total)\{' | head -8
for series in XID_ERRORS GPU_TEMP POWER_USAGE; do
  curl -s http://127.0.0.1:9400/metrics | grep -E "^DCGM_FI_DEV_$series\{.*Hostname=\"$victim\"" | grep 'gpu="3"' \
    || echo "DCGM_FI_DEV_$series: no reading for $victim GPU 3 (it fell off the bus, as a lost GPU reports none)"
done

say "gpucluster plan of a scale-up: 8 -> 12 H100 nodes, before anything is applied"
sed 's/nodes: 8/nodes: 12/' "$root/examples/colossus.yaml" >"$state/colossus-12.yaml"
"$venv/bin/gpucluster" plan -f "$state/colossus-12.yaml" || true

cat <<MSG

Everything is still running. Try:
  eval "\$(hack/cluster.sh env)"
  kubectl apply -f $state/colossus-12.yaml && kubectl get tc -w
  kubectl get tj -o wide; kubectl describe tj llama-pretrain
  kubectl annotate node $victim gpucluster.dev/inject-fault-      # clear the fault
  .venv/bin/gpucluster simulate -f examples/colossus.yaml --generate 500 --png /tmp/sim.png
Stop everything with: hack/demo.sh down
MSG
