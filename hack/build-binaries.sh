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

needs() { for b in "$@"; do [[ " ${missing[*]} " == *" $b "* ]] && return 0; done; return 1; }

# Progress: which step of how many, and within a step the packages `go`
# compiles (-v names each) against those its dry run (-n) plans to compile,
# so a half-warm cache counts only the work left. tqdm draws the bar, the
# elapsed time and the estimate; it comes from the project's virtualenv
# (`make .venv/bin/gpucluster`) when there is one.
steps=0
if needs etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  [[ -f "$work/kubernetes/go.mod" ]] || steps=$((steps + 1))
  steps=$((steps + 2))
fi
needs kwok && steps=$((steps + 1))
needs helm && steps=$((steps + 1))
step=0
python="${VENV:-$REPO_ROOT/.venv}/bin/python"
[[ -x "$python" ]] || python=python3
"$python" -c 'import tqdm' 2>/dev/null || python=""
# Where stderr is no terminal (CI logs, a test's capture) each redraw would
# be kept: one every 30 s there.
mininterval=0.5
[[ -t 2 ]] || mininterval=30

announce() {
  step=$((step + 1))
  printf '[%d/%d] %s (%d s so far)\n' "$step" "$steps" "$1" "$((SECONDS - start))" >&2
}

# progress TOTAL WHAT: `go -v`'s package lines in, passed on to stdout,
# progress on stderr.
progress() {
  if [[ -n "$python" ]]; then
    "$python" -m tqdm --total "$1" --unit pkg --desc "  $2" --mininterval "$mininterval" --ncols 100
  else
    awk -v total="$1" '{ print } NR % 100 == 0 { printf "  %d/%d packages\n", NR, total > "/dev/stderr" }'
  fi
}

# go_step WHAT GO-SUBCOMMAND ARGS...: `go GO-SUBCOMMAND ARGS` with progress;
# its output goes to a log, shown when it fails.
go_step() {
  local what="$1" cmd="$2"; shift 2
  local log="$work/$cmd-${what%%,*}.log" total
  announce "$what"
  total="$(go "$cmd" -n "$@" 2>&1 | grep -c '/compile -o ' || true)"
  if ! go "$cmd" -v "$@" 2>&1 | progress "$total" "${what%%,*}" >"$log"; then
    echo "error: building $what failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

build_kubernetes() {
  # k8s.io/kubernetes replaces its staging modules with local paths, so it
  # cannot be `go install`ed; a wrapper module pins each staging module to the
  # matching v0.X.Y tag instead.
  local mod="$work/kubernetes"
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$mod"
  cd "$mod"
  if [[ ! -f go.mod ]]; then
    announce "Kubernetes modules: resolving"
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
  go_step "kube-apiserver, kube-controller-manager, kube-scheduler, kubectl" build \
    -p 2 -ldflags="$ldflags $(kube_version_ldflags)" -o "$BIN_DIR/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  go_step etcd build -p 2 -ldflags="$ldflags" -o "$BIN_DIR/etcd" go.etcd.io/etcd/server/v3
}

if needs etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  build_kubernetes
fi
if needs kwok; then
  GOBIN="$BIN_DIR" go_step kwok install -ldflags="$ldflags" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if needs helm; then
  GOBIN="$BIN_DIR" go_step helm install -ldflags="$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo "cold build of ${missing[*]} took $((SECONDS - start)) s" >&2
