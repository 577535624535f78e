# Shared paths for the hack/ scripts; sourced, not run.
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"
CACHE_KEY="$(grep -v '^#' "$HACK_DIR/versions.env" | sha256sum | cut -c1-12)"
CACHE_ROOT="${GPUCLUSTER_CACHE:-$HOME/.cache/gpucluster}"
BIN_DIR="$CACHE_ROOT/$KUBERNETES_VERSION-$CACHE_KEY/bin"
# Kueue's CRDs and webhook manifests (crd/, webhook/), copied from the
# module its binary in $BIN_DIR was built from (hack/build-kueue.sh).
KUEUE_DIR="$CACHE_ROOT/$KUBERNETES_VERSION-$CACHE_KEY/kueue-$KUEUE_VERSION"
# Version stamp for every Kubernetes binary built here, as upstream's
# hack/lib/version.sh sets it: without it the API server reports
# v0.0.0-master+$Format:%H$, which Kueue, `kubectl version` and Helm's
# kubeVersion checks cannot parse.
kube_version_ldflags() {
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local flags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}
# Builds k8s.io/kubernetes/cmd/$1 at $KUBERNETES_VERSION into $BIN_DIR. The
# repository replaces its staging modules with local paths, so it cannot be
# `go install`ed: a wrapper module of the command's own (in the build cache)
# pins each staging module to its v0.X.Y tag instead. build-binaries.sh does
# the same for the control plane's commands, in one module with etcd's.
build_kube_command() {
  local name="$1" mod="$CACHE_ROOT/build-$CACHE_KEY/$1"
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$mod" "$BIN_DIR"
  (
    cd "$mod"
    # go.sum is written last: a module folder without one was left half made.
    if [[ ! -f go.sum ]]; then
      printf 'module gpucluster.dev/local-%s\n\ngo 1.24\n' "$name" > go.mod
      local upstream_mod
      upstream_mod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
      {
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$upstream_mod" \
          | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
      } >> go.mod
      printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/%s"\n' "$name" > tools.go
      go mod tidy
    fi
    CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" nice -n 10 go build -p 2 -o "$BIN_DIR/$name" \
      -ldflags="-s -w $(kube_version_ldflags)" "k8s.io/kubernetes/cmd/$name"
  )
}
