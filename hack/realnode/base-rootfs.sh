#!/usr/bin/env bash
# base-rootfs.sh OUT.tar: the stand-in for python:3.11-slim where no registry
# is reachable. A Debian root file system (debootstrap --variant=minbase) with
# python3, pip and `python`, so the Dockerfile's steps (`pip wheel`, `pip
# install`, groupadd/useradd) run on it unchanged. Runs as root, in a mount
# namespace of its own: debootstrap mounts /proc and /sys inside its target,
# and an interrupted run must not leave them mounted on the host.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"
out="$1"
if [[ -z "${GPUCLUSTER_IN_UNSHARE:-}" ]]; then
  GPUCLUSTER_IN_UNSHARE=1 exec unshare --mount --propagation private -- "$0" "$@"
fi

target="$(mktemp -d "${out}.rootfs.XXXXXX")"
trap 'rm -rf "$target"' EXIT
# The .debs are kept beside the archive: a rebuild downloads nothing again.
debs="$(dirname "$out")/debs"
mkdir -p "$debs"
debootstrap --variant=minbase --cache-dir="$debs" \
  --include=python3,python3-pip,python-is-python3,ca-certificates \
  "$DEBIAN_SUITE" "$target" "$DEBIAN_MIRROR" >"${out}.log" 2>&1 \
  || { tail -20 "${out}.log" >&2; exit 1; }
# python:3.11-slim's pip installs into the image's Python; Debian marks its
# Python externally managed (PEP 668), which the Dockerfile's plain
# `pip install` would refuse. The rest is what slim images leave out.
rm -f "$target"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$target"/var/lib/apt/lists/* "$target"/var/cache/apt/* "$target"/var/log/* \
  "$target"/usr/share/doc/* "$target"/usr/share/man/* "$target"/usr/share/locale/*
tar --numeric-owner -C "$target" -cf "$out.tmp" .
mv "$out.tmp" "$out"
