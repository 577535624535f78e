"""The CRD schema and its CEL rules, on the real API server and nothing else:
no operator runs, so what is refused here is refused before any handler sees
it. Each bad manifest is one good manifest with one field spoiled; the API
server must answer 422 Invalid and name the field in the cause."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from gpucluster import names

pytestmark = pytest.mark.integration

DELETE = object()
GOOD_CLUSTER: dict[str, Any] = {
    "apiVersion": f"{names.GROUP}/{names.VERSION}", "kind": "TrainingCluster",
    "metadata": {"name": "schema"},
    "spec": {"pools": [
        {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": 4,
         "topology": {"nodesPerRack": 2, "racksPerBlock": 2},
         "labels": {"team": "pretraining", "example.com/tier": "gold_1.a", "empty": ""},
         "taints": [{"key": "example.com/dedicated", "value": "training", "effect": "NoSchedule"},
                    {"key": "spot", "effect": "PreferNoSchedule"}],
         "remediation": {"maxUnavailable": "100%", "maxPerWindow": 2, "windowSeconds": 600}},
        {"name": "h200", "gpu": "H200-141GB", "nodes": 2, "provider": "static",
         "nodeSelector": {"kubernetes.io/hostname": "gpu-0", "rack": "r1"},
         "remediation": {"maxUnavailable": 0}},
    ]},
}
GOOD_JOB: dict[str, Any] = {
    "apiVersion": f"{names.GROUP}/{names.VERSION}", "kind": "TrainingJob",
    "metadata": {"name": "schema"},
    "spec": {"cluster": "colossus", "pool": "h100", "workers": 2, "gpusPerWorker": 8,
             "topology": {"level": "block", "mode": "required"}, "priority": 10, "maxRestarts": 3,
             "template": {"spec": {"containers": [{"name": "trainer", "image": "pytorch",
                                                   "command": ["torchrun", "train.py"]}]}}},
}

QUALIFIED = "is not a qualified name: use an optional DNS-subdomain prefix"
LABEL_VALUE = "is not a label value: use at most 63 characters"
MAX_UNAVAILABLE = "is neither a node count of 0 or more (e.g. 2) nor a percent of the pool's nodes from 0% to 100%"
LABELS = ("spec", "pools", 0, "labels")
TAINT = ("spec", "pools", 0, "taints", 0)
REMEDIATION = ("spec", "pools", 0, "remediation")

# (path to the field, its bad value, the field the API server must name, a
# piece of the message). A path ending in a map key adds that key.
BAD_CLUSTERS: list[tuple[tuple[Any, ...], Any, str, str]] = [
    ((*LABELS, "bad key!"), "x", "spec.pools[0].labels", f'key "bad key!" {QUALIFIED}'),
    ((*LABELS, "-team"), "x", "spec.pools[0].labels", f'key "-team" {QUALIFIED}'),
    ((*LABELS, "team-"), "x", "spec.pools[0].labels", f'key "team-" {QUALIFIED}'),
    ((*LABELS, "a" * 64), "x", "spec.pools[0].labels", QUALIFIED),
    ((*LABELS, "a" * 254 + "/team"), "x", "spec.pools[0].labels", QUALIFIED),
    ((*LABELS, "Example.com/team"), "x", "spec.pools[0].labels", f'key "Example.com/team" {QUALIFIED}'),
    ((*LABELS, "example..com/team"), "x", "spec.pools[0].labels", QUALIFIED),
    ((*LABELS, "a/b/c"), "x", "spec.pools[0].labels", f'key "a/b/c" {QUALIFIED}'),
    ((*LABELS, "example.com/"), "x", "spec.pools[0].labels", QUALIFIED),
    ((*LABELS, "team"), "not a label value", "spec.pools[0].labels[team]",
     f'"not a label value" {LABEL_VALUE}'),
    ((*LABELS, "team"), "-x", "spec.pools[0].labels[team]", LABEL_VALUE),
    ((*LABELS, "team"), "a" * 64, "spec.pools[0].labels.team", "Too long: may not be more than 63"),
    (("spec", "pools", 1, "nodeSelector", "bad key!"), "x", "spec.pools[1].nodeSelector",
     f'key "bad key!" {QUALIFIED}'),
    (("spec", "pools", 1, "nodeSelector", "rack"), "r 1", "spec.pools[1].nodeSelector[rack]", LABEL_VALUE),
    ((*TAINT, "key"), "bad key!", "spec.pools[0].taints[0].key", f'"bad key!" {QUALIFIED}'),
    ((*TAINT, "key"), "example.com/" + "a" * 64, "spec.pools[0].taints[0].key", QUALIFIED),
    ((*TAINT, "key"), "", "spec.pools[0].taints[0].key", "should be at least 1 chars long"),
    ((*TAINT, "value"), "training!", "spec.pools[0].taints[0].value", f'"training!" {LABEL_VALUE}'),
    ((*TAINT, "effect"), "NoRun", "spec.pools[0].taints[0].effect", 'Unsupported value: "NoRun"'),
    ((*TAINT, "effect"), DELETE, "spec.pools[0].taints[0].effect", "Required value"),
    ((*REMEDIATION, "maxUnavailable"), "150%", "spec.pools[0].remediation.maxUnavailable", MAX_UNAVAILABLE),
    ((*REMEDIATION, "maxUnavailable"), "101%", "spec.pools[0].remediation.maxUnavailable", MAX_UNAVAILABLE),
    ((*REMEDIATION, "maxUnavailable"), "-5%", "spec.pools[0].remediation.maxUnavailable", MAX_UNAVAILABLE),
    ((*REMEDIATION, "maxUnavailable"), "10", "spec.pools[0].remediation.maxUnavailable", MAX_UNAVAILABLE),
    ((*REMEDIATION, "maxUnavailable"), "ten%", "spec.pools[0].remediation.maxUnavailable", MAX_UNAVAILABLE),
    ((*REMEDIATION, "maxUnavailable"), -1, "spec.pools[0].remediation.maxUnavailable", MAX_UNAVAILABLE),
    ((*REMEDIATION, "windowSeconds"), 0, "spec.pools[0].remediation.windowSeconds", "should be greater than"),
    (("spec", "pools", 0, "name"), "H100", "spec.pools[0].name", "should match"),
    (("spec", "pools", 0, "topology", "nodesPerRack"), 0, "spec.pools[0].topology.nodesPerRack",
     "should be greater than or equal to 1"),
]

BAD_JOBS: list[tuple[tuple[Any, ...], Any, str, str]] = [
    (("spec", "pool"), "H100!", "spec.pool", "should match"),
    (("spec", "gpu"), "A100-40GB", "spec.gpu", 'Unsupported value: "A100-40GB"'),
    (("spec", "cluster"), "", "spec.cluster", "should be at least 1 chars long"),
    (("spec", "workers"), 0, "spec.workers", "should be greater than or equal to 1"),
    (("spec", "workers"), 8193, "spec.workers", "should be less than or equal to 8192"),
    (("spec", "gpusPerWorker"), 9, "spec.gpusPerWorker", "should be less than or equal to 8"),
    (("spec", "topology", "level"), "row", "spec.topology.level", 'Unsupported value: "row"'),
    (("spec", "topology", "mode"), "strict", "spec.topology.mode", 'Unsupported value: "strict"'),
    (("spec", "maxRestarts"), -1, "spec.maxRestarts", "should be greater than or equal to 0"),
    (("spec", "nodeFailureGraceSeconds"), 3601, "spec.nodeFailureGraceSeconds", "should be less than"),
    (("spec", "masterPort"), 70000, "spec.masterPort", "should be less than or equal to 65535"),
    (("spec", "activeDeadlineSeconds"), 0, "spec.activeDeadlineSeconds", "should be greater than"),
    (("spec", "priorityClassName"), "high", "spec", "set spec.priority or spec.priorityClassName, not both"),
    (("spec", "pool"), DELETE, "spec", "set spec.pool (a pool of the TrainingCluster) or spec.gpu"),
    (("spec", "template", "spec", "containers"), [], "spec.template.spec.containers",
     "should have at least 1 items"),
    (("metadata", "name"), "a" * 41, "<nil>", "metadata.name must be a DNS label of at most 40 characters"),
]

IMMUTABLE_WHILE_ACTIVE = ("spec.pool, spec.gpu and spec.topology are immutable while the job is Admitted "
                          "or Running: delete and recreate the job, or wait until it ends")


def mutated(manifest: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def case_id(case: tuple[tuple[Any, ...], Any, str, str]) -> str:
    path, value, _, _ = case
    shown = "deleted" if value is DELETE else json.dumps(value)
    return ".".join(str(step) for step in path) + "=" + (shown if len(shown) < 24 else shown[:20] + "...")


class Server:
    """The API server through the Python client, which shows the HTTP status
    and the Status body that kubectl folds into one line."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        self.client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.namespace = namespace

    def create(self, manifest: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
        extra = {"dry_run": "All"} if dry_run else {}
        if manifest["kind"] == "TrainingCluster":
            return dict(self.custom.create_cluster_custom_object(
                names.GROUP, names.VERSION, "trainingclusters", manifest, **extra))
        return dict(self.custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, "trainingjobs", manifest, **extra))

    def patch_job(self, name: str, patch: dict[str, Any], status: bool = False) -> dict[str, Any]:
        method = (self.custom.patch_namespaced_custom_object_status if status
                  else self.custom.patch_namespaced_custom_object)
        return dict(method(names.GROUP, names.VERSION, self.namespace, "trainingjobs", name, patch,
                           _content_type="application/merge-patch+json"))


def refusal(call: Any) -> dict[str, Any]:
    """Runs `call`, which must be refused as Invalid; returns the Status."""
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    assert refused.value.status == 422, refused.value.body
    return dict(json.loads(refused.value.body))


@pytest.fixture(scope="module")
def server(crds: None, kubeconfig: str) -> Iterator[Server]:
    """One namespace for the module's jobs, deleted with them at the end."""
    namespace = f"schema-{uuid.uuid4().hex[:5]}"
    server = Server(kubeconfig, namespace)
    core = kubernetes.client.CoreV1Api(server.client)
    core.create_namespace({"metadata": {"name": namespace}})
    yield server
    core.delete_namespace(namespace)


def test_the_good_manifests_are_accepted(server: Server) -> None:
    cluster = server.create(GOOD_CLUSTER)
    assert cluster["spec"]["pools"][0]["remediation"]["maxUnavailable"] == "100%"
    job = server.create(GOOD_JOB)
    assert job["spec"]["masterPort"] == 29500, "defaults are applied"


@pytest.mark.parametrize(("path", "value", "field", "message"), BAD_CLUSTERS, ids=map(case_id, BAD_CLUSTERS))
def test_a_bad_training_cluster_is_refused_with_the_field_named(
        server: Server, path: tuple[Any, ...], value: Any, field: str, message: str) -> None:
    status = refusal(lambda: server.create(mutated(GOOD_CLUSTER, path, value)))
    causes = status["details"]["causes"]
    assert any(c.get("field") == field and message in c["message"] for c in causes), causes


@pytest.mark.parametrize(("path", "value", "field", "message"), BAD_JOBS, ids=map(case_id, BAD_JOBS))
def test_a_bad_training_job_is_refused_with_the_field_named(
        server: Server, path: tuple[Any, ...], value: Any, field: str, message: str) -> None:
    status = refusal(lambda: server.create(mutated(GOOD_JOB, path, value)))
    causes = status["details"]["causes"]
    assert any(c.get("field", "<nil>") == field and message in c["message"] for c in causes), causes


def job_in_phase(server: Server, phase: str | None) -> str:
    """A real TrainingJob whose status says `phase` (None: no status yet), as
    the operator would have written it through the status subresource."""
    name = f"job-{uuid.uuid4().hex[:5]}"
    server.create(mutated(GOOD_JOB, ("metadata", "name"), name), dry_run=False)
    if phase is not None:
        # An operator running in the same session judges the new job once (it
        # has no cluster: Failed); let that write land first, or it would
        # overwrite the phase set here.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (server.custom.get_namespaced_custom_object(
                names.GROUP, names.VERSION, server.namespace, "trainingjobs", name).get("status") or {}).get("phase"):
            time.sleep(0.5)
        server.patch_job(name, {"status": {"phase": phase}}, status=True)
    return name


@pytest.mark.parametrize("phase", ["Admitted", "Running"])
@pytest.mark.parametrize("change", [{"pool": "h200"}, {"pool": None, "gpu": "H200-141GB"},
                                    {"topology": {"level": "rack", "mode": "required"}},
                                    {"topology": None}], ids=["pool", "gpu", "topology", "no-topology"])
def test_where_a_gang_runs_is_immutable_while_it_holds_gpus(
        server: Server, phase: str, change: dict[str, Any]) -> None:
    name = job_in_phase(server, phase)
    status = refusal(lambda: server.patch_job(name, {"spec": change}))
    assert status["details"]["causes"] == [
        {"reason": "FieldValueForbidden", "field": "spec", "message": f"Forbidden: {IMMUTABLE_WHILE_ACTIVE}"}]
    # What may change still does, and the operator's status writes still pass.
    assert server.patch_job(name, {"spec": {"priority": 20, "maxRestarts": 5}})["spec"]["priority"] == 20
    written = server.patch_job(name, {"status": {"phase": "Running", "workersReady": "2/2", "gpus": 16}},
                               status=True)
    assert written["status"]["workersReady"] == "2/2"


@pytest.mark.parametrize("phase", [None, "Queued", "Restarting", "Failed", "Succeeded"])
def test_a_job_that_holds_no_gpus_may_move(server: Server, phase: str | None) -> None:
    name = job_in_phase(server, phase)
    moved = server.patch_job(name, {"spec": {"pool": None, "gpu": "H200-141GB", "topology": None}})
    assert moved["spec"]["gpu"] == "H200-141GB"
    assert "pool" not in moved["spec"] and "topology" not in moved["spec"]


def test_the_gangs_shape_stays_immutable_in_every_phase(server: Server) -> None:
    name = job_in_phase(server, "Queued")
    status = refusal(lambda: server.patch_job(name, {"spec": {"workers": 4}}))
    assert "spec.cluster, spec.workers and spec.gpusPerWorker are immutable" in status["message"]
