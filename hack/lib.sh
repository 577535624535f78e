# Shared paths for the hack/ scripts; sourced, not run.
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"
CACHE_KEY="$(grep -v '^#' "$HACK_DIR/versions.env" | sha256sum | cut -c1-12)"
CACHE_ROOT="${GPUCLUSTER_CACHE:-$HOME/.cache/gpucluster}"
BIN_DIR="$CACHE_ROOT/$KUBERNETES_VERSION-$CACHE_KEY/bin"
