#!/usr/bin/env bash
# Builds, once, Kueue ($KUEUE_VERSION, the peer bench/compare.py measures
# gpucluster against) from its Go module into $BIN_DIR, and keeps the CRDs and
# webhook manifests of that same module in $KUEUE_DIR, so the binary and its
# objects always match. Prints $BIN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$BIN_DIR"
if [[ ! -x "$BIN_DIR/kueue" ]]; then
  start=$SECONDS
  echo "building kueue $KUEUE_VERSION into $BIN_DIR (cold build: about 20 minutes on 2 cores)" >&2
  export GOFLAGS="-trimpath -buildvcs=false"
  export CGO_ENABLED=0
  # Kueue's own Makefile stamps the version; unstamped it reports
  # v0.0.0-main, and a comparison must say which Kueue ran (later v0.17
  # patches change how fast topology-aware scheduling is).
  GOBIN="$BIN_DIR" nice -n 10 go install -p 2 \
    -ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  echo "built kueue in $((SECONDS - start)) s" >&2
fi
if [[ ! -f "$KUEUE_DIR/webhook/manifests.yaml" ]]; then
  mod="$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  rm -rf "$KUEUE_DIR"
  mkdir -p "$KUEUE_DIR/crd" "$KUEUE_DIR/webhook"
  cp "$mod"/config/components/crd/bases/kueue.x-k8s.io_*.yaml "$KUEUE_DIR/crd/"
  cp "$mod/config/components/webhook/manifests.yaml" "$KUEUE_DIR/webhook/"
  # Copies out of the module cache are read-only like it.
  chmod -R u+w "$KUEUE_DIR"
fi
echo "$BIN_DIR"
