"""TrainingJob handlers.

A submitted job is checked once against its cluster (pool, size, topology)
and queued. Everything after that happens in one loop per TrainingCluster,
Kueue's way: read a snapshot from the indexes, judge the running gangs
(restart, fail, succeed), decide one admission cycle with the pure planner,
apply, and let the next cycle see the result. One loop per cluster means the
decisions of a cluster are serialised: no two of them race for a GPU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
import kubernetes

from gpucluster import metrics, names
from gpucluster.api import cluster as cluster_api
from gpucluster.api import job as api
from gpucluster.kube import jobs as kube_jobs
from gpucluster.kube.client import call, custom, status_of
from gpucluster.planning.conditions import ConditionUpdate, merge_conditions
from gpucluster.planning.jobs import (
    ACTIVE_PHASES,
    WAITING_PHASES,
    Action,
    JobShape,
    JobView,
    Phase,
    PoolFacts,
    Problem,
    Verdict,
    WorkerPod,
    admission_inputs,
    choose_pool,
    judge_gang,
    node_usable,
)
from gpucluster.planning.pools import ObservedNode
from gpucluster.planning.scheduling import plan_admissions
from gpucluster.timestamps import epoch, rfc3339

CYCLE_INTERVAL_S = 1.0
# Reasons of a Failed phase that an edit of the spec can cure.
FIXABLE_REASONS = frozenset({"UnknownCluster", "UnknownPool", "UnknownGPU", "GPUMismatch",
                             "TooManyGPUsPerWorker", "LargerThanPool", "TopologyNeverFits",
                             "UnknownPriorityClass", "Unschedulable"})

# `gpucluster run -n GLOB ...`: TrainingJobs are served only in matching
# namespaces (empty: all). The operator still watches cluster-wide, since
# TrainingClusters and Nodes are cluster-scoped.
served_namespaces: list[str] = []


def in_served_namespace(namespace: str | None, **_: Any) -> bool:
    return not served_namespaces or any(fnmatch.fnmatchcase(namespace or "", glob) for glob in served_namespaces)


# Decisions applied but not yet seen in the index (its watch lags the
# writes by a moment): the next cycle trusts these instead. Kueue calls them
# assumed workloads.
_assumed: dict[str, JobView] = {}


def _epoch(timestamp: str | None) -> float | None:
    return epoch(timestamp) if timestamp else None


def job_view(namespace: str, name: str, uid: str, meta: Any, spec: Any, status: Any) -> JobView | None:
    if not status or not status.get("pool"):
        return None
    topology = spec.get("topology") or {}
    return JobView(
        key=f"{namespace}/{name}", namespace=namespace, name=name, uid=uid, cluster=spec["cluster"],
        pool=status["pool"], priority=int(status.get("priority", 0)),
        arrival=_epoch(meta.get("creationTimestamp")) or 0.0,
        workers=int(spec["workers"]), gpus_per_worker=int(spec["gpusPerWorker"]),
        phase=Phase(status.get("phase", Phase.QUEUED)), attempt=int(status.get("attempt", 0)),
        restarts=int(status.get("restarts", 0)), max_restarts=int(spec.get("maxRestarts", 3)),
        nodes=tuple(status.get("nodes") or ()), excluded_nodes=frozenset(status.get("excludedNodes") or ()),
        topology_level=topology.get("level"), topology_mode=topology.get("mode", "preferred"),
        first_admitted_at=_epoch(status.get("firstAdmittedAt")),
        deadline_seconds=spec.get("activeDeadlineSeconds"),
        queue_position=int(status.get("queuePosition", 0)),
        workers_ready=status.get("workersReady", ""),
        reason=status.get("reason", ""),
    )


@kopf.index(names.GROUP, names.VERSION, api.PLURAL, when=in_served_namespace)
def jobs_by_cluster(*, namespace: str | None, name: str, uid: str, meta: Any, spec: Any, status: Any,
                    **_: Any) -> dict[str, JobView] | None:
    view = job_view(namespace or "", name, uid, meta, spec, status)
    return {view.cluster: view} if view else None


def _gpu_request(pod_spec: Any) -> int:
    total = 0
    for container in pod_spec.get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(names.GPU_RESOURCE) or (
            resources.get("requests") or {}).get(names.GPU_RESOURCE)
        total += int(value or 0)
    return total


@kopf.index("pods", labels={names.LABEL_JOB_NAME: kopf.PRESENT})
def workers_by_job(*, namespace: str | None, name: str, labels: Any, meta: Any, spec: Any, status: Any,
                   **_: Any) -> dict[str, WorkerPod]:
    terminated: dict[str, Any] = next((s["state"]["terminated"] for s in (status or {}).get("containerStatuses") or []
                       if (s.get("state") or {}).get("terminated")), {})
    pod = WorkerPod(
        name=name, job_key=f"{namespace}/{labels[names.LABEL_JOB_NAME]}",
        attempt=int(labels.get(names.LABEL_JOB_ATTEMPT, 0)), rank=int(labels.get(names.LABEL_JOB_RANK, 0)),
        node=spec.get("nodeName", ""), phase=(status or {}).get("phase", "Pending"),
        gpus=_gpu_request(spec), terminating=bool(meta.get("deletionTimestamp")),
        exit_code=terminated.get("exitCode"), reason=terminated.get("reason", ""),
    )
    return {pod.job_key: pod}


@kopf.index("pods")
def foreign_gpus_by_node(*, labels: Any, spec: Any, status: Any, **_: Any) -> dict[str, int] | None:
    """GPUs that pods of no TrainingJob hold, per node."""
    node = spec.get("nodeName")
    if not node or names.LABEL_JOB_NAME in labels or (status or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    gpus = _gpu_request(spec)
    return {node: gpus} if gpus else None


def _reference(view: JobView) -> Any:
    return {"apiVersion": names.API_VERSION, "kind": api.KIND,
            "metadata": {"name": view.name, "namespace": view.namespace, "uid": view.uid}}


async def _set_status(namespace: str, name: str, body_status: Mapping[str, Any], generation: int,
                      condition: ConditionUpdate | None = None, **fields: Any) -> None:
    status = {**fields}
    if condition is not None:
        status["conditions"] = merge_conditions(body_status.get("conditions") or [], [condition],
                                                rfc3339(time.time()), generation)
    await kube_jobs.patch_status(namespace, name, status)


# --- submission: checked once, then queued -------------------------------------------------------


async def _check(spec: Any) -> tuple[PoolFacts, int] | Problem:
    tc: Any
    try:
        tc = await call(custom().get_cluster_custom_object, names.GROUP, names.VERSION,
                        cluster_api.PLURAL, spec["cluster"])
    except kubernetes.client.ApiException as err:
        if status_of(err) != 404:
            raise kopf.TemporaryError(f"reading TrainingCluster {spec['cluster']}: {err}", delay=5) from err
        tc = None
    pools = [PoolFacts(name=p["name"], gpu=p["gpu"], gpus_per_node=int(p.get("gpusPerNode", 8)),
                       nodes=int(p["nodes"]), nodes_per_rack=int((p.get("topology") or {}).get("nodesPerRack", 4)),
                       racks_per_block=int((p.get("topology") or {}).get("racksPerBlock", 8)))
             for p in ((tc or {}).get("spec") or {}).get("pools", [])]
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
    return chosen, int(priority or 0)


@kopf.on.resume(names.GROUP, names.VERSION, api.PLURAL, when=in_served_namespace)
@kopf.on.create(names.GROUP, names.VERSION, api.PLURAL, when=in_served_namespace)
@kopf.on.update(names.GROUP, names.VERSION, api.PLURAL, field="spec", when=in_served_namespace)
async def job_submitted(*, name: str, namespace: str | None, body: Any, spec: Any, status: Any, meta: Any,
                        reason: str, **_: Any) -> None:
    assert namespace is not None, "TrainingJob is namespaced"
    phase = status.get("phase")
    generation = int(meta.get("generation", 0))
    if reason == "resume" and phase:
        return
    if phase == Phase.FAILED and status.get("reason") not in FIXABLE_REASONS:
        return
    if phase in (Phase.SUCCEEDED,):
        return
    checked = await _check(spec)
    if isinstance(checked, Problem):
        kopf.warn(body, reason=checked.reason, message=checked.message)
        await _set_status(namespace, name, status, generation,
                          ConditionUpdate("Admitted", False, checked.reason, checked.message),
                          phase=Phase.FAILED, reason=checked.reason, message=checked.message,
                          observedGeneration=generation, completedAt=rfc3339(time.time()))
        return
    pool, priority = checked
    fields: dict[str, Any] = {"pool": pool.name, "priority": priority, "observedGeneration": generation}
    if not phase or phase == Phase.FAILED:
        fields.update(phase=Phase.QUEUED, reason="Queued", message=f"waiting for {spec['workers']} x "
                      f"{spec['gpusPerWorker']} GPUs in pool {pool.name}", completedAt="",
                      gpus=0, workersReady=f"0/{spec['workers']}")
        kopf.info(body, reason="Queued", message=f"queued in pool {pool.name} at priority {priority}")
    await _set_status(namespace, name, status, generation,
                      ConditionUpdate("Admitted", False, "Queued", "waiting for GPUs")
                      if fields.get("phase") == Phase.QUEUED else None, **fields)


# --- the per-cluster loop ------------------------------------------------------------------------


def _current_views(jobs: Iterable[JobView]) -> list[JobView]:
    """The index's views, with this process's newer decisions in their place."""
    views = []
    for view in jobs:
        assumed = _assumed.get(view.key)
        if assumed is not None:
            seen = (view.attempt, view.phase not in WAITING_PHASES)
            if seen >= (assumed.attempt, assumed.phase not in WAITING_PHASES):
                del _assumed[view.key]
            else:
                view = assumed
        views.append(view)
    return views


async def _finish_gang(view: JobView, verdict: Verdict, now: float) -> None:
    """Applies what judge_gang decided for an admitted gang."""
    ref = _reference(view)
    job = await kube_jobs.read_job(view.namespace, view.name)
    if job is None:
        return
    status, generation = job.get("status") or {}, int(job["metadata"].get("generation", 0))
    ready = f"{verdict.workers_running}/{view.workers}"
    if verdict.action is Action.MARK_RUNNING:
        kopf.info(ref, reason="Running", message=f"all {view.workers} workers running")
        await _set_status(view.namespace, view.name, status, generation,
                          ConditionUpdate("Running", True, verdict.reason, verdict.message),
                          phase=Phase.RUNNING, reason=verdict.reason, message=verdict.message, workersReady=ready)
        _assumed[view.key] = dataclasses.replace(view, phase=Phase.RUNNING)
    elif verdict.action is Action.SUCCEED:
        kopf.info(ref, reason="Succeeded", message=verdict.message)
        await _set_status(view.namespace, view.name, status, generation,
                          ConditionUpdate("Finished", True, "Succeeded", verdict.message),
                          phase=Phase.SUCCEEDED, reason=verdict.reason, message=verdict.message,
                          completedAt=rfc3339(now), workersReady=ready, gpus=0)
        _assumed[view.key] = dataclasses.replace(view, phase=Phase.SUCCEEDED)
    elif verdict.action is Action.FAIL:
        kopf.warn(ref, reason=verdict.reason, message=verdict.message)
        await kube_jobs.delete_gang(view.namespace, view.name)
        await _set_status(view.namespace, view.name, status, generation,
                          ConditionUpdate("Finished", True, "Failed", f"{verdict.reason}: {verdict.message}"),
                          phase=Phase.FAILED, reason=verdict.reason, message=verdict.message,
                          completedAt=rfc3339(now), workersReady=f"0/{view.workers}", gpus=0)
        _assumed[view.key] = dataclasses.replace(view, phase=Phase.FAILED)
    elif verdict.action is Action.RESTART:
        metrics.gang_restarts_total.labels(view.cluster, verdict.reason).inc()
        excluded = sorted(view.excluded_nodes | verdict.exclude)
        kopf.warn(ref, reason="GangRestart",
                  message=f"{verdict.message}: restarting all {view.workers} workers "
                          f"(restart {view.restarts + 1} of {view.max_restarts})"
                          + (f", avoiding {', '.join(sorted(verdict.exclude))}" if verdict.exclude else ""))
        await _requeue(dataclasses.replace(view, phase=Phase.RESTARTING, restarts=view.restarts + 1,
                                           excluded_nodes=frozenset(excluded)),
                       status, generation, ConditionUpdate("Running", False, verdict.reason, verdict.message),
                       verdict.message, now)
    elif ready != view.workers_ready:
        await _set_status(view.namespace, view.name, status, generation, workersReady=ready)


async def _requeue(view: JobView, status: Mapping[str, Any], generation: int, condition: ConditionUpdate,
                   message: str, now: float) -> None:
    """Ends the gang's current attempt and puts the job back in its queue
    (after a restart or a preemption): `view` carries the new phase,
    restarts and exclusions; the attempt moves on by one."""
    await kube_jobs.delete_gang(view.namespace, view.name)
    await _set_status(view.namespace, view.name, status, generation, condition,
                      phase=view.phase, reason=condition.reason, message=message, attempt=view.attempt + 1,
                      restarts=view.restarts, nodes=[], excludedNodes=sorted(view.excluded_nodes),
                      workersReady=f"0/{view.workers}", gpus=0, queuedAt=rfc3339(now))
    _assumed[view.key] = dataclasses.replace(view, attempt=view.attempt + 1, nodes=())


async def _admit(view: JobView, nodes: tuple[str, ...], now: float) -> None:
    job = await kube_jobs.read_job(view.namespace, view.name)
    if job is None:
        return
    await kube_jobs.create_gang(job, nodes, view.attempt)
    status, generation = job.get("status") or {}, int(job["metadata"].get("generation", 0))
    distinct = list(dict.fromkeys(nodes))
    message = f"{view.workers} workers x {view.gpus_per_worker} GPUs on {len(distinct)} nodes"
    waited = now - (_epoch(status.get("queuedAt")) or view.arrival)
    metrics.admission_wait_seconds.labels(view.cluster).observe(max(0.0, waited))
    kopf.info(_reference(view), reason="Admitted", message=f"{message}: {', '.join(distinct[:8])}"
                                                         + (" ..." if len(distinct) > 8 else ""))
    first = status.get("firstAdmittedAt") or rfc3339(now)
    await _set_status(view.namespace, view.name, status, generation,
                      ConditionUpdate("Admitted", True, "Admitted", message),
                      phase=Phase.ADMITTED, reason="Admitted", message=message, nodes=list(nodes),
                      admittedAt=rfc3339(now), firstAdmittedAt=first, queuePosition=0,
                      gpus=view.gpus, workersReady=f"0/{view.workers}")
    _assumed[view.key] = dataclasses.replace(view, phase=Phase.ADMITTED, nodes=nodes,
                                             first_admitted_at=_epoch(first))


async def _preempt(victim: JobView, preemptor: str, now: float) -> None:
    metrics.preemptions_total.labels(victim.cluster).inc()
    message = f"preempted to admit higher-priority job {preemptor}"
    kopf.warn(_reference(victim), reason="Preempted", message=message)
    job = await kube_jobs.read_job(victim.namespace, victim.name)
    if job is None:
        return
    await _requeue(dataclasses.replace(victim, phase=Phase.QUEUED), job.get("status") or {},
                   int(job["metadata"].get("generation", 0)),
                   ConditionUpdate("Admitted", False, "Preempted", message), message, now)


def _export_queue_metrics(cluster: str, views: list[JobView], now: float) -> None:
    waiting = [v for v in views if v.phase in WAITING_PHASES]
    metrics.queue_depth.labels(cluster).set(len(waiting))
    metrics.queue_oldest_wait_seconds.labels(cluster).set(max((now - v.arrival for v in waiting), default=0))
    for phase in Phase:
        metrics.jobs.labels(cluster, phase.value).set(sum(1 for v in views if v.phase == phase))


def _export_allocation_metrics(cluster: str, spec: Any, nodes: list[ObservedNode], views: list[JobView],
                               foreign: Mapping[str, int]) -> None:
    """GPUs allocated to admitted gangs and free for the next one, per pool."""
    for pool in spec.get("pools", []):
        usable = [n for n in nodes if n.pool == pool["name"] and node_usable(n)]
        allocated = sum(v.gpus for v in views if v.pool == pool["name"] and v.phase in ACTIVE_PHASES)
        held_elsewhere = sum(foreign.get(n.name, 0) for n in usable)
        labels = (cluster, pool["name"], pool["gpu"])
        metrics.pool_gpus.labels(*labels, "allocated").set(allocated)
        metrics.pool_gpus.labels(*labels, "free").set(max(0, sum(n.gpus for n in usable) - allocated - held_elsewhere))


def _forget_deleted(cluster: str, seen: Iterable[JobView]) -> None:
    """Drops decisions about jobs that left the index (deleted)."""
    keys = {v.key for v in seen}
    for key in [k for k, v in _assumed.items() if v.cluster == cluster and k not in keys]:
        del _assumed[key]


@kopf.timer(names.GROUP, names.VERSION, cluster_api.PLURAL, interval=CYCLE_INTERVAL_S,  # type: ignore[arg-type]
            id="admission")
async def admission_loop(*, name: str, spec: Any, jobs_by_cluster: kopf.Index[str, JobView],
                         workers_by_job: kopf.Index[str, WorkerPod],
                         nodes_by_cluster: kopf.Index[str, ObservedNode],
                         foreign_gpus_by_node: kopf.Index[str, int], **_: Any) -> None:
    now = time.time()
    indexed = list(jobs_by_cluster.get(name, []))
    _forget_deleted(name, indexed)
    views = _current_views(indexed)
    nodes = list(nodes_by_cluster.get(name, []))
    foreign = {n.name: sum(foreign_gpus_by_node.get(n.name, [])) for n in nodes}
    _export_queue_metrics(name, views, now)
    _export_allocation_metrics(name, spec, nodes, views, foreign)
    if not views:
        return
    node_by_name = {n.name: n for n in nodes}
    for view in views:
        if view.phase in ACTIVE_PHASES:
            verdict = judge_gang(view, list(workers_by_job.get(view.key, [])), node_by_name, now)
            if verdict.action is not Action.NONE or verdict.workers_running != int(
                    (view.workers_ready or "0/").split("/")[0] or 0):
                await _finish_gang(view, verdict, now)
    views = _current_views(indexed)
    if not any(v.phase in WAITING_PHASES for v in views):
        return
    products = {p["name"]: p["gpu"] for p in spec.get("pools", [])}
    pods = [p for v in views for p in workers_by_job.get(v.key, [])]
    snapshot_nodes, running, pending = admission_inputs(views, nodes, pods, products, foreign)
    started = time.perf_counter()
    plan = plan_admissions(snapshot_nodes, running, pending, now=now)
    metrics.admission_decision_seconds.labels(name).observe(time.perf_counter() - started)
    by_key = {v.key: v for v in views}
    for preemption in plan.preemptions:
        await _preempt(by_key[preemption.victim], preemption.preemptor, now)
        kopf.info(_reference(by_key[preemption.preemptor]), reason="Preempting",
                  message=f"evicting {preemption.victim} to make room")
    for key, placement in plan.admissions.items():
        await _admit(by_key[key], placement, now)
    desired = {p["name"]: int(p["nodes"]) for p in spec.get("pools", [])}
    present: dict[str, int] = {}
    for node in nodes:
        present[node.pool] = present.get(node.pool, 0) + 1
    for key, why in plan.unschedulable.items():
        view = by_key[key]
        if present.get(view.pool, 0) < desired.get(view.pool, 0):
            # The pool is still growing: "never fits" is not final until it is whole.
            message = f"waiting for pool {view.pool} to reach its size: {why}"
            if view.reason != "WaitingForNodes":
                await kube_jobs.patch_status(view.namespace, view.name, {"reason": "WaitingForNodes",
                                                                         "message": message})
            continue
        kopf.warn(_reference(view), reason="Unschedulable", message=why)
        await kube_jobs.patch_status(view.namespace, view.name, {
            "phase": Phase.FAILED, "reason": "Unschedulable", "message": why,
            "completedAt": rfc3339(now), "queuePosition": 0})
        _assumed[key] = dataclasses.replace(view, phase=Phase.FAILED)
    for key, position in plan.queue_positions.items():
        if by_key[key].queue_position != position:
            await kube_jobs.patch_status(by_key[key].namespace, by_key[key].name, {"queuePosition": position})
