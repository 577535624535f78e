#!/usr/bin/env bash
# Builds, once, a real kubelet (k8s.io/kubernetes/cmd/kubelet at
# $KUBERNETES_VERSION) and hack/fakecri (the upstream fake CRI runtime on a
# unix socket) into $BIN_DIR, next to the control plane's binaries. With them
# tests/integration/test_device_plugin_kubelet.py runs `gpucluster
# device-plugin` against the kubelet's real device manager on a machine with
# no container runtime. Prints $BIN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export GOFLAGS="-trimpath -buildvcs=false"
export CGO_ENABLED=0
staging_version="v0.${KUBERNETES_VERSION#v1.}"
work="$CACHE_ROOT/build-$CACHE_KEY"
mkdir -p "$BIN_DIR" "$work"

if [[ ! -x "$BIN_DIR/kubelet" ]]; then
  start=$SECONDS
  echo "building kubelet $KUBERNETES_VERSION into $BIN_DIR (cold build: several minutes on 2 cores)" >&2
  build_kube_command kubelet
  echo "built kubelet in $((SECONDS - start)) s" >&2
fi

# fakecri is rebuilt when its source changes (a second or two once warm); its
# CRI modules follow $KUBERNETES_VERSION, whatever hack/fakecri/go.mod pins.
src="$HACK_DIR/fakecri"
src_sum="$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-16)-$staging_version"
if [[ ! -x "$BIN_DIR/fakecri" || "$(cat "$BIN_DIR/fakecri.src" 2>/dev/null)" != "$src_sum" ]]; then
  start=$SECONDS
  rm -rf "$work/fakecri"
  cp -r "$src" "$work/fakecri"
  (
    cd "$work/fakecri"
    go get "k8s.io/cri-client@$staging_version" "k8s.io/cri-api@$staging_version"
    nice -n 10 go build -p 2 -ldflags="-s -w" -o "$BIN_DIR/fakecri" .
  )
  echo "$src_sum" > "$BIN_DIR/fakecri.src"
  echo "built fakecri in $((SECONDS - start)) s" >&2
fi
echo "$BIN_DIR"
