#!/usr/bin/env bash
# Builds, once, Karpenter's KWOK provider (sigs.k8s.io/karpenter/kwok at
# $KARPENTER_VERSION) into $BIN_DIR/karpenter-kwok, and copies its CRDs
# (NodePool, NodeClaim, KWOKNodeClass) into $BIN_DIR/../karpenter-crds.
# tests/integration/test_karpenter.py runs it against the local cluster.
# Its binary is also named `kwok`: it is installed into a scratch GOBIN and
# renamed, so KWOK's own `kwok` in $BIN_DIR is never overwritten. Prints
# $BIN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

crd_dir="$CACHE_ROOT/$KUBERNETES_VERSION-$CACHE_KEY/karpenter-crds"
if [[ -x "$BIN_DIR/karpenter-kwok" && -f "$crd_dir/karpenter.sh_nodepools.yaml" ]]; then
  echo "$BIN_DIR"
  exit 0
fi

export GOFLAGS="-trimpath -buildvcs=false"
export CGO_ENABLED=0
mkdir -p "$BIN_DIR"
start=$SECONDS
echo "building Karpenter's KWOK provider $KARPENTER_VERSION into $BIN_DIR (cold build: many minutes on 2 cores)" >&2
gobin="$(mktemp -d)"
trap 'rm -rf "$gobin"' EXIT
GOBIN="$gobin" nice -n 10 go install -p 2 -ldflags="-s -w" "sigs.k8s.io/karpenter/kwok@$KARPENTER_VERSION"
mv "$gobin/kwok" "$BIN_DIR/karpenter-kwok"

# The module is in the module cache after the install; its CRDs travel with it.
module_dir="$(go mod download -json "sigs.k8s.io/karpenter@$KARPENTER_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
rm -rf "$crd_dir"
mkdir -p "$crd_dir"
cp "$module_dir"/kwok/charts/crds/*.yaml "$module_dir"/kwok/apis/crds/*.yaml "$crd_dir/"
chmod u+w "$crd_dir"/*.yaml
echo "built karpenter-kwok in $((SECONDS - start)) s" >&2
echo "$BIN_DIR"
