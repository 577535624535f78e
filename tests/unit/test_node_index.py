"""The operator's node index: what its watch thread hands over lands in the
event loop's view, moves between clusters, and asks remediation for passes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from gpucluster import names
from gpucluster.handlers.indexes import NodeIndex
from gpucluster.kube.nodes import ANNOTATION_QUARANTINE


def node(name: str, cluster: str, pool: str = "h100", *, fault: str = "", quarantined: bool = False,
         ready: bool = True) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False",
                   "lastTransitionTime": "2026-11-30T00:00:00Z"}]
    if fault:
        conditions.append({"type": names.CONDITION_GPU_HEALTHY, "status": "False", "reason": fault,
                           "lastTransitionTime": "2026-11-30T00:00:00Z"})
    return {"metadata": {"name": name, "labels": {names.LABEL_CLUSTER: cluster, names.LABEL_POOL: pool},
                         "annotations": {ANNOTATION_QUARANTINE: "x"} if quarantined else {}},
            "spec": {}, "status": {"conditions": conditions,
                                   "allocatable": {names.GPU_RESOURCE: "8"}}}


def run_fed(index: NodeIndex, feed: Callable[[], None]) -> None:
    """Runs `feed` in a thread, as the watch does, then lets the loop apply it."""
    async def main() -> None:
        index._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=feed)
        thread.start()
        await asyncio.to_thread(thread.join)
        await asyncio.sleep(0)

    asyncio.run(main())


def test_list_then_events_build_each_clusters_view() -> None:
    index = NodeIndex()
    assert not index.synced.is_set()
    assert list(index.get("a")) == []

    def feed() -> None:
        index.replace_all(iter([node("n1", "a"), node("n2", "a"), node("n3", "b")]))
        index.observe("MODIFIED", node("n2", "a", ready=False))
        index.observe("ADDED", node("n4", "b", pool="h200"))
        index.observe("MODIFIED", node("n3", "a"))  # relabelled into another cluster
        index.observe("DELETED", node("n1", "a"))

    run_fed(index, feed)
    assert index.synced.is_set()
    assert sorted(n.name for n in index.get("a")) == ["n2", "n3"]
    assert [n.name for n in index.get("b")] == ["n4"]
    assert [n.pool for n in index.get("b")] == ["h200"]
    assert not next(n for n in index.get("a") if n.name == "n2").ready


def test_a_fresh_list_forgets_what_it_no_longer_holds() -> None:
    index = NodeIndex()

    def feed() -> None:
        index.replace_all(iter([node("n1", "a"), node("n2", "b")]))
        index.replace_all(iter([node("n2", "b")]))

    run_fed(index, feed)
    assert list(index.get("a")) == []
    assert [n.name for n in index.get("b")] == ["n2"]


def test_fault_and_quarantine_disagreeing_ask_for_a_pass() -> None:
    wanted: list[tuple[str, str]] = []
    index = NodeIndex(on_attention=lambda cluster, pool: wanted.append((cluster, pool)))

    def feed() -> None:
        index.replace_all(iter([node("n1", "a"), node("n2", "a", fault="Xid79", quarantined=True)]))
        index.observe("MODIFIED", node("n1", "a", pool="h200", fault="Xid79"))  # faulty, not quarantined
        index.observe("MODIFIED", node("n2", "a", quarantined=True))  # healed, still quarantined
        index.observe("MODIFIED", node("n1", "a", pool="h200", fault="Xid79", quarantined=True))

    run_fed(index, feed)
    assert wanted == [("a", "h200"), ("a", "h100")]
