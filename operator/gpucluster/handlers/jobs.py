"""TrainingJob handlers: read, call the lifecycle, apply.

Every phase change of a job is decided by planning.lifecycle.step. Two
handlers feed it: `job_submitted` judges a new or edited spec against its
cluster, and `admission_loop` runs one cycle per TrainingCluster every
second, Kueue's way: read a snapshot from the indexes, judge the gangs, plan
the admissions, apply, and let the next cycle see the result. Both take the
cluster's lock, so the decisions of a cluster are serialised: no two of them
race for a GPU or for a job's phase. A job's first judgement is the one
exception: no cycle can see that job yet.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Container, Iterable, Mapping
from typing import Any

import kopf
import kubernetes

from gpucluster import metrics, names
from gpucluster.api import cluster as cluster_api
from gpucluster.api import job as api
from gpucluster.handlers.indexes import PodIndex
from gpucluster.handlers.state import OperatorState, state_of
from gpucluster.kube import jobs as kube_jobs
from gpucluster.kube.client import CONCURRENCY, call, custom, status_of
from gpucluster.planning.conditions import merge_conditions
from gpucluster.planning.jobs import (
    ACTIVE_PHASES,
    WAITING_PHASES,
    JobShape,
    JobView,
    Phase,
    Problem,
    WorkerPod,
    choose_pool,
    node_usable,
)
from gpucluster.planning.lifecycle import (
    Assumed,
    ClusterFacts,
    SpecJudged,
    Transition,
    admission_cycle,
    overlay_assumed,
    step,
)
from gpucluster.planning.pools import ObservedNode
from gpucluster.timestamps import epoch, rfc3339

CYCLE_INTERVAL_S = 1.0
# A plan whose inputs did not change is skipped, but not for longer than
# this: preemption ranks gangs by GPU-hours, which grow with time alone.
REPLAN_INTERVAL_S = 30.0


def in_served_namespace(namespace: str | None, memo: Any, **_: Any) -> bool:
    return state_of(memo).serves(namespace)


def _epoch(timestamp: str | None) -> float | None:
    return epoch(timestamp) if timestamp else None


def job_view(namespace: str, name: str, uid: str, meta: Any, spec: Any, status: Any) -> JobView:
    status = status or {}
    topology = spec.get("topology") or {}
    return JobView(
        key=f"{namespace}/{name}", namespace=namespace, name=name, uid=uid, cluster=spec["cluster"],
        pool=status.get("pool", ""), priority=int(status.get("priority", 0)),
        arrival=_epoch(meta.get("creationTimestamp")) or 0.0,
        workers=int(spec["workers"]), gpus_per_worker=int(spec["gpusPerWorker"]),
        phase=Phase(status["phase"]) if status.get("phase") else None, attempt=int(status.get("attempt", 0)),
        restarts=int(status.get("restarts", 0)), max_restarts=int(spec.get("maxRestarts", 3)),
        nodes=tuple(status.get("nodes") or ()), excluded_nodes=frozenset(status.get("excludedNodes") or ()),
        topology_level=topology.get("level"), topology_mode=topology.get("mode", "preferred"),
        first_admitted_at=_epoch(status.get("firstAdmittedAt")),
        deadline_seconds=spec.get("activeDeadlineSeconds"),
        queue_position=int(status.get("queuePosition", 0)),
        starts_by=status.get("startsBy") or "",
        workers_ready=status.get("workersReady", ""),
        reason=status.get("reason", ""), message=status.get("message", ""),
        queued_at=_epoch(status.get("queuedAt")),
        node_failure_grace_s=float(spec.get("nodeFailureGraceSeconds", api.DEFAULT_NODE_FAILURE_GRACE_S)),
    )


@kopf.index(names.GROUP, names.VERSION, api.PLURAL, when=in_served_namespace)
def jobs_by_cluster(*, namespace: str | None, name: str, uid: str, meta: Any, spec: Any, status: Any,
                    **_: Any) -> dict[str, JobView] | None:
    """Jobs judged at least once (they have a pool), by cluster."""
    view = job_view(namespace or "", name, uid, meta, spec, status)
    return {view.cluster: view} if view.pool else None


def _gang_pods(pods: PodIndex, view: JobView) -> set[str]:
    """The job's worker pods, every attempt the pod index holds, and the
    current attempt's by name too: pods created a moment ago may not be in
    the index yet."""
    return {p.name for p in pods.workers(view.key)} | {
        kube_jobs.pod_name(view.name, view.attempt, rank) for rank in range(view.workers)}


def _reference(view: JobView) -> Any:
    return {"apiVersion": names.API_VERSION, "kind": api.KIND,
            "metadata": {"name": view.name, "namespace": view.namespace, "uid": view.uid}}


async def _apply(state: OperatorState, view: JobView, transition: Transition, now: float) -> None:
    """Carries out one transition of planning.lifecycle.step."""
    if transition.delete_pods:
        await kube_jobs.delete_pods(view.namespace, _gang_pods(state.pods, view))
    status = dict(transition.status)
    if transition.create_pods or transition.condition is not None:
        job = await kube_jobs.read_job(view.namespace, view.name)
        if job is None:
            return
        if transition.create_pods:
            await kube_jobs.create_gang(job, transition.create_pods, view.attempt)
        if transition.condition is not None:
            status["conditions"] = merge_conditions(
                (job.get("status") or {}).get("conditions") or [], [transition.condition], rfc3339(now),
                int(job["metadata"].get("generation", 0)))
    if status:
        await kube_jobs.patch_status(view.namespace, view.name, status)
    if transition.note is not None:
        (kopf.warn if transition.note.warning else kopf.info)(
            _reference(view), reason=transition.note.reason, message=transition.note.message)
    if transition.restart_reason:
        metrics.gang_restarts_total.labels(view.cluster, transition.restart_reason).inc()
    if transition.preempted:
        metrics.preemptions_total.labels(view.cluster).inc()
    if transition.waited_s is not None:
        metrics.admission_wait_seconds.labels(view.cluster).observe(transition.waited_s)
    if transition.assume is not None:
        state.assumed_jobs[view.key] = Assumed(transition.assume, now)


# --- submission and edits ------------------------------------------------------------------------


async def _judge(spec: Any) -> tuple[str, int] | Problem:
    """The pool and priority of a spec, or why it can't run: the reads the
    pure checks need, then the checks."""
    tc: Any
    try:
        tc = await call(custom().get_cluster_custom_object, names.GROUP, names.VERSION,
                        cluster_api.PLURAL, spec["cluster"])
    except kubernetes.client.ApiException as err:
        if status_of(err) != 404:
            raise kopf.TemporaryError(f"reading TrainingCluster {spec['cluster']}: {err}", delay=5) from err
        tc = None
    pools = [cluster_api.NodePool.model_validate(p).facts() for p in ((tc or {}).get("spec") or {}).get("pools", [])]
    topology = spec.get("topology") or {}
    chosen = choose_pool(JobShape(cluster=spec["cluster"], pool=spec.get("pool"), gpu=spec.get("gpu"),
                                  workers=int(spec["workers"]), gpus_per_worker=int(spec["gpusPerWorker"]),
                                  topology_level=topology.get("level"),
                                  topology_mode=topology.get("mode", "preferred")),
                         tc is not None, pools)
    if isinstance(chosen, Problem):
        return chosen
    priority = spec.get("priority")
    if spec.get("priorityClassName"):
        priority = await kube_jobs.priority_class_value(spec["priorityClassName"])
        if priority is None:
            return Problem("UnknownPriorityClass",
                           f"spec.priorityClassName: PriorityClass {spec['priorityClassName']!r} does not exist")
    return chosen.name, int(priority or 0)


@kopf.on.resume(names.GROUP, names.VERSION, api.PLURAL, when=in_served_namespace)
@kopf.on.create(names.GROUP, names.VERSION, api.PLURAL, when=in_served_namespace)
@kopf.on.update(names.GROUP, names.VERSION, api.PLURAL, field="spec", when=in_served_namespace)
async def job_submitted(*, name: str, namespace: str | None, uid: str, spec: Any, status: Any, meta: Any,
                        reason: str, memo: Any, **_: Any) -> None:
    assert namespace is not None, "TrainingJob is namespaced"
    if reason == "resume" and status.get("phase"):
        return
    state = state_of(memo)
    judged = SpecJudged(await _judge(spec), int(spec["workers"]), int(spec["gpusPerWorker"]),
                        int(meta.get("generation", 0)))

    async def judge() -> None:
        now = time.time()
        view = job_view(namespace, name, uid, meta, spec, status)
        decided = _decision_about(state, view.key, uid)
        if decided is not None and decided.view.attempt >= view.attempt:
            view = decided.view  # a decision the event's body predates
        await _apply(state, view, step(view, judged, now), now)

    if _never_judged(state, namespace, name, uid, status):
        # No cycle can act on it: the job index (the cycle's only source of
        # jobs) takes a job once it has a pool, which this judgement gives it.
        # Waiting for the cluster's lock here made every submission wait for
        # a cycle's writes: at 25,000 nodes, one judged every 2 s.
        await judge()
        return
    async with state.job_lock(spec["cluster"]):
        await judge()


def _never_judged(state: OperatorState, namespace: str, name: str, uid: str, status: Any) -> bool:
    """No phase in the body and no decision of this process about this job."""
    return not (status or {}).get("phase") and _decision_about(state, f"{namespace}/{name}", uid) is None


def _decision_about(state: OperatorState, key: str, uid: str) -> Assumed | None:
    """This process's last decision about the job, not yet in its index; one
    about a deleted job of the same name is not this job's."""
    decided = state.assumed_jobs.get(key)
    return decided if decided is not None and decided.view.uid == uid else None


# --- the per-cluster cycle -----------------------------------------------------------------------


def _export_queue_metrics(cluster: str, views: list[JobView], now: float) -> None:
    waiting = [v for v in views if v.phase in WAITING_PHASES]
    metrics.queue_depth.labels(cluster).set(len(waiting))
    metrics.queue_oldest_wait_seconds.labels(cluster).set(max((now - v.arrival for v in waiting), default=0))
    for phase in Phase:
        metrics.jobs.labels(cluster, phase.value).set(sum(1 for v in views if v.phase == phase))


def _export_allocation_metrics(cluster: str, spec: Any, nodes: Mapping[str, ObservedNode], views: list[JobView],
                               foreign: Mapping[str, int]) -> None:
    """GPUs allocated to admitted gangs and free for the next one, per pool.
    One pass over the nodes: it runs every second, over 25,000 of them."""
    usable: Counter[str] = Counter()
    for node in nodes.values():
        if node_usable(node):
            usable[node.pool] += node.gpus
    for name, held in foreign.items():
        if node_usable(node := nodes[name]):
            usable[node.pool] -= held
    allocated: Counter[str] = Counter()
    for view in views:
        if view.phase in ACTIVE_PHASES:
            allocated[view.pool] += view.gpus
    for pool in spec.get("pools", []):
        labels = (cluster, pool["name"], pool["gpu"])
        metrics.pool_gpus.labels(*labels, "allocated").set(allocated[pool["name"]])
        metrics.pool_gpus.labels(*labels, "free").set(max(0, usable[pool["name"]] - allocated[pool["name"]]))


def _worker_pods(views: Iterable[JobView], names_: Container[str], index: PodIndex) -> dict[str, list[WorkerPod]]:
    """Worker pods by job: the cluster's jobs, and jobs gone from the index
    whose pods are still on the cluster's nodes (`names_`)."""
    keys = {v.key for v in views}
    pods = {key: index.workers(key) for key in keys}
    for key in index.job_keys():
        if key not in keys:
            stray = [p for p in index.workers(key) if p.node in names_]
            if stray:
                pods[key] = stray
    return pods


@kopf.timer(names.GROUP, names.VERSION, cluster_api.PLURAL, interval=CYCLE_INTERVAL_S,  # type: ignore[arg-type]
            id="admission")
async def admission_loop(*, name: str, spec: Any, memo: Any, jobs_by_cluster: kopf.Index[str, JobView],
                         **_: Any) -> None:
    state = state_of(memo)
    await state.synced()
    async with state.job_lock(name):
        now = time.time()
        indexed = list(jobs_by_cluster.get(name, []))
        others = {k: a for k, a in state.assumed_jobs.items() if a.view.cluster != name}
        views, kept = overlay_assumed(indexed, state.assumed_jobs, now)
        state.assumed_jobs = {**others, **kept}
        by_name = state.nodes.by_name(name)
        foreign = state.pods.foreign_gpus(by_name)
        _export_queue_metrics(name, views, now)
        _export_allocation_metrics(name, spec, by_name, views, foreign)
        pods = _worker_pods(views, by_name, state.pods)
        if not views and not pods:
            return
        facts = ClusterFacts(nodes=by_name, pods=pods,
                             products={p["name"]: p["gpu"] for p in spec.get("pools", [])},
                             desired_nodes={p["name"]: int(p["nodes"]) for p in spec.get("pools", [])},
                             foreign_gpus=foreign)
        last = state.last_plans.get(name)
        fresh = last is not None and now - last[1] < REPLAN_INTERVAL_S
        started = time.perf_counter()
        try:
            # In a thread: at 25,000 nodes a cycle takes 0.6 to 2.4 s of
            # Python, once a second, and on the event loop it held back every
            # node event and remediation pass for as long. Its inputs are
            # copies, and the cache is the cycle's alone (under the lock).
            cycle = await asyncio.to_thread(admission_cycle, views, facts, now,
                                            unchanged_since=last[0] if last and fresh else None,
                                            cache=state.planner_cache(name), clock=time.perf_counter)
        except Exception:
            state.planner_caches.pop(name, None)  # one that failed half-way may have left it half-updated
            raise
        if cycle.plan is not None:
            metrics.admission_decision_seconds.labels(name).observe(time.perf_counter() - started)
            per_job = metrics.job_decision_seconds.labels(name)
            for seconds in cycle.plan.decision_seconds:
                per_job.observe(seconds)
            state.last_plans[name] = (cycle.inputs, now)
        for orphan in cycle.orphans:
            namespace = orphan.split("/", 1)[0]
            if state.serves(namespace):
                await kube_jobs.delete_pods(namespace, (p.name for p in state.pods.workers(orphan)))
        await _apply_all(state, cycle.transitions, now)


async def _apply_all(state: OperatorState, transitions: Iterable[tuple[JobView, Transition]], now: float) -> None:
    """Carries out a cycle's transitions: each job's in order, different
    jobs' side by side. One at a time, a cycle that moved 400 queue
    positions on a loaded API server held the cluster's lock for a minute,
    and every submission waited behind it."""
    by_job: dict[str, list[tuple[JobView, Transition]]] = {}
    for view, transition in transitions:
        by_job.setdefault(view.key, []).append((view, transition))
    slots = asyncio.Semaphore(CONCURRENCY)

    async def apply_job(steps: list[tuple[JobView, Transition]]) -> None:
        async with slots:
            for view, transition in steps:
                await _apply(state, view, transition, now)

    outcomes = await asyncio.gather(*(apply_job(steps) for steps in by_job.values()), return_exceptions=True)
    failed = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
    if failed is not None:
        raise failed
