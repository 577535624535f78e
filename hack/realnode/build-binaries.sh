#!/usr/bin/env bash
# Builds, once, what the real node runs besides the kubelet (hack/build-kubelet.sh):
# kube-proxy at $KUBERNETES_VERSION and CoreDNS at $COREDNS_VERSION, from their
# Go modules through the module proxy, into $BIN_DIR beside the control plane's
# binaries. Prints $BIN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
source "$HACK_DIR/realnode/versions.env"

export GOFLAGS="-trimpath -buildvcs=false"
export CGO_ENABLED=0
mkdir -p "$BIN_DIR"

if [[ ! -x "$BIN_DIR/kube-proxy" ]]; then
  start=$SECONDS
  echo "building kube-proxy $KUBERNETES_VERSION into $BIN_DIR (cold: minutes on 2 cores)" >&2
  build_kube_command kube-proxy
  echo "built kube-proxy in $((SECONDS - start)) s" >&2
fi

if [[ ! -x "$BIN_DIR/coredns" || "$(cat "$BIN_DIR/coredns.version" 2>/dev/null)" != "$COREDNS_VERSION" ]]; then
  start=$SECONDS
  echo "building coredns $COREDNS_VERSION into $BIN_DIR (cold: minutes on 2 cores)" >&2
  # Static (CGO_ENABLED=0): the binary is the whole of its image.
  GOBIN="$BIN_DIR" nice -n 10 go install -p 2 -ldflags="-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  echo "$COREDNS_VERSION" > "$BIN_DIR/coredns.version"
  echo "built coredns in $((SECONDS - start)) s" >&2
fi
echo "$BIN_DIR"
