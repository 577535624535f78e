"""The per-node agent loop with the fake backend and an in-memory API."""

from __future__ import annotations

import threading

from gpucluster.agent.fake import FakeGpuSet
from gpucluster.agent.gpu_profile import H100_80GB_HBM3, load_profile
from gpucluster.agent.node_agent import NodeAgent
from gpucluster.agent.nodestatus import MemoryNodeClient, gpu_condition_of
from gpucluster.names import ANNOTATION_HEALTHY_GPUS, ANNOTATION_INJECT_FAULT


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def setup(fault_watch: bool = True) -> tuple[NodeAgent, MemoryNodeClient, FakeGpuSet, Clock]:
    clock = Clock()
    nodes = MemoryNodeClient([{"metadata": {"name": "kind-worker"}, "status": {}}])
    gpus = FakeGpuSet(load_profile(H100_80GB_HBM3), "kind-worker", clock=clock)
    agent = NodeAgent(gpus, "kind-worker", nodes, fault_target=gpus if fault_watch else None,
                      clock=clock, resync_s=300)
    return agent, nodes, gpus, clock


def annotate(nodes: MemoryNodeClient, value: str | None) -> None:
    nodes.annotate("kind-worker", {ANNOTATION_INJECT_FAULT: value})  # not the agent's write


def condition(nodes: MemoryNodeClient) -> dict:
    found = gpu_condition_of(nodes.nodes["kind-worker"])
    assert found is not None
    return dict(found)


def test_writes_on_change_only_and_follows_the_fault_annotation() -> None:
    agent, nodes, _, _ = setup()
    assert agent.tick().healthy
    assert condition(nodes)["status"] == "True"
    assert nodes.writes == [("kind-worker", ("annotations", "condition"))]
    agent.tick()
    assert len(nodes.writes) == 1  # same verdict: nothing written

    annotate(nodes, "gpu=4,xid=79")
    verdict = agent.tick()
    assert len(nodes.writes) == 2  # the new verdict: one patch
    assert (verdict.reason, verdict.healthy_gpus) == ("GPUFellOffBus", 7)
    assert condition(nodes)["reason"] == "GPUFellOffBus"
    assert nodes.get("kind-worker")["metadata"]["annotations"][ANNOTATION_HEALTHY_GPUS] == "7"

    annotate(nodes, None)  # a fatal fault stays after the annotation goes
    assert agent.tick().reason == "GPUFellOffBus"
    annotate(nodes, "gpu=4,fault=reset")
    assert agent.tick().healthy
    assert condition(nodes)["status"] == "True"


def test_without_fault_watch_it_reads_the_node_only_to_write() -> None:
    agent, nodes, gpus, clock = setup(fault_watch=False)
    reads = []
    original_get = nodes.get

    def counting_get(name: str) -> dict:
        reads.append(name)
        return original_get(name)

    nodes.get = counting_get  # type: ignore[method-assign]
    agent.tick()
    agent.tick()
    assert len(reads) == 1  # the first write
    gpus.apply_annotation("gpu=0,fault=overtemp")
    agent.tick()
    assert len(reads) == 2
    assert condition(nodes)["reason"] == "GPUOverTemperature"
    clock.now += 301  # the periodic resync
    agent.tick()
    assert len(reads) == 3


def test_snapshot_feeds_the_collector() -> None:
    agent, _, _, _ = setup()
    agent.tick()
    (snapshot,) = agent.snapshot()
    assert snapshot.hostname == "kind-worker"
    assert len(snapshot.readings) == 8
    assert snapshot.verdict is not None and snapshot.verdict.healthy


def test_run_survives_failing_ticks() -> None:
    agent, nodes, _, _ = setup()
    calls = []

    def failing_get(name: str) -> dict:
        calls.append(name)
        if len(calls) == 1:
            raise ConnectionError("API server away")
        stop.set()
        return MemoryNodeClient.get(nodes, name)

    nodes.get = failing_get  # type: ignore[method-assign]
    stop = threading.Event()
    agent.run(stop, interval=0.01)
    assert len(calls) == 2
