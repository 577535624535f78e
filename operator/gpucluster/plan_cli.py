"""`gpucluster plan -f FILE`: what applying a TrainingCluster or TrainingJob
would do, against the live cluster, without writing anything.

The manifest is first sent to the API server as a dry run, so a schema or
CEL violation gets the very message `kubectl apply` would print. Then the
live nodes, pods and jobs are read and the operator's own planning
functions say what the change does: per pool the nodes created, drained and
deleted (named), the gangs that would be evicted and their GPU-hours, the
jobs that could no longer fit, the remediation budget; for a job, the
transition the lifecycle would make, and where the admission cycle would put
it now. Exit codes as `kubectl diff`: 0 no change, 1 changes, 2 an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from gpucluster import names
from gpucluster.api import cluster as cluster_api
from gpucluster.api import job as job_api
from gpucluster.kube.client import api_client
from gpucluster.planning.hostlist import hostlist
from gpucluster.timestamps import epoch

EXIT_NO_CHANGE, EXIT_CHANGES, EXIT_ERROR = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    plan = subparsers.add_parser("plan", help="what applying a manifest would do, without applying it",
                                 description=__doc__)
    plan.add_argument("-f", "--filename", required=True, type=Path, help="a TrainingCluster or TrainingJob")
    plan.add_argument("-o", "--output", choices=["table", "json"], default="table")
    plan.set_defaults(func=run)


class PlanError(Exception):
    pass


def _items(call: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """A list call's items as plain JSON (the client's models are slow and
    mostly Optional)."""
    items: list[dict[str, Any]] = json.loads(call(*args, _preload_content=False, **kwargs).data)["items"]
    return items


def _dry_run(custom: Any, manifest: dict[str, Any], plural: str,
             namespace: str | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Sends the manifest as a server-side dry run (create, or replace of the
    live object); returns the live object (None if it does not exist) and
    the object as the API server would store it (defaults filled in)."""
    name = manifest["metadata"]["name"]
    scope = (names.GROUP, names.VERSION) + ((namespace,) if namespace else ()) + (plural,)
    get: Any = custom.get_namespaced_custom_object if namespace else custom.get_cluster_custom_object
    replace: Any = custom.replace_namespaced_custom_object if namespace else custom.replace_cluster_custom_object
    create: Any = custom.create_namespaced_custom_object if namespace else custom.create_cluster_custom_object
    try:
        live: dict[str, Any] | None = get(*scope, name)
    except kubernetes.client.ApiException as err:
        if err.status != 404:
            raise PlanError(f"reading {plural}/{name}: {err.reason}") from err
        live = None
    try:
        if live is None:
            stored: dict[str, Any] = create(*scope, manifest, dry_run="All")
        else:
            body = {**manifest, "metadata": {**manifest["metadata"],
                                             "resourceVersion": live["metadata"]["resourceVersion"]}}
            stored = replace(*scope, name, body, dry_run="All")
    except kubernetes.client.ApiException as err:
        message = json.loads(err.body).get("message", err.reason) if err.body else err.reason
        raise PlanError(f"the API server refuses {manifest.get('kind')} {name}: {message}") from err
    return live, stored


def _observed_nodes(core: Any, cluster: str) -> dict[str, list[Any]]:
    from gpucluster.handlers.indexes import observe_node

    busy = set()
    for pod in _items(core.list_pod_for_all_namespaces, field_selector="spec.nodeName!="):
        owners = pod["metadata"].get("ownerReferences") or []
        if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed") \
                and not any(o.get("kind") == "DaemonSet" for o in owners):
            busy.add(pod["spec"]["nodeName"])
    by_pool: dict[str, list[Any]] = defaultdict(list)
    for item in _items(core.list_node, label_selector=f"{names.LABEL_CLUSTER}={cluster}"):
        meta = item["metadata"]
        node = observe_node(meta["name"], meta.get("labels") or {}, meta.get("annotations") or {},
                            item.get("spec") or {}, item.get("status") or {})
        by_pool[node.pool].append(dataclasses.replace(node, busy=node.name in busy))
    return by_pool


def _jobs_of(custom: Any, cluster: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = custom.list_cluster_custom_object(names.GROUP, names.VERSION,
                                                                   job_api.PLURAL)["items"]
    return [j for j in items if j["spec"].get("cluster") == cluster]


def plan_cluster(manifest: dict[str, Any], api: kubernetes.client.ApiClient) -> tuple[dict[str, Any], bool]:
    from gpucluster.handlers.cluster import shape_of
    from gpucluster.handlers.remediation import budget_of
    from gpucluster.planning.change import LiveGang, LiveJob, PoolDeclaration, plan_change
    from gpucluster.planning.jobs import ACTIVE_PHASES, FINISHED_PHASES, JobShape
    from gpucluster.planning.pools import StaticCandidate

    custom: Any = kubernetes.client.CustomObjectsApi(api)
    core: Any = kubernetes.client.CoreV1Api(api)
    live, stored = _dry_run(custom, manifest, cluster_api.PLURAL, None)
    name = manifest["metadata"]["name"]
    spec = cluster_api.TrainingClusterSpec.model_validate(manifest["spec"])
    declarations = []
    for pool in spec.pools:
        candidates: tuple[StaticCandidate, ...] = ()
        if pool.provider == cluster_api.Provider.STATIC:
            selector = ",".join(f"{k}={v}" for k, v in sorted((pool.nodeSelector or {}).items()))
            candidates = tuple(StaticCandidate(name=n["metadata"]["name"],
                                               claimed_by=(n["metadata"].get("labels") or {}).get(names.LABEL_CLUSTER))
                               for n in _items(core.list_node, label_selector=selector))
        declarations.append(PoolDeclaration(
            shape=shape_of(name, pool), budget=budget_of(pool), static_candidates=candidates,
            facts=pool.facts()))
    owned = _observed_nodes(core, name) if live is not None else {}
    gangs, jobs = [], []
    now = time.time()
    for job in _jobs_of(custom, name) if live is not None else []:
        status, spec_ = job.get("status") or {}, job["spec"]
        key = f"{job['metadata']['namespace']}/{job['metadata']['name']}"
        phase = status.get("phase")
        if phase in ACTIVE_PHASES:
            admitted = status.get("admittedAt")
            gangs.append(LiveGang(key=key, pool=status.get("pool", ""), nodes=frozenset(status.get("nodes") or ()),
                                  gpus=int(spec_["workers"]) * int(spec_["gpusPerWorker"]),
                                  admitted_at=epoch(admitted) if admitted else now))
        if phase not in FINISHED_PHASES or phase is None:
            topology = spec_.get("topology") or {}
            jobs.append(LiveJob(key=key, shape=JobShape(
                cluster=name, pool=spec_.get("pool"), gpu=spec_.get("gpu"), workers=int(spec_["workers"]),
                gpus_per_worker=int(spec_["gpusPerWorker"]), topology_level=topology.get("level"),
                topology_mode=topology.get("mode", "preferred"))))
    change = plan_change(declarations, owned, gangs, jobs, now)
    result = {
        "kind": cluster_api.KIND, "name": name, "exists": live is not None,
        "pools": [{"name": p.name, "nodesBefore": p.nodes_before, "nodesAfter": p.nodes_after,
                   "create": list(p.create), "drain": list(p.drain), "delete": list(p.delete),
                   "removed": p.removed, "evicted": dict(p.evicted),
                   "gpuHoursLost": round(sum(p.evicted.values()), 2),
                   "budget": {"unavailableNow": p.unavailable_now, "drainedByChange": len(p.drain),
                              "unavailableAllowed": p.unavailable_allowed}}
                  for p in change.pools],
        "unschedulable": dict(change.unschedulable),
    }
    return result, live is None or live.get("spec") != stored.get("spec") or change.changes


def plan_job(manifest: dict[str, Any], api: kubernetes.client.ApiClient) -> tuple[dict[str, Any], bool]:
    from gpucluster.handlers.indexes import observe_node
    from gpucluster.handlers.jobs import job_view
    from gpucluster.planning.jobs import JobShape, Problem, WorkerPod, choose_pool
    from gpucluster.planning.lifecycle import ClusterFacts, SpecJudged, admission_cycle, step

    custom: Any = kubernetes.client.CustomObjectsApi(api)
    core: Any = kubernetes.client.CoreV1Api(api)
    namespace = manifest["metadata"].get("namespace") or "default"
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    live, stored = _dry_run(custom, manifest, job_api.PLURAL, namespace)
    spec = manifest["spec"]
    cluster_name = spec["cluster"]
    try:
        tc = custom.get_cluster_custom_object(names.GROUP, names.VERSION, cluster_api.PLURAL, cluster_name)
    except kubernetes.client.ApiException:
        tc = None
    pools = [cluster_api.NodePool.model_validate(p).facts() for p in ((tc or {}).get("spec") or {}).get("pools", [])]
    topology = spec.get("topology") or {}
    chosen = choose_pool(JobShape(cluster=cluster_name, pool=spec.get("pool"), gpu=spec.get("gpu"),
                                  workers=int(spec["workers"]), gpus_per_worker=int(spec["gpusPerWorker"]),
                                  topology_level=topology.get("level"),
                                  topology_mode=topology.get("mode", "preferred")),
                         tc is not None, pools)
    priority = int(spec.get("priority") or 0)
    if spec.get("priorityClassName"):
        try:
            found: Any = kubernetes.client.SchedulingV1Api(api).read_priority_class(spec["priorityClassName"])
            priority = int(found.value)
        except kubernetes.client.ApiException:
            chosen = Problem("UnknownPriorityClass",
                             f"spec.priorityClassName: PriorityClass {spec['priorityClassName']!r} does not exist")
    outcome = chosen if isinstance(chosen, Problem) else (chosen.name, priority)
    now = time.time()
    source = live or {**manifest, "metadata": {**manifest["metadata"], "uid": "",
                                                "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime(now))}}
    view = job_view(namespace, manifest["metadata"]["name"], source["metadata"].get("uid", ""), source["metadata"],
                    spec if live is None else live["spec"], (live or {}).get("status") or {})
    transition = step(view, SpecJudged(outcome, int(spec["workers"]), int(spec["gpusPerWorker"]),
                                       int(source["metadata"].get("generation", 1)) + (1 if live else 0)), now)
    result: dict[str, Any] = {
        "kind": job_api.KIND, "name": f"{namespace}/{manifest['metadata']['name']}", "exists": live is not None,
        "phase": transition.status.get("phase", view.phase.value if view.phase else None),
        "reason": transition.status.get("reason", ""), "message": transition.status.get("message", ""),
        "endsRunningGang": transition.delete_pods,
    }
    after = transition.assume
    if after is not None and after.phase is not None and after.phase.value in ("Queued", "Restarting") and tc:
        nodes = []
        for item in _items(core.list_node, label_selector=f"{names.LABEL_CLUSTER}={cluster_name}"):
            meta = item["metadata"]
            nodes.append(observe_node(meta["name"], meta.get("labels") or {}, meta.get("annotations") or {},
                                      item.get("spec") or {}, item.get("status") or {}))
        views = [job_view(j["metadata"]["namespace"], j["metadata"]["name"], j["metadata"].get("uid", ""),
                          j["metadata"], j["spec"], j.get("status") or {})
                 for j in _jobs_of(custom, cluster_name) if (j.get("status") or {}).get("pool")]
        views = [v for v in views if v.key != after.key] + [after]
        pods: dict[str, list[WorkerPod]] = defaultdict(list)
        for pod in _items(core.list_pod_for_all_namespaces, label_selector=names.LABEL_JOB_NAME):
            meta, labels = pod["metadata"], pod["metadata"]["labels"]
            key = f"{meta['namespace']}/{labels[names.LABEL_JOB_NAME]}"
            pods[key].append(WorkerPod(name=meta["name"], job_key=key,
                                       attempt=int(labels.get(names.LABEL_JOB_ATTEMPT, 0)),
                                       rank=int(labels.get(names.LABEL_JOB_RANK, 0)),
                                       node=pod["spec"].get("nodeName", ""),
                                       phase=(pod.get("status") or {}).get("phase", "Pending"), gpus=0,
                                       terminating=bool(meta.get("deletionTimestamp"))))
        facts = ClusterFacts(nodes={n.name: n for n in nodes}, pods=pods, products={p.name: p.gpu for p in pools},
                             desired_nodes={p.name: p.nodes for p in pools})
        cycle = admission_cycle(views, facts, now, judge=())
        plan = cycle.plan
        if plan is not None and after.key in plan.admissions:
            result["admittedNow"] = sorted(set(plan.admissions[after.key]))
        elif plan is not None and after.key in plan.unschedulable:
            result["unschedulable"] = plan.unschedulable[after.key]
        elif plan is not None:
            result["queuePosition"] = plan.queue_positions.get(after.key, 0)
    changed = live is None or live.get("spec") != stored.get("spec")
    return result, changed


def _print_table(result: dict[str, Any]) -> None:
    print(f"{result['kind']} {result['name']} ({'changed' if result['exists'] else 'new'})")
    if result["kind"] == cluster_api.KIND:
        for pool in result["pools"]:
            print(f"  pool {pool['name']}: {pool['nodesBefore']} -> {pool['nodesAfter']} nodes"
                  + (" (pool leaves the spec)" if pool["removed"] else ""))
            for verb in ("create", "drain", "delete"):
                if pool[verb]:
                    print(f"    {verb} {len(pool[verb])}: {hostlist(pool[verb])}")
            for key, hours in pool["evicted"].items():
                print(f"    evicts gang {key}: {hours} GPU-hours since its admission")
            budget = pool["budget"]
            print(f"    remediation budget: {budget['unavailableNow']} out now, {budget['drainedByChange']} "
                  f"drained by this change, {budget['unavailableAllowed']} allowed")
        for key, why in result["unschedulable"].items():
            print(f"  job {key} could never run: {why}")
    else:
        print(f"  -> {result['phase']} ({result['reason']}): {result['message']}")
        if result["endsRunningGang"]:
            print("  ends the running gang: its pods are deleted")
        if "admittedNow" in result:
            print(f"  would be admitted now on {hostlist(result['admittedNow'])}")
        elif "queuePosition" in result:
            print(f"  would wait, position {result['queuePosition']} in its queue")
        elif "unschedulable" in result:
            print(f"  would never fit: {result['unschedulable']}")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = yaml.safe_load(args.filename.read_text())
    except (OSError, yaml.YAMLError) as err:
        print(f"error: {args.filename}: {err}", file=sys.stderr)
        return EXIT_ERROR
    kind = (manifest or {}).get("kind") if isinstance(manifest, dict) else None
    if kind not in (cluster_api.KIND, job_api.KIND):
        print(f"error: {args.filename}: expected a {cluster_api.KIND} or {job_api.KIND} manifest", file=sys.stderr)
        return EXIT_ERROR
    try:
        api = api_client()
        result, changed = (plan_cluster if kind == cluster_api.KIND else plan_job)(manifest, api)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return EXIT_CHANGES if changed else EXIT_NO_CHANGE
