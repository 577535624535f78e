"""Failover between operator replicas with Kopf peering: the standby takes
over within seconds of a SIGKILL of the active replica, and the replicas never
write at once. Each replica is a cluster admin of its own name, so the API
server's audit log says which one made every write."""

from __future__ import annotations

import datetime
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpucluster import devcluster

from .harness import REPO_ROOT, Kubectl, OperatorProcess, wait_for
from .test_trainingcluster import nodes_of, pool, training_cluster, wait_ready

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(os.environ.get("GPUCLUSTER_KUBECONFIG")),
                       reason="needs the test cluster's own PKI and audit log"),
]

TAKEOVER_S = 15


class Replica(OperatorProcess):
    """`gpucluster run --peering` under a name of its own: the peering's
    identity (POD_ID, as in the chart) and the client certificate's user."""

    def __init__(self, cluster: devcluster.ClusterState, peering: str, name: str, log_dir: Path,
                 *args: str) -> None:
        self.user = f"gpucluster-{peering}-{name}"  # unique in the session's audit log
        log_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(devcluster.admin_kubeconfig_as(cluster, self.user), log_dir,
                         extra_args=("--peering", peering, *args), extra_env={"POD_ID": name})
        self.name = name


@pytest.fixture()
def peering(kubectl: Kubectl, crds: None, operator: OperatorProcess) -> Iterator[str]:
    """A ClusterKopfPeering of the test's own; the session's standalone
    operator is stopped meanwhile (it would act beside the replicas)."""
    name = f"failover-{uuid.uuid4().hex[:5]}"
    kubectl.run("apply", "-f", str(REPO_ROOT / "helm" / "gpucluster" / "crds" / "kopf.dev_peerings.yaml"))
    kubectl.run("wait", "--for=condition=Established", "--timeout=30s", "crd/clusterkopfpeerings.kopf.dev")
    kubectl.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}})
    session_was_running = operator.proc is not None and operator.proc.poll() is None
    operator.stop()
    try:
        yield name
    finally:
        kubectl.run("delete", "clusterkopfpeering", name, check=False)
        if session_was_running:
            operator.start()


def start_replica(replica: Replica, kubectl: Kubectl, peering: str) -> None:
    """Starts a replica and waits for its keep-alive. A replica starts paused
    and stays so while a live peer has a higher priority: under the default
    priorities, a replica started beside a leader is its standby."""
    replica.start()
    # Generous: a Python process's start, not the handover, on a loaded machine.
    wait_for(lambda: replica.name in (kubectl.get("clusterkopfpeering", peering).get("status") or {}),
             timeout=120, what=f"{replica.name}'s keep-alive in {peering}; log: {replica.log_path}")


def scale(kubectl: Kubectl, name: str, nodes: int) -> None:
    kubectl.run("patch", "tc", name, "--type=json",
                "-p", json.dumps([{"op": "replace", "path": "/spec/pools/0/nodes", "value": nodes}]))


def test_the_standby_takes_over_within_seconds_of_a_kill(
        kubectl: Kubectl, cluster: devcluster.ClusterState, peering: str, tmp_path: Path) -> None:
    active = Replica(cluster, peering, "a", tmp_path / "a")
    standby = Replica(cluster, peering, "b", tmp_path / "b")
    name = f"failover-{uuid.uuid4().hex[:5]}"
    try:
        start_replica(active, kubectl, peering)
        kubectl.apply(training_cluster(name, pool(nodes=2)))
        wait_ready(kubectl, name, 2)
        start_replica(standby, kubectl, peering)

        active.kill()
        killed = time.monotonic()
        scale(kubectl, name, 4)
        wait_for(lambda: len(nodes_of(kubectl, name)) == 4, timeout=TAKEOVER_S,
                 what=f"the standby to create the new nodes; log: {standby.log_path}")
        print(f"failover: the standby created the nodes {time.monotonic() - killed:.1f} s after the kill")
        wait_ready(kubectl, name, 4)
        assert "Resuming operations after the pause" in standby.log_path.read_text()
    finally:
        kubectl.run("delete", "tc", name, "--timeout=50s", check=False)
        standby.stop()
        active.stop()


def audited_writes(cluster: devcluster.ClusterState, users: set[str]) -> list[dict[str, Any]]:
    """The users' writes in the audit log, in the order the API server got
    them; keep-alives in the peering object are not writes to the cluster."""
    writes = []
    for line in Path(cluster.audit_log).read_text().splitlines():
        event = json.loads(line)
        if event["user"]["username"] in users and event["stage"] == "ResponseComplete" \
                and event["objectRef"].get("apiGroup") != "kopf.dev":
            writes.append(event)
    return sorted(writes, key=lambda e: e["requestReceivedTimestamp"])


def stamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def test_replicas_never_write_at_once(
        kubectl: Kubectl, cluster: devcluster.ClusterState, peering: str, tmp_path: Path) -> None:
    """Three handovers: two kills (the standby, a fresh process, takes over)
    and a replica of higher priority joining (the leader pauses, and exits
    rather than ever resume on indexes that missed the other's writes)."""
    a = Replica(cluster, peering, "a", tmp_path / "a")
    b = Replica(cluster, peering, "b", tmp_path / "b")
    c = Replica(cluster, peering, "c", tmp_path / "c", "--priority", "1")
    name = f"writers-{uuid.uuid4().hex[:5]}"
    handovers: list[tuple[str, float]] = []  # (the replica leading from then on, since when)
    try:
        start_replica(a, kubectl, peering)
        handovers.append((a.user, time.time()))
        kubectl.apply(training_cluster(name, pool(nodes=2)))
        wait_ready(kubectl, name, 2)
        start_replica(b, kubectl, peering)

        a.kill()
        handovers.append((b.user, time.time()))
        scale(kubectl, name, 3)
        wait_ready(kubectl, name, 3, timeout=TAKEOVER_S + 30)
        start_replica(a, kubectl, peering)  # a fresh process, younger than b: it stands by

        b.kill()
        handovers.append((a.user, time.time()))
        scale(kubectl, name, 4)
        wait_ready(kubectl, name, 4, timeout=TAKEOVER_S + 30)

        handovers.append((c.user, time.time()))
        start_replica(c, kubectl, peering)
        wait_for(lambda: a.proc is not None and a.proc.poll() is not None, timeout=TAKEOVER_S,
                 what=f"the paused leader to exit; log: {a.log_path}")
        assert a.proc is not None and a.proc.returncode == 75, a.log_tail()
        scale(kubectl, name, 5)
        wait_ready(kubectl, name, 5, timeout=TAKEOVER_S + 30)
    finally:
        kubectl.run("delete", "tc", name, "--timeout=50s", check=False)
        for replica in (a, b, c):
            replica.stop()

    writes = audited_writes(cluster, {a.user, b.user, c.user})
    turns: list[list[dict[str, Any]]] = []
    for write in writes:
        if not turns or turns[-1][0]["user"]["username"] != write["user"]["username"]:
            turns.append([])
        turns[-1].append(write)
    summary = [(turn[0]["user"]["username"], len(turn)) for turn in turns]
    print(f"writes by replica, turn by turn: {summary}")
    assert [user for user, _ in summary] == [user for user, _ in handovers], f"writers interleave: {summary}"
    for turn, (user, since) in zip(turns, handovers, strict=True):
        assert stamp(turn[0]) >= since, f"{user} wrote before its turn (a standby wrote)"
    creates = [w for w in writes if w["verb"] == "create" and w["objectRef"]["resource"] == "nodes"]
    assert [w["objectRef"]["name"] for w in creates if w["responseStatus"]["code"] == 409] == [], \
        "a replica taking over re-created nodes that existed"
    assert len(creates) == 5
