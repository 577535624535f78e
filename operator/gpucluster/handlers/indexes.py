"""The operator's in-memory view of nodes and pods (NodeIndex, PodIndex: a
watch of its own for each), so handlers never LIST the cluster (at 25,000
nodes that is the difference between working and not).

Why not Kopf's indexes: at 25,000 nodes, Node events (KWOK's status posts,
the agents' GPU health writes) are most of the operator's traffic, and Kopf
gives each one its full per-object treatment (a worker task, cause
detection, diff-base bookkeeping) although no change handler watches Nodes.
Profiled at 5,000 nodes (py-spy), that treatment took more of the event loop
than every decision the operator makes; here an event costs one JSON parse
and one small record. Pods left Kopf for another reason, measured at a
restart: until every indexed object is in, Kopf holds each object's worker
on one condition that every new object notifies, so a start with N objects
costs N^2 wake-ups (3,600 objects: 100 s of a busy event loop before the
first handler ran; with 3,000 of them pods). TrainingJobs stay in Kopf, for
their handlers. Both watches also run while peering holds this replica
back, so a standby takes over with its indexes warm.

Each watch thread hands each object to the event loop, which alone touches
the index; handlers read it there, after `synced` (Kopf's own indexes give
the same promise: complete before any handler runs)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping
from typing import Any

from gpucluster import names
from gpucluster.kube.nodes import ANNOTATION_DRAINING, ANNOTATION_QUARANTINE, LABEL_ORDINAL
from gpucluster.kube.watch import ListWatcher
from gpucluster.planning.jobs import WorkerPod
from gpucluster.planning.karpenter import provider_topology
from gpucluster.planning.pools import ObservedNode
from gpucluster.timestamps import epoch


def _condition_of(status: Any, kind: str) -> dict[str, Any]:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def _transition_time(condition: dict[str, Any]) -> float | None:
    stamp = condition.get("lastTransitionTime")
    return epoch(stamp) if stamp else None


def observe_node(name: str, labels: Any, annotations: Any, spec: Any, status: Any) -> ObservedNode:
    taints = spec.get("taints") or []
    allocatable = (status or {}).get("allocatable") or {}
    gpu_condition = _condition_of(status, names.CONDITION_GPU_HEALTHY)
    ready_condition = _condition_of(status, "Ready")
    ready = ready_condition.get("status") == "True"
    gpu_fault = gpu_condition.get("status") == "False"
    return ObservedNode(
        name=name,
        pool=labels.get(names.LABEL_POOL, ""),
        ordinal=int(labels.get(LABEL_ORDINAL, "-1") or -1),
        ready=ready,
        gpu_healthy=not gpu_fault and not any(t.get("key") == names.TAINT_GPU_ERROR for t in taints),
        gpu_fault=gpu_condition.get("reason", "") if gpu_fault else "",
        not_ready_since=_transition_time(ready_condition) if not ready else None,
        gpu_fault_since=_transition_time(gpu_condition) if gpu_fault else None,
        quarantined=ANNOTATION_QUARANTINE in annotations,
        cordoned=bool(spec.get("unschedulable")),
        draining=ANNOTATION_DRAINING in annotations,
        gpus=int(allocatable.get(names.GPU_RESOURCE, labels.get(names.LABEL_GPU_COUNT, "0"))),
        block=labels.get(names.LABEL_BLOCK, ""),
        rack=labels.get(names.LABEL_RACK, ""),
        provider_topology=provider_topology(labels),
    )


def owned_nodes(nodes: Iterable[ObservedNode], busy_nodes: Container[str],
                pool: str | None = None) -> dict[str, list[ObservedNode]]:
    """The nodes by pool (or of one pool), each marked busy when a pod keeps
    it so."""
    by_pool: dict[str, list[ObservedNode]] = {}
    for node in nodes:
        if pool is not None and node.pool != pool:
            continue
        if node.name in busy_nodes:
            node = dataclasses.replace(node, busy=True)
        by_pool.setdefault(node.pool, []).append(node)
    return by_pool


class _WatchedIndex:
    """What both indexes share: a watch thread that lists and watches one
    kind, and hands what it reads to the event loop (the sink methods,
    `replace_all` and `observe`, run in the watch thread)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: ListWatcher | None = None
        self.synced = asyncio.Event()

    def _start(self, watcher: ListWatcher, thread: str) -> None:
        self._loop = asyncio.get_running_loop()  # before the thread's first call
        self._watcher = watcher
        watcher.start(thread)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    def _call(self, apply: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: the operator is exiting
            self._loop.call_soon_threadsafe(apply, *args)


class NodeIndex(_WatchedIndex):
    """The cluster's Nodes as ObservedNodes, by TrainingCluster."""

    def __init__(self, on_attention: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self._by_cluster: dict[str, dict[str, ObservedNode]] = {}
        self._cluster_of: dict[str, str] = {}
        self._on_attention = on_attention

    def get(self, cluster: str) -> Collection[ObservedNode]:
        nodes = self._by_cluster.get(cluster)
        return nodes.values() if nodes is not None else ()

    def by_name(self, cluster: str) -> dict[str, ObservedNode]:
        """A copy of the cluster's nodes by name (copied in C: 25,000 in a
        fraction of a millisecond), which the watch does not change under
        its holder."""
        return dict(self._by_cluster.get(cluster, {}))

    def start(self, core: Any) -> None:
        self._start(ListWatcher(core.list_node, self, label_selector=names.LABEL_CLUSTER), "node-index")

    # -- the watch thread's side ---------------------------------------------

    def replace_all(self, objects: Iterator[Mapping[str, Any]]) -> None:
        listed = [_observed(node) for node in objects]
        self._call(self._replace, listed)

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        if event_type == "DELETED":
            self._call(self._forget, obj["metadata"]["name"])
        else:
            self._call(self._put, *_observed(obj))

    # -- the event loop's side -----------------------------------------------

    def _replace(self, listed: list[tuple[str, ObservedNode]]) -> None:
        self._by_cluster, self._cluster_of = {}, {}
        for cluster, node in listed:
            self._put(cluster, node)
        self.synced.set()

    def _put(self, cluster: str, node: ObservedNode) -> None:
        if self._cluster_of.get(node.name, cluster) != cluster:
            self._forget(node.name)
        self._cluster_of[node.name] = cluster
        self._by_cluster.setdefault(cluster, {})[node.name] = node
        if self._on_attention is not None and bool(node.gpu_fault) != node.quarantined:
            self._on_attention(cluster, node.pool)

    def _forget(self, name: str) -> None:
        cluster = self._cluster_of.pop(name, None)
        if cluster is not None:
            nodes = self._by_cluster[cluster]
            del nodes[name]
            if not nodes:
                del self._by_cluster[cluster]


@dataclasses.dataclass(frozen=True)
class IndexedPod:
    """What the operator keeps of one pod: its node, whether it keeps the
    node busy, the worker it is (a TrainingJob's), or the GPUs it holds
    there for no TrainingJob."""

    node: str
    busy: bool
    worker: WorkerPod | None
    foreign_gpus: int


def _gpu_request(pod_spec: Any) -> int:
    total = 0
    for container in pod_spec.get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(names.GPU_RESOURCE) or (
            resources.get("requests") or {}).get(names.GPU_RESOURCE)
        total += int(value or 0)
    return total


def index_pod(pod: Mapping[str, Any]) -> IndexedPod:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    node = spec.get("nodeName") or ""
    finished = status.get("phase") in ("Succeeded", "Failed")
    # Bound, not finished, not a DaemonSet's: the pod keeps its node from being removed.
    busy = bool(node) and not finished and not any(
        owner.get("kind") == "DaemonSet" for owner in meta.get("ownerReferences") or [])
    worker = None
    foreign = 0
    # Every namespace's worker pods, served or not: their GPUs are held whoever serves them.
    if names.LABEL_JOB_NAME in labels:
        terminated: dict[str, Any] = next(
            (s["state"]["terminated"] for s in status.get("containerStatuses") or []
             if (s.get("state") or {}).get("terminated")), {})
        worker = WorkerPod(
            name=meta["name"], job_key=f"{meta.get('namespace', '')}/{labels[names.LABEL_JOB_NAME]}",
            attempt=int(labels.get(names.LABEL_JOB_ATTEMPT, 0)), rank=int(labels.get(names.LABEL_JOB_RANK, 0)),
            node=node, phase=status.get("phase", "Pending"), gpus=_gpu_request(spec),
            terminating=bool(meta.get("deletionTimestamp")),
            exit_code=terminated.get("exitCode"), reason=terminated.get("reason", ""),
        )
    elif node and not finished:
        foreign = _gpu_request(spec)
    return IndexedPod(node=node, busy=busy, worker=worker, foreign_gpus=foreign)


class PodIndex(_WatchedIndex):
    """Every pod, kept as three views: the nodes pods keep busy, the worker
    pods of each TrainingJob, and the GPUs other pods hold on each node."""

    def __init__(self) -> None:
        super().__init__()
        self._pods: dict[str, IndexedPod] = {}
        self._busy: dict[str, dict[str, bool]] = {}
        self._workers: dict[str, dict[str, WorkerPod]] = {}
        self._foreign: dict[str, dict[str, int]] = {}

    @property
    def busy_nodes(self) -> Container[str]:
        """Nodes that a bound, unfinished pod keeps busy."""
        return self._busy.keys()

    def workers(self, job_key: str) -> list[WorkerPod]:
        return list(self._workers.get(job_key, {}).values())

    def job_keys(self) -> list[str]:
        """The jobs ("namespace/name") with worker pods, jobs gone included."""
        return list(self._workers)

    def foreign_gpus(self, nodes: Container[str]) -> dict[str, int]:
        """GPUs that pods of no TrainingJob hold, on those of `nodes` where
        some do: a handful, not 25,000 zeros."""
        return {node: held for node, pods in self._foreign.items()
                if node in nodes and (held := sum(pods.values()))}

    def start(self, core: Any) -> None:
        self._start(ListWatcher(core.list_pod_for_all_namespaces, self), "pod-index")

    # -- the watch thread's side ---------------------------------------------

    def replace_all(self, objects: Iterator[Mapping[str, Any]]) -> None:
        listed = [(_pod_key(pod), index_pod(pod)) for pod in objects]
        self._call(self._replace, listed)

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        key = _pod_key(obj)
        if event_type == "DELETED":
            self._call(self._forget, key)
        else:
            self._call(self._put, key, index_pod(obj))

    # -- the event loop's side -----------------------------------------------

    def _replace(self, listed: list[tuple[str, IndexedPod]]) -> None:
        self._pods, self._busy, self._workers, self._foreign = {}, {}, {}, {}
        for key, pod in listed:
            self._put(key, pod)
        self.synced.set()

    def _put(self, key: str, pod: IndexedPod) -> None:
        if self._pods.get(key) == pod:
            return
        self._forget(key)
        self._pods[key] = pod
        if pod.busy:
            self._busy.setdefault(pod.node, {})[key] = True
        if pod.worker is not None:
            self._workers.setdefault(pod.worker.job_key, {})[key] = pod.worker
        if pod.foreign_gpus:
            self._foreign.setdefault(pod.node, {})[key] = pod.foreign_gpus

    def _forget(self, key: str) -> None:
        pod = self._pods.pop(key, None)
        if pod is None:
            return
        if pod.busy:
            _discard(self._busy, pod.node, key)
        if pod.worker is not None:
            _discard(self._workers, pod.worker.job_key, key)
        if pod.foreign_gpus:
            _discard(self._foreign, pod.node, key)


def _discard(groups: dict[str, dict[str, Any]], group: str, key: str) -> None:
    members = groups[group]
    del members[key]
    if not members:
        del groups[group]


def _pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


def _observed(node: Mapping[str, Any]) -> tuple[str, ObservedNode]:
    meta = node["metadata"]
    labels = meta.get("labels") or {}
    return labels.get(names.LABEL_CLUSTER, ""), observe_node(
        meta["name"], labels, meta.get("annotations") or {}, node.get("spec") or {}, node.get("status") or {})
