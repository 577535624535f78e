"""A remediation pass cordons without waiting for the drains of the passes
before it, and a daemon that stops waits for those drains.

A drain is a pod list and evictions per node on a loaded API server; when
passes waited for them, a cordon came up to 4.8 s after its node's fault at
2,000 nodes. The API calls are the only parts replaced here.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import kopf
import pytest
from gpucluster.api import cluster as api
from gpucluster.handlers import remediation
from gpucluster.handlers.state import ClusterRemediation, PoolRemediation
from gpucluster.planning.health import REASON_GPU_LOST
from gpucluster.planning.pools import ObservedNode

POOL = api.NodePool.model_validate({"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": 4,
                                    "remediation": {"maxUnavailable": 2}})
BODY = {"metadata": {"name": "colossus"}, "status": {}}
FATAL = REASON_GPU_LOST


class FakeApi:
    """Records the writes; evictions wait until `evictions_may_finish`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cordoned: list[str] = []
        self.evicting: list[str] = []
        self.evictions_may_finish = asyncio.Event()
        self.status_writes = 0

        async def quarantine_node(name: str, reason: str, fatal: bool, since: str) -> None:
            self.cordoned.append(name)

        async def evict_pods(name: str) -> int:
            self.evicting.append(name)
            await self.evictions_may_finish.wait()
            return 1

        async def call(*args: Any, **kwargs: Any) -> None:
            self.status_writes += 1

        monkeypatch.setattr(remediation.kube_nodes, "quarantine_node", quarantine_node)
        monkeypatch.setattr(remediation.kube_nodes, "evict_pods", evict_pods)
        monkeypatch.setattr(remediation, "call", call)
        monkeypatch.setattr(remediation, "custom", lambda: types.SimpleNamespace(
            patch_cluster_custom_object_status=None))
        monkeypatch.setattr(kopf, "info", lambda *args, **kwargs: None)
        monkeypatch.setattr(kopf, "warn", lambda *args, **kwargs: None)


def node(name: str, *, fault: bool = False, quarantined: bool = False, busy: bool = False) -> ObservedNode:
    return ObservedNode(name=name, pool=POOL.name, ordinal=0, gpu_healthy=not fault,
                        gpu_fault=FATAL if fault else "", quarantined=quarantined, busy=busy)


async def one_pass(memory: PoolRemediation, owned: list[ObservedNode]) -> None:
    await remediation.remediate_pool(BODY, POOL, owned, remediation.PoolCount(present=4), memory)


def test_a_cordon_does_not_wait_for_a_drain_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        api_calls = FakeApi(monkeypatch)
        memory = PoolRemediation()
        draining = node("n0", fault=True, quarantined=True, busy=True)
        await asyncio.wait_for(one_pass(memory, [draining]), 1)
        await asyncio.sleep(0)
        assert api_calls.evicting == ["n0"] and memory.following_through()

        await asyncio.wait_for(one_pass(memory, [draining, node("n1", fault=True)]), 1)
        assert api_calls.cordoned == ["n1"], "the new fault is cordoned while n0's drain is in flight"
        assert api_calls.status_writes == 1, "and counted in the pool's status"
        assert api_calls.evicting == ["n0"], "no second drain while the first is in flight"

        api_calls.evictions_may_finish.set()
        await asyncio.wait_for(memory.follow_through, 1)  # type: ignore[arg-type]
        assert memory.draining == {"n0"}

    asyncio.run(scenario())


def test_a_stopping_daemon_waits_for_its_drains_or_cancels_them(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        api_calls = FakeApi(monkeypatch)
        passes = ClusterRemediation(pools={POOL.name: PoolRemediation()})
        await one_pass(passes.pools[POOL.name], [node("n0", fault=True, quarantined=True, busy=True)])
        finishing = asyncio.ensure_future(passes.finish())
        await asyncio.sleep(0.05)
        assert not finishing.done(), "the drain is still writing"
        api_calls.evictions_may_finish.set()
        await asyncio.wait_for(finishing, 1)

        api_calls.evictions_may_finish.clear()
        await one_pass(passes.pools[POOL.name], [node("n0", fault=True, quarantined=True, busy=True)])
        finishing = asyncio.ensure_future(passes.finish())
        await asyncio.sleep(0.05)
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finishing
        follow_through = passes.pools[POOL.name].follow_through
        assert follow_through is not None and follow_through.cancelled()

    asyncio.run(scenario())
