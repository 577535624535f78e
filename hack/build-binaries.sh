#!/usr/bin/env bash
# Builds, once, every upstream binary the local cluster needs, from Go modules
# through the module proxy, into $BIN_DIR (keyed by hack/versions.env).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

wanted=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)
missing=()
for b in "${wanted[@]}"; do [[ -x "$BIN_DIR/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

mkdir -p "$BIN_DIR"
start=$SECONDS
work="$CACHE_ROOT/build-$CACHE_KEY"
mkdir -p "$work"
export GOFLAGS="-trimpath -buildvcs=false"
export CGO_ENABLED=0
ldflags="-s -w"
echo "building ${missing[*]} into $BIN_DIR (cold build: several minutes on 2 cores)" >&2

build_kubernetes() {
  # k8s.io/kubernetes replaces its staging modules with local paths, so it
  # cannot be `go install`ed; a wrapper module pins each staging module to the
  # matching v0.X.Y tag instead.
  local mod="$work/kubernetes"
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$mod"
  cd "$mod"
  if [[ ! -f go.mod ]]; then
    cat > go.mod <<GOMOD
module gpucluster.dev/localcluster

go 1.24
GOMOD
    local upstream_mod
    upstream_mod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
    {
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$upstream_mod" \
        | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
    } >> go.mod
    cat > tools.go <<'GOSRC'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GOSRC
    go mod tidy -e >/dev/null 2>&1 || true
    # etcd's server module is only a test dependency of k8s.io/apiserver, so it
    # is required explicitly at the version Kubernetes itself resolves.
    go get "go.etcd.io/etcd/server/v3@$(go list -m -f '{{.Version}}' go.etcd.io/etcd/client/v3)"
    go mod tidy
  fi
  go build -p 2 -ldflags="$ldflags $(kube_version_ldflags)" -o "$BIN_DIR/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  go build -p 2 -ldflags="$ldflags" -o "$BIN_DIR/etcd" go.etcd.io/etcd/server/v3
}

needs() { for b in "$@"; do [[ " ${missing[*]} " == *" $b "* ]] && return 0; done; return 1; }

if needs etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  build_kubernetes
fi
if needs kwok; then
  GOBIN="$BIN_DIR" go install -ldflags="$ldflags" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if needs helm; then
  GOBIN="$BIN_DIR" go install -ldflags="$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo "cold build of ${missing[*]} took $((SECONDS - start)) s" >&2
