#!/usr/bin/env bash
# Builds the images the local cluster's real node runs, with no registry and
# no Docker engine, and prints one line per image: "REFERENCE ARCHIVE".
#
#   gpucluster:e2e               the repository's Dockerfile, run by buildah, on
#                                a local base (base-rootfs.sh) passed as its
#                                PYTHON_IMAGE build argument
#   localhost/gpucluster-pause:1 containerd's sandbox image (pause/)
#   localhost/coredns:VERSION    cluster DNS (coredns/, the binary of build-binaries.sh)
#
# Each archive (docker-archive, for `ctr images import`) is cached under
# $CACHE_ROOT/realnode-images, named by a hash of its inputs: a warm run
# builds nothing. Needs root, buildah, debootstrap and gcc (Debian packages).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
source "$HACK_DIR/realnode/versions.env"
here="$HACK_DIR/realnode"
out="$CACHE_ROOT/realnode-images"
mkdir -p "$out"

# Every buildah call of one run shares a storage made for it, deleted at the
# end, in a mount namespace of this script's own: no layer outlives the
# archives, and no mount outlives the script, however it ends.
if [[ -z "${GPUCLUSTER_IN_UNSHARE:-}" ]]; then
  GPUCLUSTER_IN_UNSHARE=1 exec unshare --mount --propagation private -- "$0" "$@"
fi
storage="$(mktemp -d "$out/buildah.XXXXXX")"
trap 'rm -rf "$storage"' EXIT
# vfs: layers are plain folders, no overlay mounts to undo.
buildah_opts=(--root "$storage/root" --runroot "$storage/run" --storage-driver vfs)
bah() { buildah "${buildah_opts[@]}" "$@"; }

hash_files() {  # FILE... (relative to the repository) -> 16 hex digits
  (cd "$REPO_ROOT" && sha256sum "$@" | sha256sum | cut -c1-16)
}

# --- the base: Debian's python3 where python:3.11-slim can't be pulled ----------------
base_key="$(hash_files hack/realnode/base-rootfs.sh hack/realnode/versions.env)"
base_tar="$out/base-$base_key.tar"
base_ref="localhost/gpucluster-python:3.11-$DEBIAN_SUITE"
if [[ ! -f "$base_tar" ]]; then
  start=$SECONDS
  echo "building the base root file system ($DEBIAN_SUITE, debootstrap; about 2 minutes)" >&2
  nice -n 10 "$here/base-rootfs.sh" "$base_tar"
  echo "built the base in $((SECONDS - start)) s" >&2
fi

# --- gpucluster: the Dockerfile as it is --------------------------------------------
# The build context is what .dockerignore lets through.
mapfile -t context < <(cd "$REPO_ROOT" && { echo Dockerfile; echo .dockerignore; echo pyproject.toml; echo README.md;
  find operator -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*'; } | LC_ALL=C sort)
app_key="$(hash_files "${context[@]}" hack/realnode/build-images.sh)-$base_key"
app_tar="$out/gpucluster-$app_key.tar"
app_ref="gpucluster:e2e"
if [[ ! -f "$app_tar" ]]; then
  start=$SECONDS
  echo "building $app_ref from the Dockerfile with buildah (base $base_ref)" >&2
  container="$(bah from scratch)"
  bah add --quiet "$container" "$base_tar" / >/dev/null
  # What python:3.11-slim's own configuration says, where it matters here.
  bah config --env LANG=C.UTF-8 --cmd python3 "$container"
  bah commit --quiet "$container" "$base_ref" >/dev/null
  # The build stage's `pip wheel` reaches the package index through the
  # host's network and trusts what the host trusts (a proxy's CA, where one
  # intercepts TLS): both only for the build's RUN steps, not in the image.
  pip_conf="$storage/pip.conf"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$pip_conf"
  version="$(grep -m1 '^version' "$REPO_ROOT/pyproject.toml" | cut -d'"' -f2)"
  revision="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  # chroot isolation: the RUN steps need no runc, network namespace or cgroup.
  nice -n 10 buildah "${buildah_opts[@]}" bud --isolation chroot --network host --pull=never --quiet \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --volume "$pip_conf:/etc/pip.conf:ro" \
    --build-arg PYTHON_IMAGE="$base_ref" --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --tag "$app_ref" --file "$REPO_ROOT/Dockerfile" "$REPO_ROOT" >&2
  bah push --quiet "$app_ref" "docker-archive:$app_tar.tmp:$app_ref" >&2
  mv "$app_tar.tmp" "$app_tar"
  echo "built $app_ref in $((SECONDS - start)) s" >&2
fi

# --- the sandbox (pause) and CoreDNS: one static binary each --------------------------
build_single() {  # REF TAR CONTAINERFILE_DIR BINARY
  local ref="$1" tar="$2" dir="$3" binary="$4"
  [[ -f "$tar" ]] && return
  local ctx
  ctx="$(mktemp -d "$out/context.XXXXXX")"
  cp "$dir/Containerfile" "$binary" "$ctx/"
  bah bud --isolation chroot --quiet --tag "$ref" --file "$ctx/Containerfile" "$ctx" >&2
  bah push --quiet "$ref" "docker-archive:$tar.tmp:$ref" >&2
  mv "$tar.tmp" "$tar"
  rm -rf "$ctx"
}

pause_ref="localhost/gpucluster-pause:1"
pause_tar="$out/pause-$(hash_files hack/realnode/pause/pause.c hack/realnode/pause/Containerfile).tar"
if [[ ! -f "$pause_tar" ]]; then
  bin="$(mktemp -d "$out/pause.XXXXXX")"
  gcc -static -Os -s -o "$bin/pause" "$here/pause/pause.c"
  build_single "$pause_ref" "$pause_tar" "$here/pause" "$bin/pause"
  rm -rf "$bin"
fi

"$here/build-binaries.sh" >/dev/null
coredns_ref="localhost/coredns:$COREDNS_VERSION"
coredns_tar="$out/coredns-$COREDNS_VERSION-$(hash_files hack/realnode/coredns/Containerfile).tar"
build_single "$coredns_ref" "$coredns_tar" "$here/coredns" "$BIN_DIR/coredns"

echo "$app_ref $app_tar"
echo "$pause_ref $pause_tar"
echo "$coredns_ref $coredns_tar"
