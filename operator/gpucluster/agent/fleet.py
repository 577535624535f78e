"""Fleet mode: one process plays the node agent of every KWOK GPU node.

It watches the Nodes that carry the KWOK annotation (kwok.x-k8s.io/node=fake)
and a GPU product label, gives each a FakeGpuSet of the product's profile
(as many GPUs as its nvidia.com/gpu.count label says), takes faults from each
node's gpucluster.dev/inject-fault annotation (syntax in injection.py), and
serves /metrics for all of them.

Built to stay cheap at thousands of nodes:
* verdicts are recomputed only for nodes whose faults changed, or that carry
  an XID that may age out;
* a node is written only when its verdict differs from what the node shows,
  as last seen on the watch: a restart of the fleet against nodes that
  already show their verdict writes nothing, and a KWOK heartbeat that leaves
  the condition alone costs no write;
* a write is one request: one patch of nodes/status carries the annotations
  and the condition together (nodestatus.py), so a node never shows half a
  verdict and each write comes back as one watch event;
* nodes are kept as the few fields the fleet compares, not whole objects;
* a watch event older than the fleet's own last write to a node (the watch
  lags the writes: a KWOK heartbeat or a user's annotation that landed
  between the fleet's read and its write arrives after the write, without
  it) is dropped instead of undoing what the fleet knows it wrote; the event
  of the write itself, or any later one, carries whatever it missed;
* writes go through a small pool of threads, one write per node at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kubernetes

from gpucluster.agent.exporter import NodeGpus
from gpucluster.agent.fake import GPUS_PER_NODE, FakeGpuSet
from gpucluster.agent.gpu_profile import GpuProfile, profile_for_product
from gpucluster.agent.injection import injection_annotation
from gpucluster.agent.nodestatus import (
    NodeClient,
    NodeStatusWriter,
    gpu_condition,
    gpu_condition_of,
    node_matches,
)
from gpucluster.kube.watch import ListWatcher
from gpucluster.names import (
    ANNOTATION_HEALTHY_GPUS,
    ANNOTATION_KWOK_NODE,
    ANNOTATION_UNHEALTHY_GPUS,
    GPU_RESOURCE,
    KWOK_NODE_VALUE,
    LABEL_GPU_COUNT,
    LABEL_GPU_PRODUCT,
)
from gpucluster.planning.health import (
    HealthPolicy,
    NodeVerdict,
    XidClass,
    classify_xid,
    node_verdict,
)

log = logging.getLogger(__name__)

DEFAULT_WRITERS = 8
# How long a failed write waits before the node is tried again.
RETRY_AFTER_S = 5.0


@dataclass
class _FleetNode:
    name: str
    product: str
    gpus: FakeGpuSet
    # The node as last seen or written: the annotations and the GPUHealthy
    # condition, shaped like a Node so nodestatus' helpers read it.
    observed: dict[str, Any] = field(default_factory=dict)
    resource_version: str = ""  # of `observed`
    verdict: NodeVerdict | None = None
    verdict_version: int = -1
    retry_at: float = 0.0


def fleet_profile(node: Mapping[str, Any]) -> GpuProfile | None:
    """The profile of a node the fleet plays, None for any other node."""
    metadata = node.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if annotations.get(ANNOTATION_KWOK_NODE) != KWOK_NODE_VALUE:
        return None
    product = (metadata.get("labels") or {}).get(LABEL_GPU_PRODUCT)
    if not product:
        return None
    try:
        return profile_for_product(product)
    except LookupError:
        log.warning("node %s: no GPU profile for %s=%s", metadata.get("name"),
                    LABEL_GPU_PRODUCT, product)
        return None


def gpu_count(node: Mapping[str, Any]) -> int:
    """GFD's count label, else the GPU capacity, else an HGX board's eight."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    capacity = (node.get("status") or {}).get("capacity") or {}
    for value in (labels.get(LABEL_GPU_COUNT), capacity.get(GPU_RESOURCE)):
        if value is not None and str(value).isdigit():
            return int(value)
    return GPUS_PER_NODE


def _observed(node: Mapping[str, Any]) -> dict[str, Any]:
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    kept = {key: annotations[key] for key in (ANNOTATION_HEALTHY_GPUS, ANNOTATION_UNHEALTHY_GPUS)
            if key in annotations}
    condition = gpu_condition_of(node)
    return {"metadata": {"annotations": kept},
            "status": {"conditions": [condition] if condition else []}}


class Fleet:
    """The fleet's state and decisions; FleetRunner connects it to the API
    server. Thread-safe: the watch feeds it, the loop evaluates it, writers
    drain it and the metrics scrape reads it, each on its own thread."""

    def __init__(
        self,
        nodes: NodeClient,
        *,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._writer = NodeStatusWriter(nodes)
        self._policy = policy or HealthPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, _FleetNode] = {}
        self._dirty: set[str] = set()
        # Nodes with a transient XID, whose verdict changes as it ages out.
        self._timed: set[str] = set()
        # Nodes queued for a write or being written: one write per node at a
        # time, or an event that lands while a write is in flight (the node
        # as it was before it) would queue a second.
        self._pending: set[str] = set()
        self._writes: queue.Queue[str] = queue.Queue()
        self.changed = threading.Event()  # set when a node needs evaluating
        self.writes_done = 0  # syncs that had to write: one patch each

    # -- intake -----------------------------------------------------------

    def observe(self, event_type: str, node: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        name = node["metadata"]["name"]
        profile = None if event_type == "DELETED" else fleet_profile(node)
        with self._lock:
            if profile is None:
                self._forget(name)
                return
            version = str(node["metadata"].get("resourceVersion", ""))
            fleet_node = self._nodes.get(name)
            if fleet_node is not None and _older(version, fleet_node.resource_version):
                return
            if fleet_node is None or fleet_node.product != profile.name:
                fleet_node = _FleetNode(name, profile.name,
                                        FakeGpuSet(profile, name, gpu_count(node), self._clock))
                self._nodes[name] = fleet_node
            fleet_node.gpus.apply_annotation(injection_annotation(node))
            fleet_node.observed = _observed(node)
            fleet_node.resource_version = version
            self._dirty.add(name)
        self.changed.set()

    def replace_all(self, nodes: Iterable[Mapping[str, Any]]) -> None:
        """A fresh list of every node: forget those no longer there."""
        listed = set()
        for node in nodes:
            listed.add(node["metadata"]["name"])
            self.observe("ADDED", node)
        with self._lock:
            for name in set(self._nodes) - listed:
                self._forget(name)

    # -- decisions --------------------------------------------------------

    def evaluate(self, *, include_timed: bool = True) -> int:
        """Recompute the verdicts that may have changed (those of changed
        nodes, and with `include_timed` those an XID's age may change) and
        queue a write for every node that does not show its verdict. Returns
        how many writes it queued."""
        now = self._clock()
        self.changed.clear()
        queued = 0
        with self._lock:
            candidates = self._dirty | self._timed if include_timed else self._dirty
            self._dirty = set()
            for name in candidates:
                fleet_node = self._nodes.get(name)
                if fleet_node is None:
                    continue
                if now < fleet_node.retry_at:
                    self._dirty.add(name)  # a write failed lately: not yet
                    continue
                self._judge(fleet_node, now)
                if name in self._pending:
                    continue  # looked at again once its write is done
                if (fleet_node.verdict is not None
                        and not node_matches(fleet_node.verdict, fleet_node.observed)):
                    self._pending.add(name)
                    self._writes.put(name)
                    queued += 1
        return queued

    def write_next(self, timeout: float | None = None) -> bool:
        """Write one queued node (a writer thread's loop body). Returns
        whether there was one."""
        try:
            name = self._writes.get(timeout=timeout)
        except queue.Empty:
            return False
        try:
            self._write(name)
        finally:
            with self._lock:
                self._pending.discard(name)
                # Whatever changed while it was written is looked at now.
                self._dirty.add(name)
            self.changed.set()
        return True

    def _write(self, name: str) -> None:
        with self._lock:
            fleet_node = self._nodes.get(name)
            if fleet_node is None or fleet_node.verdict is None:
                return
            verdict, observed = fleet_node.verdict, fleet_node.observed
        try:
            version = self._writer.sync(name, verdict, observed)
        except kubernetes.client.ApiException as err:
            if err.status != 404:  # a deleted node: the watch will say so
                self._retry_later(name, err)
            return
        except Exception as err:
            self._retry_later(name, err)
            return
        if version is None:
            return
        with self._lock:
            self.writes_done += 1
            fleet_node = self._nodes.get(name)
            if fleet_node is not None:
                # The node is now as written, whatever older events may still say.
                fleet_node.observed = _as_written(verdict, observed, self._clock())
                fleet_node.resource_version = version

    def snapshot(self) -> list[NodeGpus]:
        """The collector's source: every node's readings and verdict."""
        with self._lock:
            nodes = list(self._nodes.values())
        return [NodeGpus(node.name, node.gpus.read(), node.verdict) for node in nodes]

    def node_names(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    def verdict_of(self, name: str) -> NodeVerdict | None:
        with self._lock:
            node = self._nodes.get(name)
            return None if node is None else node.verdict

    def _judge(self, fleet_node: _FleetNode, now: float) -> None:
        readings = fleet_node.gpus.read()
        timed = any(classify_xid(event.xid).kind is XidClass.TRANSIENT
                    for reading in readings for event in reading.xid_events)
        if fleet_node.verdict_version == fleet_node.gpus.version and not timed:
            return
        fleet_node.verdict = node_verdict(
            readings, expected_gpus=fleet_node.gpus.expected_gpus, now=now,
            policy=self._policy, known_uuids=fleet_node.gpus.uuids,
        )
        fleet_node.verdict_version = fleet_node.gpus.version
        if timed:
            self._timed.add(fleet_node.name)
        else:
            self._timed.discard(fleet_node.name)

    def _forget(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._dirty.discard(name)
        self._timed.discard(name)

    def _retry_later(self, name: str, err: Exception) -> None:
        log.warning("writing GPU health of node %s failed, retrying: %s", name, err)
        with self._lock:
            if name in self._nodes:
                self._nodes[name].retry_at = self._clock() + RETRY_AFTER_S
                self._dirty.add(name)


def _older(version: str, than: str) -> bool:
    """Whether one resourceVersion predates another. Kubernetes calls them
    opaque, but etcd-backed API servers hand out increasing integers; where
    they are not integers, no event counts as older (at worst, one redundant
    write)."""
    return version.isdigit() and than.isdigit() and int(version) < int(than)


def _as_written(
    verdict: NodeVerdict, observed: Mapping[str, Any], now: float
) -> dict[str, Any]:
    condition = gpu_condition(verdict, gpu_condition_of(observed),
                              datetime.fromtimestamp(now, UTC))
    annotations = {ANNOTATION_HEALTHY_GPUS: str(verdict.healthy_gpus)}
    if verdict.unhealthy_indices:
        annotations[ANNOTATION_UNHEALTHY_GPUS] = ",".join(map(str, verdict.unhealthy_indices))
    return {"metadata": {"annotations": annotations}, "status": {"conditions": [condition]}}


def fleet_watcher(core: kubernetes.client.CoreV1Api, fleet: Fleet, *, node_selector: str = "",
                  **options: Any) -> ListWatcher:
    """The watch of the Nodes with a GPU product label that feeds a Fleet.
    `node_selector` narrows the nodes further (a label selector), to split
    a fleet over several processes or to keep a test to its own nodes."""
    return ListWatcher(core.list_node, fleet, label_selector=",".join(filter(None, (LABEL_GPU_PRODUCT, node_selector))),
                       **options)


class FleetRunner:
    """The fleet's threads: the node watch, the evaluation loop and the writers."""

    def __init__(self, fleet: Fleet, watcher: ListWatcher, *, interval: float,
                 writers: int = DEFAULT_WRITERS) -> None:
        self.fleet = fleet
        self.watcher = watcher
        self._interval = interval
        self._writers = writers
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        targets: list[tuple[str, Callable[[], None]]] = [
            ("fleet-watch", self.watcher.run), ("fleet-evaluate", self._evaluate_loop),
        ]
        targets += [(f"fleet-writer-{n}", self._write_loop) for n in range(self._writers)]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.watcher.stop()
        self.fleet.changed.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _evaluate_loop(self) -> None:
        timed_at = time.monotonic()
        while not self._stop.is_set():
            # Woken early by node events, so injected faults show promptly;
            # the nodes whose XIDs age out are rechecked once an interval.
            self.fleet.changed.wait(self._interval)
            include_timed = time.monotonic() - timed_at >= self._interval
            if include_timed:
                timed_at = time.monotonic()
            self.fleet.evaluate(include_timed=include_timed)

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self.fleet.write_next(timeout=0.5)
