#!/usr/bin/env bash
# Builds kind (https://kind.sigs.k8s.io) once from its Go module, through the
# module proxy, and prints the binary's path. Only hosts with a Docker engine
# can run it (hack/kind-e2e.sh); the local control plane does not need it.
#
# The version is pinned here until hack/versions.env carries KIND_VERSION (a
# line there would also move kind into the versions' cache key). v0.30.0's
# default node image is kindest/node:v1.34.0, the Kubernetes minor the local
# control plane runs, so both paths test against the same API server.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KIND_VERSION="${KIND_VERSION:-v0.30.0}"
kind_bin="$CACHE_ROOT/kind-$KIND_VERSION/bin"
if [[ ! -x "$kind_bin/kind" ]]; then
  start=$SECONDS
  mkdir -p "$kind_bin"
  GOFLAGS="-trimpath -buildvcs=false" CGO_ENABLED=0 GOBIN="$kind_bin" \
    go install -ldflags="-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  echo "built kind $KIND_VERSION in $((SECONDS - start)) s" >&2
fi
echo "$kind_bin/kind"
