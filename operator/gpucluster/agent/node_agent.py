"""The agent of one node (the DaemonSet on real nodes): reads its GPUs,
judges them, writes the verdict onto its Node when it changes, and keeps the
latest readings for /metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from gpucluster.agent.backend import GpuBackend
from gpucluster.agent.exporter import NodeGpus
from gpucluster.agent.fake import FakeGpuSet
from gpucluster.agent.injection import injection_annotation
from gpucluster.agent.nodestatus import NodeClient, NodeStatusWriter
from gpucluster.planning.health import HealthPolicy, NodeVerdict, node_verdict

log = logging.getLogger(__name__)

# Even when the verdict stays the same, compare it with the Node this often,
# to restore a condition someone else removed or changed.
DEFAULT_RESYNC_S = 300.0


class NodeAgent:
    def __init__(
        self,
        backend: GpuBackend,
        node_name: str,
        nodes: NodeClient | None = None,
        *,
        fault_target: FakeGpuSet | None = None,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.time,
        resync_s: float = DEFAULT_RESYNC_S,
    ) -> None:
        """`nodes` None runs without the API server (metrics only). With a
        `fault_target` (the fake backend), the agent reads the Node every tick
        and applies its fault-injection annotation to the fake GPUs."""
        self.node_name = node_name
        self._backend = backend
        self._nodes = nodes
        self._writer = NodeStatusWriter(nodes) if nodes is not None else None
        self._fault_target = fault_target
        self._policy = policy or HealthPolicy()
        self._clock = clock
        self._resync_s = resync_s
        self._known_uuids: dict[int, str] = {}
        self._written: NodeVerdict | None = None
        self._written_at = float("-inf")
        self._latest = NodeGpus(node_name, ())

    def tick(self) -> NodeVerdict:
        """One round: faults in (fake backend), readings, verdict, write if needed."""
        node = None
        if self._fault_target is not None and self._nodes is not None:
            node = self._nodes.get(self.node_name)
            self._fault_target.apply_annotation(injection_annotation(node))
        readings = self._backend.read()
        self._known_uuids.update({reading.index: reading.uuid for reading in readings})
        now = self._clock()
        verdict = node_verdict(readings, expected_gpus=self._backend.expected_gpus, now=now,
                               policy=self._policy, known_uuids=self._known_uuids)
        self._latest = NodeGpus(self.node_name, readings, verdict)
        if self._writer is not None and (
            node is not None or verdict != self._written or now - self._written_at >= self._resync_s
        ):
            # With the node at hand the writer only patches what differs;
            # without it, it reads the node first.
            self._writer.sync(self.node_name, verdict, node)
            self._written, self._written_at = verdict, now
        return verdict

    def snapshot(self) -> Sequence[NodeGpus]:
        """The collector's source: this node's latest readings and verdict."""
        return (self._latest,)

    def run(self, stop: threading.Event, interval: float) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                # The API server or the driver failing once must not end the
                # agent: the next tick tries again.
                log.exception("agent tick on node %s failed", self.node_name)
            stop.wait(interval)
