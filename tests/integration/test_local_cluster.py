"""The local cluster keeps KWOK nodes Ready as a real cluster keeps its
kubelets' nodes Ready: on node Leases renewed every few seconds, with the
Node status itself posted only every few minutes.

KWOK used to post node status about every 10 minutes and renew no Lease, so
every node went NotReady once the controller manager's grace (then 180 s)
ran out, all in the same second. This test watches fresh nodes past that
point and measures, from watches, the Lease renewals and the status posts
against the rates hack/kwok.yaml configures. The session's cluster runs two
KWOK controllers, and the nodes here are spread over every bucket of them
(and a few in none): each must be kept Ready by the controller it falls to."""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kubernetes
import pytest
import urllib3
import yaml
from gpucluster import devcluster
from gpucluster.names import KWOK_SHARD_BUCKETS, LABEL_KWOK_SHARD

from .harness import Kubectl, wait_for

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
NODES = 100
UNSHARDED = 4
# From the nodes' creation: past the old flap (180 s), and two minutes into
# the first status posts, which come 150 s to 450 s after a node's last
# status write.
WATCH_S = 270


@dataclass(frozen=True)
class Configured:
    lease_duration_s: float
    status_min_s: float
    status_max_s: float

    @property
    def lease_renew_s(self) -> float:
        """KWOK renews a node's Lease every quarter of its duration, as the kubelet does."""
        return self.lease_duration_s / 4

    @classmethod
    def read(cls) -> Configured:
        docs = list(yaml.safe_load_all(devcluster.KWOK_CONFIG.read_text()))
        options = next(d for d in docs if d["kind"] == "KwokConfiguration")["options"]
        heartbeat = next(d for d in docs if d["kind"] == "Stage" and d["metadata"]["name"] == "node-heartbeat")
        delay = heartbeat["spec"]["delay"]
        return cls(lease_duration_s=options["nodeLeaseDurationSeconds"],
                   status_min_s=delay["durationMilliseconds"] / 1000,
                   status_max_s=delay["jitterDurationMilliseconds"] / 1000)


def ready(node: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in node.get("status", {}).get("conditions") or [] if c["type"] == "Ready"), None)


# KWOK can initialize a new node twice: it plays node-initialize for each
# event of the node that comes before its first patch lands.
SETTLE_S = 10.0


@dataclass
class NodeLog:
    """What the node watch saw of one node: when its status was last
    written, and the status posts that followed (KWOK's delay counts from
    its last write). Other writers' changes do not restart that delay and
    are not counted: a KWOK post 10 s after another writer's change was
    once taken for a post 10 s after the node's last change (likely the
    TTL controller, which annotates every node when the shared cluster's
    node count crosses 100 as other tests' nodes come and go)."""

    status_written: float = 0.0
    ready_since: float | None = None
    last_heartbeat: str | None = None
    posts: list[tuple[float, float]] = field(default_factory=list)  # (at, since the write before)
    not_ready: list[str] = field(default_factory=list)

    def see(self, at: float, node: dict[str, Any]) -> None:
        condition = ready(node)
        beat = condition.get("lastHeartbeatTime") if condition else None
        if condition and condition["status"] == "True":
            if self.ready_since is None:
                self.ready_since = at
            elif beat != self.last_heartbeat and at - self.ready_since > SETTLE_S:
                self.posts.append((at, at - self.status_written))
        elif self.ready_since is not None:
            self.not_ready.append(f"{condition and condition['status']} at {at:.0f} s")
        if beat != self.last_heartbeat:
            self.status_written = at
        self.last_heartbeat = beat


class Watcher:
    """Records a list call's watch events (time, raw object) on a thread."""

    def __init__(self, list_call: Callable[..., Any], on_event: Callable[[float, dict[str, Any]], None],
                 t0: float, **kwargs: Any) -> None:
        self.watch = kubernetes.watch.Watch()
        self.stopping = threading.Event()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(list_call, on_event, t0, kwargs), daemon=True)
        self.thread.start()

    def _run(self, list_call: Callable[..., Any], on_event: Callable[[float, dict[str, Any]], None],
             t0: float, kwargs: dict[str, Any]) -> None:
        try:
            for event in self.watch.stream(list_call, timeout_seconds=WATCH_S + 120, **kwargs):
                if event["type"] in ("ADDED", "MODIFIED"):
                    on_event(time.monotonic() - t0, event["raw_object"])
            if not self.stopping.is_set():
                self.error = RuntimeError("the watch ended early")
        except urllib3.exceptions.HTTPError as err:
            # Closing the client ends a stopped watch's read with an error.
            if not self.stopping.is_set():
                self.error = err

    def stop(self) -> None:
        self.stopping.set()
        self.watch.stop()


@pytest.fixture
def api(kubeconfig: str) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    yield client
    client.close()


@pytest.mark.timeout(WATCH_S + 120)
def test_nodes_stay_ready_on_leases_at_the_configured_rates(
        kubectl: Kubectl, api: kubernetes.client.ApiClient) -> None:
    configured = Configured.read()
    names = [f"local-{RUN}-{i}" for i in range(NODES)]
    wanted = set(names)
    nodes: dict[str, NodeLog] = defaultdict(NodeLog)
    renewals: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    def on_node(at: float, node: dict[str, Any]) -> None:
        with lock:
            nodes[node["metadata"]["name"]].see(at, node)

    def on_lease(at: float, lease: dict[str, Any]) -> None:
        if lease["metadata"]["name"] in wanted:
            with lock:
                renewals[lease["metadata"]["name"]].append(at)

    t0 = time.monotonic()
    watchers = [
        Watcher(kubernetes.client.CoreV1Api(api).list_node, on_node, t0, label_selector=f"local-cluster-test={RUN}"),
        Watcher(kubernetes.client.CoordinationV1Api(api).list_namespaced_lease, on_lease, t0,
                namespace="kube-node-lease"),
    ]
    # Nodes in every KWOK bucket, as the operator labels them, and a few with
    # none (made by hand): each has a KWOK controller that keeps it Ready.
    buckets = {name: str(i % KWOK_SHARD_BUCKETS) for i, name in enumerate(names[UNSHARDED:])}
    kubectl.apply({"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"type": "kwok", "local-cluster-test": RUN,
                                **({LABEL_KWOK_SHARD: buckets[name]} if name in buckets else {})}},
    } for name in names]})
    try:
        wait_for(lambda: sum(n.ready_since is not None for n in nodes.values()) == NODES, timeout=60,
                 what=f"{NODES} KWOK nodes Ready")
        all_ready = time.monotonic() - t0
        time.sleep(max(0.0, WATCH_S - all_ready))
    finally:
        for watcher in watchers:
            watcher.stop()
        kubectl.run("delete", "node", "-l", f"local-cluster-test={RUN}", "--wait=false", check=False)
    end = time.monotonic() - t0
    assert not (broken := [w.error for w in watchers if w.error]), f"watches broke: {broken}"

    with lock:
        flaps = {name: log.not_ready for name, log in nodes.items() if log.not_ready}
        assert not flaps, f"nodes went NotReady: {flaps}"

        # Leases: every node's renewals at the configured interval, and
        # none so late that the Lease expired meanwhile.
        window = (all_ready + configured.lease_renew_s, end)
        counted = [sum(window[0] <= at < window[1] for at in renewals[name]) for name in names]
        rate = sum(counted) / NODES / (window[1] - window[0])
        assert rate == pytest.approx(1 / configured.lease_renew_s, rel=0.15), (
            f"Lease renewals {rate:.3f}/s per node; configured 1/{configured.lease_renew_s:.0f} s")
        gaps = [b - a for name in names for a, b in zip(renewals[name], renewals[name][1:], strict=False)]
        assert max(gaps) < configured.lease_duration_s, (
            f"a Lease renewal came {max(gaps):.0f} s after the one before (median "
            f"{statistics.median(gaps):.1f} s), past the Lease's {configured.lease_duration_s:.0f} s")

        # Status posts: each within the configured delay after the node's
        # last status write, and as many by the end as that delay predicts. The
        # wait is uniform, so a node whose wait began at c has posted by the
        # end with chance (end - c - min) / spread, clamped to [0, 1].
        slack_s = 5.0
        lo, hi = configured.status_min_s, configured.status_max_s
        posts = [since for name in names for _, since in nodes[name].posts]
        for since in posts:
            assert lo - slack_s <= since <= hi + slack_s, (
                f"a status post {since:.0f} s after the node's last status write; configured {lo:.0f}-{hi:.0f} s")
        began = [log.posts[0][0] - log.posts[0][1] if log.posts else log.status_written
                 for log in (nodes[name] for name in names)]
        chances = [min(1.0, max(0.0, (end - c - lo) / (hi - lo))) for c in began]
        expected = sum(chances)
        sigma = math.sqrt(sum(p * (1 - p) for p in chances))
        exposure = sum(chances) * (hi - lo)
        print(f"{NODES} nodes over {end:.0f} s: Lease renewals {rate:.4f}/s per node (median gap "
              f"{statistics.median(gaps):.1f} s, longest {max(gaps):.1f} s); {len(posts)} status posts, "
              f"expected {expected:.1f} ± {4 * sigma:.1f}, {min(posts, default=0):.0f}-{max(posts, default=0):.0f} s "
              "after the node's last status write")
        assert abs(len(posts) - expected) <= 4 * sigma + 1, (
            f"{len(posts)} status posts by {end:.0f} s ({len(posts) / exposure * NODES:.2f}/s for "
            f"{NODES} nodes), expected {expected:.1f} ± {4 * sigma:.1f} ({NODES / (hi - lo):.2f}/s: "
            f"every {lo:.0f}-{hi:.0f} s)")
