"""The cluster the end-to-end tests run on: the Helm chart installed from the
image built from the Dockerfile, its pods running in real containers.

- kind, where a Docker engine is: hack/kind-e2e.sh creates the cluster,
  installs the chart, and runs these tests with KIND_CLUSTER and KUBECONFIG
  set.
- Elsewhere, the local control plane with real nodes (gpucluster.realnode:
  containerd, a kubelet and kube-proxy each, CoreDNS in a pod). The tests
  start it in .local-cluster/e2e, install the chart with
  helm/gpucluster/ci/realnode-values.yaml, and stop it all once the last
  test of this folder is done. Two nodes: a gang restart avoids the node a
  rank failed on, so the restart tests need a second one. Where the machine
  can't run them (not root, packages missing) the tests skip, saying what
  is missing; under CI=true they fail instead (.ci/run installs it all).
- GPUCLUSTER_E2E_KUBECONFIG=... runs them on a cluster already up with the
  chart installed (`hack/cluster.sh up --real-nodes 2`, then the README's
  Helm commands), and leaves it running.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gpucluster import devcluster, realnode

from ..integration.harness import REPO_ROOT, Kubectl

E2E_STATE_DIR = REPO_ROOT / ".local-cluster" / "e2e"
NAMESPACE = os.environ.get("GPUCLUSTER_E2E_NAMESPACE", "gpucluster-system")
IMAGE = os.environ.get("GPUCLUSTER_E2E_IMAGE", "gpucluster:e2e")
REAL_NODES = 2
CHART = REPO_ROOT / "helm" / "gpucluster"

# How long the bring-up and a job took, for the summary at the end.
timings: dict[str, float] = {}


@dataclass
class Cluster:
    kubectl: Kubectl
    namespace: str
    image: str
    # A nodeSelector that keeps a test's own pods on nodes that run them
    # (a KWOK node would only pretend to).
    node_selector: dict[str, str] = field(default_factory=dict)

    def gpu_nodes(self) -> list[dict[str, Any]]:
        """The nodes GPU feature discovery would label as GPU nodes, by name."""
        selector = ",".join(f"{k}={v}" for k, v in {"nvidia.com/gpu.present": "true", **self.node_selector}.items())
        return sorted(self.kubectl.get("nodes", "-l", selector)["items"], key=lambda n: n["metadata"]["name"])


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true: .ci/run installs what the real nodes need")
    pytest.skip(reason)


def _helm_install(cluster: devcluster.ClusterState) -> None:
    helm = Path(cluster.bin_dir) / "helm"
    started = time.monotonic()
    result = subprocess.run([
        str(helm), "upgrade", "--install", "gpucluster", str(CHART), "--kubeconfig", cluster.kubeconfig,
        "--namespace", NAMESPACE, "--create-namespace", "--values", str(CHART / "ci" / "realnode-values.yaml"),
        "--wait", "--timeout", "10m"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"helm install failed:\n{result.stdout}\n{result.stderr}"
    timings["chart installed, every pod Ready"] = time.monotonic() - started


@pytest.fixture(scope="package")
def e2e() -> Iterator[Cluster]:
    if os.environ.get("KIND_CLUSTER"):
        kubectl = Kubectl(os.environ["KUBECONFIG"], str(devcluster.bin_dir()))
        yield Cluster(kubectl, NAMESPACE, IMAGE)
        return
    external = os.environ.get("GPUCLUSTER_E2E_KUBECONFIG")
    if external:
        yield Cluster(Kubectl(external, str(devcluster.bin_dir())), NAMESPACE, IMAGE,
                      {realnode.LABEL_REAL_NODE: "true"})
        return
    missing = realnode.missing_prerequisites()
    if missing:
        _unavailable("this machine can't run a real node: it lacks " + "; ".join(missing))
    realnode.stop(E2E_STATE_DIR)
    devcluster.down(E2E_STATE_DIR)
    cluster = devcluster.up(E2E_STATE_DIR)
    try:
        started = time.monotonic()
        realnode.build_images()
        timings["images built (nothing to do when their inputs are unchanged)"] = time.monotonic() - started
        started = time.monotonic()
        realnode.start(cluster, REAL_NODES)
        timings[f"{REAL_NODES} real nodes up, images imported, CoreDNS available"] = time.monotonic() - started
        _helm_install(cluster)
        (E2E_STATE_DIR / "timings.json").write_text(json.dumps(timings, indent=2))
        yield Cluster(Kubectl(cluster.kubeconfig, cluster.bin_dir), NAMESPACE, IMAGE,
                      {realnode.LABEL_REAL_NODE: "true"})
    finally:
        realnode.stop(E2E_STATE_DIR)
        devcluster.down(E2E_STATE_DIR)
    # `down` leaves nothing of the nodes on a machine others share.
    assert realnode.leftovers(E2E_STATE_DIR) == []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The first test also waits for the bring-up: a cold image build alone
    # (debootstrap, pip) took 10 to 30 minutes on a loaded 2-core machine.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.timeout(3600))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, seconds in timings.items():
        terminalreporter.write_line(f"e2e: {what} in {seconds:.0f} s")
