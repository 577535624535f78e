"""Node writes that replace a list whole (taints) against the real API
server: a taint someone adds between the operator's read and its write must
survive."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from gpucluster.kube import client, nodes

from .harness import Kubectl

pytestmark = pytest.mark.integration


def taint_keys(node: Mapping[str, Any]) -> set[str]:
    """The node's taints but those the node controller keeps in step with
    spec.unschedulable and the node's conditions."""
    return {t["key"] for t in node["spec"].get("taints") or []
            if not t["key"].startswith("node.kubernetes.io/")}


@pytest.fixture
def in_process_client(kubeconfig: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The operator's own client, pointed at the session's cluster."""
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    for cached in (client.api_client, client.core, client.custom):
        cached.cache_clear()
    yield
    for cached in (client.api_client, client.core, client.custom):
        cached.cache_clear()


@pytest.fixture
def bare_node(kubectl: Kubectl) -> Iterator[str]:
    name = f"node-writes-{uuid.uuid4().hex[:6]}"
    kubectl.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                   "spec": {"taints": [{"key": "site/maintenance", "effect": "NoSchedule"}]}})
    yield name
    kubectl.run("delete", "node", name, "--ignore-not-found")


def test_a_taint_added_between_read_and_write_is_kept(
        in_process_client: None, bare_node: str, kubectl: Kubectl) -> None:
    reads = 0

    def quarantine_racing_a_writer(node: Mapping[str, Any]) -> dict[str, Any]:
        nonlocal reads
        reads += 1
        if reads == 1:
            # Someone else writes the node after our read, before our patch.
            kubectl.run("taint", "node", bare_node, "site/late=1:NoSchedule")
        taints = [t for t in node["spec"].get("taints") or [] if t["key"] != "nvidia.com/gpu-error"]
        return {"spec": {"unschedulable": True, "taints": [*taints, nodes.QUARANTINE_TAINT]}}

    asyncio.run(nodes._patch_read_node(bare_node, quarantine_racing_a_writer))

    # The first write met a conflict and was made again on a fresh read. The
    # node controller also writes a kubelet-less node (its not-ready taints),
    # so the second write may meet a conflict of its own.
    assert reads >= 2
    assert taint_keys(kubectl.get("node", bare_node)) == {"site/maintenance", "site/late", "nvidia.com/gpu-error"}


def test_quarantine_and_release_keep_other_taints(in_process_client: None, bare_node: str,
                                                   kubectl: Kubectl) -> None:
    asyncio.run(nodes.quarantine_node(bare_node, "XIDFallenOffBus", True, "2026-11-25T00:00:00Z"))
    node = kubectl.get("node", bare_node)
    assert node["spec"]["unschedulable"] is True
    assert taint_keys(node) == {"site/maintenance", "nvidia.com/gpu-error"}
    assert nodes.ANNOTATION_QUARANTINE in node["metadata"]["annotations"]

    asyncio.run(nodes.release_quarantine(bare_node))
    node = kubectl.get("node", bare_node)
    assert not node["spec"].get("unschedulable")
    assert taint_keys(node) == {"site/maintenance"}
    assert nodes.ANNOTATION_QUARANTINE not in (node["metadata"].get("annotations") or {})
