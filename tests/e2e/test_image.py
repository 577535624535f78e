"""The image the real nodes run is the Dockerfile's: hack/realnode/build-images.sh
has buildah run the Dockerfile itself, on a local Debian base in place of
python:3.11-slim. Its user, entrypoint, command, environment and labels are
the Dockerfile's, and its files hold this checkout's package, installed for
the user the chart runs as. (On kind, Docker builds the Dockerfile.)"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
from gpucluster import realnode

from ..integration.harness import REPO_ROOT
from ..packaging.test_dockerfile import instructions
from .conftest import IMAGE, Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def archive(e2e: Cluster) -> Iterator[tarfile.TarFile]:
    if os.environ.get("KIND_CLUSTER"):
        pytest.skip("on kind the image is Docker's build of the Dockerfile")
    # Built already by the cluster's bring-up: this finds it by its inputs' hash.
    with tarfile.open(realnode.build_images()[IMAGE]) as tar:
        yield tar


def config_of(tar: tarfile.TarFile) -> dict[str, Any]:
    manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    # What the chart's `image: gpucluster:e2e` means to containerd.
    assert f"docker.io/library/{IMAGE}" in manifest[0]["RepoTags"]
    return dict(json.load(tar.extractfile(manifest[0]["Config"]))["config"])  # type: ignore[arg-type]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    return steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM"):]


def test_user_entrypoint_and_command_are_the_dockerfiles(archive: tarfile.TarFile) -> None:
    config = config_of(archive)
    stage = dict(final_stage())
    assert config["User"] == stage["USER"]
    assert config["Entrypoint"] == json.loads(stage["ENTRYPOINT"])
    assert config["Cmd"] == json.loads(stage["CMD"])
    env = dict(e.split("=", 1) for e in config["Env"])
    for name, value in re.findall(r"(\w+)=(\S+)", stage["ENV"]):
        assert env[name] == value, name


def test_labels_name_the_version_and_the_local_base(archive: tarfile.TarFile) -> None:
    labels = config_of(archive)["Labels"]
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/gpucluster-python:3.11-")
    for key in re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=", dict(final_stage())["LABEL"]):
        assert labels.get(key), key


def layer_files(tar: tarfile.TarFile) -> set[str]:
    manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    files: set[str] = set()
    for layer in manifest[0]["Layers"]:
        with tarfile.open(fileobj=tar.extractfile(layer)) as inner:
            files.update(m.name.removeprefix("./") for m in inner.getmembers())
    return files


def test_the_files_hold_this_checkouts_package_for_the_charts_user(archive: tarfile.TarFile) -> None:
    files = layer_files(archive)
    site = "usr/local/lib/python3.11/dist-packages/gpucluster/"
    installed = {f.removeprefix(site) for f in files if f.startswith(site) and f.endswith(".py")}
    package = REPO_ROOT / "operator" / "gpucluster"
    source = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    assert installed == source
    assert "usr/local/bin/gpucluster" in files
    # The user the runtime stage adds, in its last layer.
    manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
    with tarfile.open(fileobj=archive.extractfile(manifest[0]["Layers"][-1])) as last:
        passwd = next(m for m in last.getmembers() if m.name.removeprefix("./") == "etc/passwd")
        assert "gpucluster:x:10001:10001:" in last.extractfile(passwd).read().decode()  # type: ignore[union-attr]
