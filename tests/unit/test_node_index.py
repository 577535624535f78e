"""The operator's node and pod indexes: what their watch threads hand over
lands in the event loop's view; nodes move between clusters and ask
remediation for passes; pods keep nodes busy, are a job's workers, or hold
GPUs for no job."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from gpucluster import names
from gpucluster.handlers.indexes import NodeIndex, PodIndex, _WatchedIndex
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


def run_fed(index: _WatchedIndex, feed: Callable[[], None]) -> None:
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


def pod(name: str, node: str = "", *, namespace: str = "default", job: str = "", gpus: int = 0,
        phase: str = "Running", daemonset: bool = False, deleting: bool = False,
        exit_code: int | None = None) -> dict[str, Any]:
    labels = {names.LABEL_JOB_NAME: job, names.LABEL_JOB_ATTEMPT: "1", names.LABEL_JOB_RANK: "2"} if job else {}
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if daemonset:
        meta["ownerReferences"] = [{"kind": "DaemonSet", "name": "ds"}]
    if deleting:
        meta["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    resources = {"limits": {names.GPU_RESOURCE: str(gpus)}} if gpus else {}
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]
    return {"metadata": meta, "spec": {"nodeName": node, "containers": [{"name": "c", "resources": resources}]},
            "status": status}


def test_pods_keep_nodes_busy_unless_unbound_finished_or_a_daemonsets() -> None:
    index = PodIndex()

    def feed() -> None:
        index.replace_all(iter([pod("a", "n1"), pod("b"), pod("c", "n2", phase="Succeeded"),
                                pod("d", "n3", daemonset=True), pod("e", "n4"), pod("f", "n4")]))
        index.observe("DELETED", pod("e", "n4"))  # n4 stays busy with f
        index.observe("MODIFIED", pod("a", "n1", phase="Failed"))

    run_fed(index, feed)
    assert index.synced.is_set()
    assert {n for n in ("n1", "n2", "n3", "n4") if n in index.busy_nodes} == {"n4"}


def test_worker_pods_by_job_follow_their_events() -> None:
    index = PodIndex()

    def feed() -> None:
        index.replace_all(iter([pod("j-0", "n1", job="j", gpus=8), pod("j-1", "n2", job="j", gpus=8),
                                pod("k-0", "n1", namespace="other", job="k", gpus=4)]))
        index.observe("MODIFIED", pod("j-1", "n2", job="j", gpus=8, phase="Failed", exit_code=137))
        index.observe("MODIFIED", pod("j-0", "n1", job="j", gpus=8, deleting=True))
        index.observe("DELETED", pod("k-0", "n1", namespace="other", job="k", gpus=4))

    run_fed(index, feed)
    assert index.job_keys() == ["default/j"]  # other/k's only pod is gone
    workers = {w.name: w for w in index.workers("default/j")}
    assert workers["j-1"].phase == "Failed" and workers["j-1"].exit_code == 137
    assert workers["j-0"].terminating and workers["j-0"].gpus == 8 and workers["j-0"].node == "n1"
    assert (workers["j-0"].attempt, workers["j-0"].rank) == (1, 2)
    assert index.workers("other/k") == []


def test_gpus_held_by_other_pods_per_node() -> None:
    index = PodIndex()

    def feed() -> None:
        index.replace_all(iter([pod("x", "n1", gpus=2), pod("y", "n1", gpus=1, daemonset=True),
                                pod("w", "n1", job="j", gpus=8), pod("z", "n2", gpus=4),
                                pod("idle", "n3"), pod("done", "n3", gpus=4, phase="Succeeded")]))
        index.observe("MODIFIED", pod("z", "n2", gpus=4, phase="Failed"))

    run_fed(index, feed)
    # A DaemonSet's GPUs are held too; a worker's are its job's; finished pods hold none.
    assert index.foreign_gpus({"n1", "n2", "n3"}) == {"n1": 3}
    assert index.foreign_gpus({"n2"}) == {}


def test_a_fresh_pod_list_forgets_what_it_no_longer_holds() -> None:
    index = PodIndex()

    def feed() -> None:
        index.replace_all(iter([pod("a", "n1", job="j", gpus=8), pod("b", "n2", gpus=1)]))
        index.replace_all(iter([pod("c", "n3")]))

    run_fed(index, feed)
    assert index.job_keys() == []
    assert index.foreign_gpus({"n1", "n2", "n3"}) == {}
    assert "n1" not in index.busy_nodes and "n3" in index.busy_nodes
