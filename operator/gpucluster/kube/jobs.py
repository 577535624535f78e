"""The objects of a TrainingJob: one headless Service, one pod per worker
bound to the node the planner chose, and the job's status."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import kubernetes

from gpucluster import names
from gpucluster.api import job as api
from gpucluster.planning.torchrun import torchrun_env

from .client import call, call_raw, core, custom, status_of

# The node controller's taints for a node that is NotReady or unreachable.
NODE_DOWN_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def owner_reference(job: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": names.API_VERSION, "kind": api.KIND, "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def service_manifest(job: Mapping[str, Any]) -> dict[str, Any]:
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": job["metadata"]["namespace"],
                     "labels": {names.LABEL_JOB_NAME: name},
                     "ownerReferences": [owner_reference(job)]},
        # Headless, and published before the pods are ready: rank 0's name
        # must resolve while the workers are still rendezvousing.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {names.LABEL_JOB_NAME: name},
                 "ports": [{"name": "rendezvous",
                            "port": int(job["spec"].get("masterPort", api.DEFAULT_MASTER_PORT))}]},
    }


def pod_name(job_name: str, attempt: int, rank: int) -> str:
    return f"{job_name}-{attempt}-{rank}"


def pod_manifest(job: Mapping[str, Any], rank: int, node: str, attempt: int) -> dict[str, Any]:
    spec = job["spec"]
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    workers, gpus = int(spec["workers"]), int(spec["gpusPerWorker"])
    template = copy.deepcopy(spec["template"])
    pod_spec = template.get("spec", {})
    env = torchrun_env(name, namespace, rank, workers, gpus,
                       int(spec.get("masterPort", api.DEFAULT_MASTER_PORT)))
    for index, container in enumerate(pod_spec["containers"]):
        container["env"] = [e for e in container.get("env", []) if e["name"] not in {v["name"] for v in env}] + env
        if index == 0:
            resources = container.setdefault("resources", {})
            resources.setdefault("limits", {})[names.GPU_RESOURCE] = str(gpus)
            resources.setdefault("requests", {})[names.GPU_RESOURCE] = str(gpus)
    meta = template.get("metadata", {})
    labels = {**meta.get("labels", {}), names.LABEL_JOB_NAME: name, names.LABEL_JOB_RANK: str(rank),
              names.LABEL_JOB_ATTEMPT: str(attempt)}
    pod_spec.update({
        # Bound by the planner's decision: the default scheduler never places
        # a gang member, but it sees these pods' GPU requests on the node.
        "nodeName": node,
        "hostname": f"{name}-{rank}",
        "subdomain": name,
        "restartPolicy": "Never",
    })
    pod_spec.setdefault("tolerations", []).extend([
        {"key": names.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
        # A node that is NotReady or unreachable ends the gang by the job's own
        # rule (spec.nodeFailureGraceSeconds, planning/lifecycle.py), not by
        # the node controller's taint eviction 300 s after the taint, one
        # pod at a time: at 25,000 nodes that evicted workers of healthy gangs
        # from Ready nodes whose stale taints the busy node controller had
        # failed to take off, and it ignored a grace set longer than 300 s.
        *({"key": taint, "operator": "Exists", "effect": "NoExecute"} for taint in NODE_DOWN_TAINTS),
    ])
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(name, attempt, rank), "namespace": namespace, "labels": labels,
                     "annotations": meta.get("annotations", {}),
                     "ownerReferences": [owner_reference(job)]},
        "spec": pod_spec,
    }


async def create_gang(job: Mapping[str, Any], nodes: Sequence[str], attempt: int) -> None:
    """The Service (once) and one pod per rank; an object that already exists
    (a restart between create and status write) is taken as created."""
    namespace = job["metadata"]["namespace"]
    try:
        await call_raw(core().create_namespaced_service, namespace, service_manifest(job))
    except kubernetes.client.ApiException as err:
        if status_of(err) != 409:
            raise

    async def create_pod(rank: int, node: str) -> None:
        try:
            await call_raw(core().create_namespaced_pod, namespace, pod_manifest(job, rank, node, attempt))
        except kubernetes.client.ApiException as err:
            if status_of(err) != 409:
                raise

    # At once, as many as the client's threads allow: one by one, a 64-node
    # gang held its first GPUs for seconds before its last pod existed.
    await asyncio.gather(*(create_pod(rank, node) for rank, node in enumerate(nodes)))


async def delete_pods(namespace: str, pod_names: Iterable[str]) -> None:
    """Deletes pods by name, at once, as many as the client's threads allow
    (one already gone is fine). Not a deletecollection by the job's label:
    the API server deletes a collection one pod at a time, and at 25,000
    nodes a 256-worker gang's took longer than its 60 s request timeout,
    four times over, while the admission cycle waited on it."""

    async def delete(name: str) -> None:
        try:
            await call_raw(core().delete_namespaced_pod, name, namespace)
        except kubernetes.client.ApiException as err:
            if status_of(err) != 404:
                raise

    await asyncio.gather(*(delete(name) for name in sorted(set(pod_names))))


async def patch_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    await call(custom().patch_namespaced_custom_object_status, names.GROUP, names.VERSION, namespace,
               api.PLURAL, name, {"status": dict(status)})


async def read_job(namespace: str, name: str) -> Any:
    try:
        return await call(custom().get_namespaced_custom_object, names.GROUP, names.VERSION, namespace,
                          api.PLURAL, name)
    except kubernetes.client.ApiException as err:
        if status_of(err) == 404:
            return None
        raise


async def priority_class_value(class_name: str) -> int | None:
    try:
        found = await call(kubernetes.client.SchedulingV1Api(core().api_client).read_priority_class, class_name)
    except kubernetes.client.ApiException as err:
        if status_of(err) == 404:
            return None
        raise
    return None if found.value is None else int(found.value)
