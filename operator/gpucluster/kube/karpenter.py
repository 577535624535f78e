"""Karpenter's objects as a karpenter pool writes them: the NodePool it owns
(server-side apply), the NodeClaims it removes, and its nodes' topology
labels. Every call names karpenter.sh/v1 itself, never our group."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes

from gpucluster import names
from gpucluster.planning.pools import NodeToCreate

from .client import call_raw, custom, status_of
from .nodes import LABEL_ORDINAL, patch_node

FIELD_MANAGER = "gpucluster"
_NODEPOOLS = (names.KARPENTER_GROUP, names.KARPENTER_VERSION, names.KARPENTER_NODEPOOLS)
_NODECLAIMS = (names.KARPENTER_GROUP, names.KARPENTER_VERSION, names.KARPENTER_NODECLAIMS)


async def read_nodepool(name: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(await call_raw(custom().get_cluster_custom_object, *_NODEPOOLS, name)))
    except kubernetes.client.ApiException as err:
        if status_of(err) == 404:
            return None
        raise


async def apply_nodepool(manifest: Mapping[str, Any]) -> None:
    """Creates or updates the NodePool with server-side apply: the fields we
    send are ours, Karpenter's defaults and status are left alone, and a
    field we stop sending is removed."""
    await call_raw(custom().patch_cluster_custom_object, *_NODEPOOLS, manifest["metadata"]["name"], manifest,
                   field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml")


async def list_nodepools(selector: str) -> list[dict[str, Any]]:
    """The NodePools matching a label selector; none where Karpenter's CRDs
    are not installed."""
    try:
        found = json.loads(await call_raw(custom().list_cluster_custom_object, *_NODEPOOLS,
                                          label_selector=selector))
    except kubernetes.client.ApiException as err:
        if status_of(err) == 404:
            return []
        raise
    return list(found["items"])


async def _delete(resource: tuple[str, str, str], name: str) -> None:
    """Deletes one object; one already gone counts as deleted."""
    try:
        await call_raw(custom().delete_cluster_custom_object, *resource, name)
    except kubernetes.client.ApiException as err:
        if status_of(err) != 404:
            raise


async def delete_nodepool(name: str) -> None:
    """Deletes a NodePool; Kubernetes' garbage collector deletes its
    NodeClaims (they name it as owner), and Karpenter drains and terminates
    each one's node."""
    await _delete(_NODEPOOLS, name)


async def delete_nodeclaims(claim_names: Sequence[str]) -> list[str]:
    """Deletes NodeClaims; Karpenter drains and terminates their nodes.
    Returns the errors, one line each."""
    errors = []
    for name in claim_names:
        try:
            await _delete(_NODECLAIMS, name)
        except kubernetes.client.ApiException as err:
            errors.append(f"NodeClaim {name}: {err}")
    return errors


async def delete_nodeclaim_of(cluster: str, pool: str, node: str) -> str | None:
    """Deletes the NodeClaim whose node is `node`; returns its name, or None
    when no claim of the pool has that node (already gone)."""
    found = json.loads(await call_raw(custom().list_cluster_custom_object, *_NODECLAIMS,
                                      label_selector=f"{names.LABEL_CLUSTER}={cluster},{names.LABEL_POOL}={pool}"))
    claim = next((c["metadata"]["name"] for c in found["items"]
                  if (c.get("status") or {}).get("nodeName") == node), None)
    if claim is not None:
        await _delete(_NODECLAIMS, claim)
    return claim


async def label_node(node: NodeToCreate) -> None:
    """Writes the ordinal, block and rack the pool gave a node Karpenter launched."""
    await patch_node(node.name, {"metadata": {"labels": {
        LABEL_ORDINAL: str(node.ordinal), names.LABEL_BLOCK: node.block, names.LABEL_RACK: node.rack}}})
