"""The session's Kubernetes cluster: a real control plane with KWOK nodes.

By default the fixture starts one (hack/cluster.sh's machinery, in a state
folder of its own) and stops it at the end. Set GPUCLUSTER_KUBECONFIG to run
against a cluster that is already up instead (it is left running).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpucluster import devcluster

from .harness import REPO_ROOT, AgentProcess, Kubectl, OperatorProcess, wait_for

TEST_STATE_DIR = REPO_ROOT / ".local-cluster" / "test"
TEST_KWOK_SHARDS = 2


@pytest.fixture(scope="session")
def cluster() -> Iterator[devcluster.ClusterState]:
    external = os.environ.get("GPUCLUSTER_KUBECONFIG")
    if external:
        yield devcluster.ClusterState(state_dir=str(Path(external).parent),
                                      bin_dir=str(devcluster.bin_dir()))
        return
    # A session stopped with SIGTERM unwinds through this fixture's finally.
    devcluster.interrupt_on_sigterm()
    devcluster.down(TEST_STATE_DIR)
    # Two KWOK controllers, as a large simulated cluster runs them: every test
    # then also checks that each node has one that keeps it.
    state = devcluster.up(TEST_STATE_DIR, kwok_shards=TEST_KWOK_SHARDS)
    try:
        yield state
    finally:
        devcluster.down(TEST_STATE_DIR)


@pytest.fixture(scope="session")
def kubeconfig(cluster: devcluster.ClusterState) -> str:
    return os.environ.get("GPUCLUSTER_KUBECONFIG") or cluster.kubeconfig


@pytest.fixture(scope="session")
def kubectl(cluster: devcluster.ClusterState, kubeconfig: str) -> Kubectl:
    return Kubectl(kubeconfig, cluster.bin_dir)


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(REPO_ROOT / "crds"))
    kubectl.run("wait", "--for=condition=Established", "--timeout=30s", "crd", "--all")


@pytest.fixture(scope="session")
def operator(crds: None, kubeconfig: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[OperatorProcess]:
    """One operator for the session; tests that kill it start it again."""
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    wait_for(lambda: "authentication has finished" in operator.log_path.read_text(),
             timeout=30, what=f"the operator to log in; log: {operator.log_path}")
    return operator


@pytest.fixture(scope="session")
def fleet_agent(crds: None, kubeconfig: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One fleet agent plays the node agent of every KWOK GPU node of the
    TrainingClusters (fake GPUs, faults from the inject-fault annotation)."""
    agent = AgentProcess(kubeconfig, tmp_path_factory.mktemp("agent"))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
