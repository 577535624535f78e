#!/usr/bin/env bash
# The local control plane: hack/cluster.sh up|down|status|env|build [--state-dir DIR]
# `up` builds the pinned binaries once (cached under ~/.cache/gpucluster/), then
# starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK
# on 127.0.0.1 and prints the KUBECONFIG to use. Logs: .local-cluster/logs/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$root/operator${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m gpucluster.devcluster "$@"
