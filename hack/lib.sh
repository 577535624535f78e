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
