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
staging_version="v0.${KUBERNETES_VERSION#v1.}"
work="$CACHE_ROOT/build-$CACHE_KEY"
mkdir -p "$BIN_DIR" "$work"

if [[ ! -x "$BIN_DIR/kube-proxy" ]]; then
  start=$SECONDS
  echo "building kube-proxy $KUBERNETES_VERSION into $BIN_DIR (cold: minutes on 2 cores)" >&2
  # build-kubelet.sh's wrapper module (k8s.io/kubernetes cannot be `go
  # install`ed), in a folder of its own so that neither go.sum is touched.
  mod="$work/kube-proxy"
  mkdir -p "$mod"
  (
    cd "$mod"
    # go.sum is written last: a module folder without one was left half made.
    if [[ ! -f go.sum ]]; then
      printf 'module gpucluster.dev/localkubeproxy\n\ngo 1.24\n' > go.mod
      upstream_mod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
      {
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$upstream_mod" \
          | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
      } >> go.mod
      printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-proxy"\n' > tools.go
      go mod tidy
    fi
    nice -n 10 go build -p 2 -o "$BIN_DIR/kube-proxy" -ldflags="-s -w $(kube_version_ldflags)" \
      k8s.io/kubernetes/cmd/kube-proxy
  )
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
