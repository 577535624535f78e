"""Node objects: what a kwok node of a pool looks like, and the writes the
pool reconciler makes (create, delete, cordon, drain, adopt, release)."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kubernetes

from gpucluster import names
from gpucluster.api.gpus import GPU_FACTS, GPUProduct
from gpucluster.planning.pools import NodeToCreate, PoolShape

from .client import CONCURRENCY, call, call_raw, core, status_of

# An 8-GPU HGX H100/H200 server: 2 x 56-core Xeon (224 threads), 2 TiB of
# memory. Allocatable keeps back what a kubelet reserves for the system.
SERVER_CAPACITY = {"cpu": "224", "memory": "2113536Mi", "pods": "110",
                   "ephemeral-storage": "30Ti"}
SERVER_ALLOCATABLE = {"cpu": "220", "memory": "2097152Mi", "pods": "110",
                      "ephemeral-storage": "28Ti"}
ANNOTATION_DRAINING = f"{names.GROUP}/draining"
ANNOTATION_ADOPTED_LABELS = f"{names.GROUP}/adopted-labels"
ANNOTATION_ADOPTED_TAINTS = f"{names.GROUP}/adopted-taints"
LABEL_ORDINAL = f"{names.GROUP}/ordinal"
ANNOTATION_QUARANTINE = f"{names.GROUP}/quarantine"
# Read-modify-write of a node's taints retries this often on a conflict.
CONFLICT_RETRIES = 5
QUARANTINE_TAINT = {"key": names.TAINT_GPU_ERROR, "value": "true", "effect": "NoSchedule"}


def kwok_shard_of(node_name: str) -> str:
    """The node's KWOK bucket: stable for a name, spread evenly over names."""
    return str(zlib.crc32(node_name.encode()) % names.KWOK_SHARD_BUCKETS)


@dataclass(frozen=True)
class PoolNodeTemplate:
    """What every node of one pool carries besides its identity."""

    shape: PoolShape
    gpu: GPUProduct
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()

    def gpu_labels(self) -> dict[str, str]:
        facts = GPU_FACTS[self.gpu]
        major, minor = facts.compute_capability
        return {
            names.LABEL_GPU_PRODUCT: facts.gfd_product,
            names.LABEL_GPU_COUNT: str(self.shape.gpus_per_node),
            names.LABEL_GPU_MEMORY: str(facts.memory_mib),
            names.LABEL_GPU_FAMILY: facts.family,
            names.LABEL_GPU_COMPUTE_MAJOR: str(major),
            names.LABEL_GPU_COMPUTE_MINOR: str(minor),
            names.LABEL_GPU_PRESENT: "true",
        }

    def ownership_labels(self, node: NodeToCreate) -> dict[str, str]:
        return {
            names.LABEL_CLUSTER: self.shape.cluster,
            names.LABEL_POOL: self.shape.name,
            names.LABEL_PROVIDER: self.shape.provider.value,
            names.LABEL_MANAGED_BY: names.MANAGED_BY,
            names.LABEL_BLOCK: node.block,
            names.LABEL_RACK: node.rack,
            LABEL_ORDINAL: str(node.ordinal),
        }

    def kwok_node(self, node: NodeToCreate) -> dict[str, Any]:
        gpus = str(self.shape.gpus_per_node)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "annotations": {names.ANNOTATION_KWOK_NODE: names.KWOK_NODE_VALUE},
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    names.LABEL_KWOK_SHARD: kwok_shard_of(node.name),
                    **self.gpu_labels(),
                    **self.labels,
                    **self.ownership_labels(node),
                },
            },
            "spec": {"taints": [dict(t) for t in self.taints]},
            "status": {
                "capacity": {**SERVER_CAPACITY, names.GPU_RESOURCE: gpus},
                "allocatable": {**SERVER_ALLOCATABLE, names.GPU_RESOURCE: gpus},
            },
        }


async def _bounded(calls: Iterable[Any]) -> list[BaseException | None]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(coro_factory: Any) -> BaseException | None:
        async with gate:
            try:
                await coro_factory()
            except kubernetes.client.ApiException as err:
                return err
            return None

    return await asyncio.gather(*(one(c) for c in calls))


async def create_nodes(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """Creates the nodes concurrently; one that already exists counts as
    created (a restart may have made it). Returns the errors, one line each."""
    def creator(body: Mapping[str, Any]) -> Any:
        # The reply is not parsed: at thousands of nodes the client's model
        # deserialisation, not the API server, would set the pace.
        return lambda: call_raw(core().create_node, body)

    results = await _bounded(creator(m) for m in manifests)
    return [f"{m['metadata']['name']}: {err}" for m, err in zip(manifests, results, strict=True)
            if err is not None and status_of(err) != 409]


async def delete_nodes(node_names: Sequence[str]) -> list[str]:
    def deleter(name: str) -> Any:
        return lambda: call_raw(core().delete_node, name)

    results = await _bounded(deleter(n) for n in node_names)
    return [f"{n}: {err}" for n, err in zip(node_names, results, strict=True)
            if err is not None and status_of(err) != 404]


async def patch_node(name: str, patch: Mapping[str, Any]) -> None:
    await call_raw(core().patch_node, name, patch)


async def set_draining(name: str, draining: bool, reason: str = "") -> None:
    """Cordons a node and marks why, or undoes both."""
    await patch_node(name, {
        "metadata": {"annotations": {ANNOTATION_DRAINING: reason if draining else None}},
        "spec": {"unschedulable": draining or None},
    })


async def evict_pods(node_name: str) -> int:
    """Evicts every pod on the node except DaemonSet pods, through the
    Eviction API so PodDisruptionBudgets are honoured. Returns how many remain."""
    pods = await call(core().list_pod_for_all_namespaces,
                      field_selector=f"spec.nodeName={node_name}")
    remaining = 0
    for pod in pods.items:
        owners = pod.metadata.owner_references or []
        if any(o.kind == "DaemonSet" for o in owners) or str(pod.status.phase) in {"Succeeded", "Failed"}:
            continue
        remaining += 1
        eviction = kubernetes.client.V1Eviction(metadata=kubernetes.client.V1ObjectMeta(
            name=pod.metadata.name, namespace=pod.metadata.namespace))
        try:
            await call(core().create_namespaced_pod_eviction, pod.metadata.name,
                       pod.metadata.namespace, eviction)
        except kubernetes.client.ApiException as err:
            if status_of(err) not in (404, 429):
                raise
    return remaining


async def adopt_node(template: PoolNodeTemplate, node: NodeToCreate,
                     existing_labels: Mapping[str, str]) -> None:
    """Labels (and taints) an existing node into a static pool, remembering
    what was added so that release removes exactly that."""
    wanted = {**template.gpu_labels(), **template.labels, **template.ownership_labels(node)}
    added = sorted(k for k in wanted if k not in existing_labels)
    labels = {k: v for k, v in wanted.items() if k in added or k in template.ownership_labels(node)}

    def adoption(current: Mapping[str, Any]) -> dict[str, Any]:
        taints = _taints_of(current)
        present = {(t["key"], t["effect"]) for t in taints}
        added_taints = [dict(t) for t in template.taints if (t["key"], t["effect"]) not in present]
        return {
            "metadata": {"labels": labels, "annotations": {
                ANNOTATION_ADOPTED_LABELS: json.dumps(added),
                ANNOTATION_ADOPTED_TAINTS: json.dumps(added_taints)}},
            "spec": {"taints": taints + added_taints or None},
        }

    await _patch_read_node(node.name, adoption)


def _taints_of(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(node["spec"].get("taints") or [])


async def _patch_read_node(name: str, patch_for: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
    """Patches a node with what `patch_for` makes of its current state, on
    that state's resourceVersion: a taint list is replaced whole, so a taint
    someone else added between the read and the write must not be lost. On a
    conflict it reads again and retries."""
    for attempt in range(CONFLICT_RETRIES):
        node = json.loads(await call_raw(core().read_node, name))
        patch = patch_for(node)
        patch.setdefault("metadata", {})["resourceVersion"] = node["metadata"]["resourceVersion"]
        try:
            await patch_node(name, patch)
            return
        except kubernetes.client.ApiException as err:
            if status_of(err) != 409 or attempt == CONFLICT_RETRIES - 1:
                raise


async def release_node(name: str) -> None:
    """Gives an adopted node back as it was: the labels and taints gpucluster
    added are removed, and the node is kept."""
    def release(node: Mapping[str, Any]) -> dict[str, Any]:
        annotations = node["metadata"].get("annotations") or {}
        added = set(json.loads(annotations.get(ANNOTATION_ADOPTED_LABELS, "[]")))
        added_taints = {(t["key"], t["effect"])
                        for t in json.loads(annotations.get(ANNOTATION_ADOPTED_TAINTS, "[]"))}
        ours = {names.LABEL_CLUSTER, names.LABEL_POOL, names.LABEL_PROVIDER, names.LABEL_BLOCK,
                names.LABEL_RACK, LABEL_ORDINAL}
        kept_taints = [t for t in _taints_of(node) if (t["key"], t["effect"]) not in added_taints]
        return {
            "metadata": {"labels": dict.fromkeys(added | ours),
                         "annotations": dict.fromkeys(
                             (ANNOTATION_ADOPTED_LABELS, ANNOTATION_ADOPTED_TAINTS, ANNOTATION_DRAINING))},
            "spec": {"taints": kept_taints or None, "unschedulable": None},
        }

    await _patch_read_node(name, release)


async def quarantine_node(name: str, reason: str, fatal: bool, since: str) -> None:
    """Cordons the node and taints it nvidia.com/gpu-error, noting why."""
    def quarantine(node: Mapping[str, Any]) -> dict[str, Any]:
        taints = [t for t in _taints_of(node) if t["key"] != names.TAINT_GPU_ERROR]
        return {
            "metadata": {"annotations": {ANNOTATION_QUARANTINE: json.dumps(
                {"reason": reason, "fatal": fatal, "since": since})}},
            "spec": {"unschedulable": True, "taints": [*taints, QUARANTINE_TAINT]},
        }

    await _patch_read_node(name, quarantine)


async def release_quarantine(name: str) -> None:
    def release(node: Mapping[str, Any]) -> dict[str, Any]:
        taints = [t for t in _taints_of(node) if t["key"] != names.TAINT_GPU_ERROR]
        return {
            "metadata": {"annotations": {ANNOTATION_QUARANTINE: None}},
            "spec": {"unschedulable": None, "taints": taints or None},
        }

    await _patch_read_node(name, release)
