"""The locally built binaries say which Kubernetes they are: Kueue, Helm's
kubeVersion checks and `kubectl version` parse the version the API server
reports, and an unstamped build reports v0.0.0-master."""

from __future__ import annotations

import json
import subprocess

import pytest
from gpucluster.devcluster import REPO_ROOT

from .harness import Kubectl

pytestmark = pytest.mark.integration


def pinned_kubernetes_version() -> str:
    return subprocess.run(["bash", "-c", f"source {REPO_ROOT / 'hack' / 'lib.sh'} && echo $KUBERNETES_VERSION"],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_kubectl_and_api_server_report_the_pinned_version(kubectl: Kubectl) -> None:
    versions = json.loads(kubectl.run("version", "-o", "json").stdout)
    pinned = pinned_kubernetes_version()
    assert versions["clientVersion"]["gitVersion"] == pinned
    assert versions["serverVersion"]["gitVersion"] == pinned
    assert versions["serverVersion"]["minor"] == pinned.split(".")[1]
