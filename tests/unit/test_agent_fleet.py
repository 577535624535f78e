"""Fleet mode against an in-memory API: which nodes it plays, that it writes
only on change, and that it stays cheap at thousands of nodes."""

from __future__ import annotations

import json
import time
from typing import Any

import kubernetes
import pytest
from gpucluster.agent import fleet as fleet_module
from gpucluster.agent.exporter import DcgmCollector
from gpucluster.agent.fleet import Fleet, FleetRunner, fleet_watcher, gpu_count
from gpucluster.agent.injection import ANNOTATION_INJECT_FAULT
from gpucluster.agent.nodestatus import MemoryNodeClient, gpu_condition_of
from gpucluster.kube import watch as watch_module
from gpucluster.kube.watch import ListWatcher, list_items
from gpucluster.names import (
    ANNOTATION_HEALTHY_GPUS,
    ANNOTATION_KWOK_NODE,
    ANNOTATION_UNHEALTHY_GPUS,
    LABEL_GPU_COUNT,
    LABEL_GPU_PRODUCT,
)

H100 = "NVIDIA-H100-80GB-HBM3"
H200 = "NVIDIA-H200"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def kwok_node(name: str, product: str | None = H100, count: int | None = 8,
              kwok: bool = True, **annotations: str) -> dict[str, Any]:
    labels = {}
    if product is not None:
        labels[LABEL_GPU_PRODUCT] = product
    if count is not None:
        labels[LABEL_GPU_COUNT] = str(count)
    if kwok:
        annotations[ANNOTATION_KWOK_NODE] = "fake"
    return {"metadata": {"name": name, "labels": labels, "annotations": annotations,
                         "resourceVersion": "1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class World:
    """The API server's nodes, a fleet watching them, and the watch events."""

    def __init__(self, *nodes: dict[str, Any]) -> None:
        self.clock = Clock()
        self.api = MemoryNodeClient(nodes)
        self.fleet = Fleet(self.api, clock=self.clock)
        self.fleet.replace_all([self.api.get(name) for name in self.api.nodes])

    def settle(self) -> int:
        """Evaluate, drain the writes, echo them back as watch events; the
        number of writes it took."""
        before = len(self.api.writes)
        self.fleet.evaluate()
        written = set()
        while self.fleet.write_next(timeout=0):
            pass
        for name, _ in self.api.writes[before:]:
            written.add(name)
        for name in sorted(written):
            self.fleet.observe("MODIFIED", self.api.get(name))
        return len(self.api.writes) - before

    def annotate(self, name: str, value: str | None) -> None:
        """Someone (kubectl) changes a node: the API changes, the watch tells."""
        self.api.annotate(name, {ANNOTATION_INJECT_FAULT: value})
        self.fleet.observe("MODIFIED", self.api.get(name))

    def condition(self, name: str) -> dict[str, Any]:
        return self.condition_of(self.api.nodes[name])

    @staticmethod
    def condition_of(node: dict[str, Any]) -> dict[str, Any]:
        found = gpu_condition_of(node)
        assert found is not None
        return dict(found)


def test_plays_only_kwok_nodes_of_a_known_product() -> None:
    world = World(
        kwok_node("h100-0"), kwok_node("h200-0", H200, count=4),
        kwok_node("real-0", kwok=False), kwok_node("cpu-0", product=None),
        kwok_node("a100-0", "NVIDIA-A100-SXM4-80GB"),
    )
    assert world.fleet.node_names() == ["h100-0", "h200-0"]
    assert world.settle() == 2
    assert world.condition("h100-0")["message"] == "all 8 GPUs healthy"
    assert world.condition("h200-0")["message"] == "all 4 GPUs healthy"
    assert world.api.nodes["real-0"]["status"]["conditions"] == [
        {"type": "Ready", "status": "True"}
    ]


def test_gpu_count_from_label_capacity_or_default() -> None:
    assert gpu_count(kwok_node("n", count=4)) == 4
    node = kwok_node("n", count=None)
    assert gpu_count(node) == 8
    node["status"]["capacity"] = {"nvidia.com/gpu": "2"}
    assert gpu_count(node) == 2


def test_writes_once_then_only_on_change() -> None:
    world = World(*(kwok_node(f"n{i}") for i in range(3)))
    assert world.settle() == 3  # annotation and condition of each, in one patch
    assert sorted(world.api.writes) == [(f"n{i}", ("annotations", "condition")) for i in range(3)]
    assert world.settle() == 0

    world.annotate("n1", "gpu=3,xid=79")
    assert world.settle() == 1
    condition = world.condition("n1")
    assert (condition["status"], condition["reason"]) == ("False", "GPUFellOffBus")
    assert "GPU 3 (GPU-" in condition["message"]
    annotations = world.api.nodes["n1"]["metadata"]["annotations"]
    assert (annotations[ANNOTATION_HEALTHY_GPUS], annotations[ANNOTATION_UNHEALTHY_GPUS]) == (
        "7", "3")
    assert world.condition("n0")["status"] == "True"

    world.annotate("n1", "gpu=3,xid=79;gpu=0,fault=overtemp")
    assert world.settle() == 1  # the message and the counts change, the status does not
    assert world.condition("n1")["lastTransitionTime"] == condition["lastTransitionTime"]

    world.annotate("n1", None)  # clears the over-temperature only
    assert world.settle() == 1
    assert world.condition("n1")["reason"] == "GPUFellOffBus"
    assert world.api.nodes["n1"]["metadata"]["annotations"][ANNOTATION_HEALTHY_GPUS] == "7"

    world.annotate("n1", "gpu=3,fault=reset")
    assert world.settle() == 1
    assert world.condition("n1")["status"] == "True"
    assert ANNOTATION_UNHEALTHY_GPUS not in world.api.nodes["n1"]["metadata"]["annotations"]


def test_unrelated_node_events_cost_no_write() -> None:
    world = World(kwok_node("n0"))
    world.settle()
    for _ in range(5):  # KWOK heartbeats: the node changes, our fields do not
        node = world.api.get("n0")
        node["status"]["conditions"][0]["lastHeartbeatTime"] = str(time.time())
        world.fleet.observe("MODIFIED", node)
        assert world.settle() == 0


def test_an_event_older_than_its_write_costs_no_write(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(kwok_node("n0"))
    world.settle()
    world.annotate("n0", "gpu=3,xid=79")
    assert world.fleet.evaluate() == 1
    # Between the fleet's read and its write, someone else changes the node
    # (a KWOK heartbeat would do); the watch lags, and delivers that change
    # only after the fleet's write went in: the node as it was before it.
    world.api.annotate("n0", {"example.com/other": "x"})
    before_the_write = world.api.get("n0")
    assert world.fleet.write_next(timeout=0)
    assert world.api.writes[-1] == ("n0", ("annotations", "condition"))
    assert world.condition("n0")["reason"] == "GPUFellOffBus"
    assert world.condition_of(before_the_write)["reason"] == "GPUsHealthy"
    world.fleet.observe("MODIFIED", before_the_write)
    assert world.fleet.evaluate() == 0  # the fleet knows it wrote since
    world.fleet.observe("MODIFIED", world.api.get("n0"))  # the write's own event
    assert world.fleet.evaluate() == 0
    assert world.fleet.writes_done == 2


def test_a_node_being_written_is_not_queued_again(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(kwok_node("n0"))
    patch_health = world.api.patch_health
    queued_meanwhile = []

    def event_while_writing(name: str, annotations: dict[str, str | None],
                            condition: dict[str, str] | None) -> str:
        # The watch and the evaluation loop run while the writer still works:
        # an event of the node as it is before the write (a heartbeat, say)
        # still shows no verdict.
        world.fleet.observe("MODIFIED", world.api.get(name))
        queued_meanwhile.append(world.fleet.evaluate())
        return patch_health(name, annotations, condition)

    monkeypatch.setattr(world.api, "patch_health", event_while_writing)
    assert world.settle() == 1
    assert queued_meanwhile == [0]
    assert world.fleet.writes_done == 1


def test_a_condition_removed_by_someone_else_is_written_again() -> None:
    world = World(kwok_node("n0"))
    world.settle()
    node = world.api.nodes["n0"]
    node["status"]["conditions"] = [c for c in node["status"]["conditions"]
                                    if c["type"] == "Ready"]
    world.fleet.observe("MODIFIED", world.api.get("n0"))
    assert world.settle() == 1
    assert world.condition("n0")["status"] == "True"


def test_a_restarted_fleet_writes_nothing_when_nodes_show_their_verdict() -> None:
    world = World(*(kwok_node(f"n{i}") for i in range(4)))
    world.annotate("n2", "gpu=1,fault=dbe")
    world.settle()
    restarted = Fleet(world.api, clock=world.clock)
    restarted.replace_all([world.api.get(name) for name in world.api.nodes])
    assert restarted.evaluate() == 0
    assert restarted.verdict_of("n2").reason == "DoubleBitECCError"


def test_deleted_nodes_are_forgotten() -> None:
    world = World(kwok_node("n0"), kwok_node("n1"))
    world.settle()
    world.fleet.observe("DELETED", world.api.get("n0"))
    assert world.fleet.node_names() == ["n1"]
    world.fleet.replace_all([])
    assert world.fleet.node_names() == []
    assert world.settle() == 0


def test_a_transient_xid_ages_out_on_the_timed_pass() -> None:
    world = World(kwok_node("n0"))
    world.annotate("n0", "gpu=2,xid=94")
    world.settle()
    assert world.condition("n0")["reason"] == "ContainedECCError"
    assert world.settle() == 0  # the echo of the write: nothing to do
    world.clock.now += 601
    assert world.fleet.evaluate(include_timed=False) == 0  # no node changed
    assert world.settle() == 1
    assert world.condition("n0")["status"] == "True"


def test_a_failed_write_is_retried_later(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(kwok_node("n0"))
    failures = [ConnectionError("API server away")]
    original = world.api.patch_health

    def flaky(name: str, annotations: dict[str, str | None],
              condition: dict[str, str] | None) -> str:
        if failures:
            raise failures.pop()
        return original(name, annotations, condition)

    monkeypatch.setattr(world.api, "patch_health", flaky)
    assert world.settle() == 0  # the patch failed: nothing went in
    assert gpu_condition_of(world.api.nodes["n0"]) is None
    assert world.settle() == 0  # not yet due
    world.clock.now += fleet_module.RETRY_AFTER_S
    assert world.settle() == 1
    assert world.condition("n0")["status"] == "True"
    assert world.fleet.writes_done == 1


def test_five_thousand_nodes() -> None:
    started = time.perf_counter()
    world = World(*(kwok_node(f"node-{i:05d}", H100 if i % 4 else H200) for i in range(5000)))
    assert world.settle() == 5_000  # one patch a node
    assert world.settle() == 0
    world.annotate("node-01234", "gpu=6,xid=48")
    assert world.settle() == 1
    assert world.fleet.evaluate() == 0
    assert world.condition("node-01234")["reason"] == "DoubleBitECCError"
    elapsed = time.perf_counter() - started
    assert elapsed < 25, f"5,000 nodes took {elapsed:.1f}s"


def test_metrics_cover_every_node() -> None:
    world = World(*(kwok_node(f"n{i}") for i in range(50)))
    world.settle()
    families = {m.name: m for m in DcgmCollector(world.fleet.snapshot).collect()}
    temps = families["DCGM_FI_DEV_GPU_TEMP"].samples
    assert len(temps) == 400
    assert len({s.labels["Hostname"] for s in temps}) == 50


class FakeCore:
    """The list_node calls a ListWatcher of Nodes makes, answered from
    scripts: streaming lists (a watch with sendInitialEvents) from `streams`,
    or refused as an API server without them refuses them when `streams` is
    None; lists of the watch cache (resourceVersion 0) from `cached`; pages
    of a list; plain watches."""

    class Response:
        def __init__(self, body: bytes = b"", lines: list[dict[str, Any]] | None = None):
            self.data = body
            self.drained = False
            self._lines = [json.dumps(line).encode() + b"\n" for line in lines or []]

        def __iter__(self):
            return iter(self._lines)

        def stream(self, amount: int):
            # Small chunks, so objects arrive split across them.
            for i in range(0, len(self.data), 7):
                yield self.data[i:i + 7]
            self.drained = True

        def release_conn(self) -> None:
            pass

    def __init__(self, pages: list[tuple[list[dict[str, Any]], str | None]],
                 watches: list[list[dict[str, Any]]], on_exhausted: Any,
                 streams: list[list[dict[str, Any]]] | None = None,
                 cached: list[tuple[list[dict[str, Any]], str]] | None = None) -> None:
        self.pages, self.watches, self.on_exhausted, self.streams = pages, watches, on_exhausted, streams
        self.cached = cached or []
        self.calls: list[dict[str, Any]] = []

    def list_node(self, **kwargs: Any) -> Response:
        self.calls.append(kwargs)
        if kwargs.get("send_initial_events"):
            if self.streams is None:
                raise kubernetes.client.ApiException(status=422, reason="Unprocessable Entity")
            if not self.streams:
                self.on_exhausted()
                return self.Response()
            return self.Response(lines=self.streams.pop(0))
        if kwargs.get("watch"):
            if not self.watches:
                self.on_exhausted()
                return self.Response()
            return self.Response(lines=self.watches.pop(0))
        if kwargs.get("resource_version") == "0":
            items, version = self.cached.pop(0)
            return self.Response(json.dumps({"kind": "NodeList", "apiVersion": "v1",
                                             "metadata": {"resourceVersion": version}, "items": items},
                                            separators=(",", ":")).encode())
        items, more = self.pages.pop(0)
        return self.Response(json.dumps({
            "items": items, "metadata": {"resourceVersion": "100", "continue": more}
        }).encode())


def initial_events_end(version: str) -> dict[str, Any]:
    return {"type": "BOOKMARK", "object": {"metadata": {
        "resourceVersion": version, "annotations": {"k8s.io/initial-events-end": "true"}}}}


def kwok_node_at(name: str, resource_version: str) -> dict[str, Any]:
    node = kwok_node(name)
    node["metadata"]["resourceVersion"] = resource_version
    return node


def test_node_watcher_streams_its_list_then_follows_the_same_watch() -> None:
    fleet = Fleet(MemoryNodeClient())
    later = kwok_node_at("c", "140")
    watcher: ListWatcher
    core = FakeCore(
        pages=[], on_exhausted=lambda: watcher.stop(),
        streams=[
            [{"type": "ADDED", "object": kwok_node("a")}, {"type": "ADDED", "object": kwok_node("b")},
             initial_events_end("120"),
             {"type": "ADDED", "object": later}],
            # After the watch that followed on expired: a fresh stream.
            [{"type": "ADDED", "object": kwok_node("b")}, initial_events_end("200")],
        ],
        watches=[[{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]],
    )
    watcher = fleet_watcher(core, fleet)  # type: ignore[arg-type]
    watcher.run()
    assert watcher.synced.is_set()
    assert fleet.node_names() == ["b"]  # a and c gone with the second stream's list
    assert [(bool(c.get("send_initial_events")), c.get("resource_version")) for c in core.calls] == [
        (True, None), (False, "140"), (True, None), (False, "200")]
    assert all(c["resource_version_match"] == "NotOlderThan" for c in core.calls if c.get("send_initial_events"))


class RecordingSink:
    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []

    def replace_all(self, objects: Any) -> None:
        self.lists.append([o["metadata"]["name"] for o in objects])

    def observe(self, event_type: str, obj: dict[str, Any]) -> None:
        self.events.append((event_type, obj["metadata"]["name"]))


def test_node_watcher_lists_the_watch_cache_after_a_cut_stream() -> None:
    """A stream cut before its end is never taken for the whole list; the
    next list is the watch cache's, which the server does not cut, and the
    watch follows on from its version. A later failure streams again."""
    sink = RecordingSink()
    watcher: ListWatcher
    core = FakeCore(
        pages=[], on_exhausted=lambda: watcher.stop(),
        streams=[[{"type": "ADDED", "object": kwok_node("a")}],  # ends before its bookmark
                 [{"type": "ADDED", "object": kwok_node("c")}, initial_events_end("300")]],
        cached=[([kwok_node("b"), kwok_node("é")], "120")],
        watches=[[{"type": "MODIFIED", "object": kwok_node_at("b", "130")}],
                 [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]],
    )
    watcher = ListWatcher(core.list_node, sink, watch_timeout_s=5)
    watcher._failed = lambda err: True  # type: ignore[method-assign]  # no 2 s pause
    watcher.run()
    assert watcher.synced.is_set()
    assert sink.lists == [["b", "é"], ["c"]]
    assert sink.events == [("MODIFIED", "b")]
    assert [(bool(c.get("send_initial_events")), bool(c.get("watch")), c.get("resource_version"))
            for c in core.calls] == [(True, True, None), (False, False, "0"), (False, True, "120"),
                                     (False, True, "130"), (True, True, None), (False, True, "300")]


def test_node_watcher_lists_the_watch_cache_when_a_fresh_list_times_out() -> None:
    """An API server whose cache lags etcd answers a streaming list with an
    error event after waiting for it (504, "Too large resource version")."""
    sink = RecordingSink()
    watcher: ListWatcher
    core = FakeCore(
        pages=[], watches=[], on_exhausted=lambda: watcher.stop(),
        streams=[[{"type": "ERROR", "object": {"code": 504, "message":
                                                 "Timeout: Too large resource version: 105531, current: 105004"}}]],
        cached=[([kwok_node("b")], "105004")],
    )
    watcher = ListWatcher(core.list_node, sink, watch_timeout_s=5)
    watcher.run()
    assert sink.lists == [["b"]]
    assert core.calls[1]["resource_version"] == "0" and core.calls[2]["resource_version"] == "105004"


def test_a_watch_cache_list_is_read_whole_before_the_sink_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server cuts a list it has not sent within its request timeout: a
    slow sink must not hold the reply back. Past the in-memory limit the
    reply waits in a file."""
    monkeypatch.setattr(watch_module, "SPOOL_IN_MEMORY", 64)
    replies: list[Any] = []
    drained_at_first_object: list[bool] = []
    names_ = [f"n{i}" for i in range(20)]

    class Sink(RecordingSink):
        def replace_all(self, objects: Any) -> None:
            for obj in objects:
                drained_at_first_object.append(replies[0].drained)
                self.lists.append([obj["metadata"]["name"]])

    sink = Sink()
    core = FakeCore(pages=[], watches=[], on_exhausted=lambda: watcher.stop(),
                    cached=[([kwok_node(n) for n in names_], "500")])
    list_node = core.list_node

    def recording(**kwargs: Any) -> Any:
        reply = list_node(**kwargs)
        replies.append(reply)
        return reply

    watcher = ListWatcher(recording, sink, watch_timeout_s=5)
    assert watcher._cached_list() == "500"
    assert drained_at_first_object and all(drained_at_first_object)
    assert [names[0] for names in sink.lists] == names_


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 20])
def test_list_items_decodes_a_reply_split_anywhere(chunk: int) -> None:
    items = [{"metadata": {"name": f"n{i}", "resourceVersion": str(i)}, "note": "x" * i + "ü,]"} for i in range(5)]
    body = json.dumps({"kind": "NodeList", "metadata": {"resourceVersion": "77"}, "items": items},
                      separators=(",", ":")).encode()
    versions: list[str] = []
    chunks = (body[i:i + chunk] for i in range(0, len(body), chunk))
    assert list(list_items(chunks, versions)) == items
    assert versions == ["77"]


def test_list_items_of_an_empty_list_and_of_a_cut_reply() -> None:
    versions: list[str] = []
    assert list(list_items(iter([b'{"metadata":{"resourceVersion":"5"},"items":[]}']), versions)) == []
    assert versions == ["5"]
    with pytest.raises(ValueError, match="ended before its items did"):
        list(list_items(iter([b'{"metadata":{"resourceVersion":"5"},"items":[{"a":1},{"b"']), []))


def test_node_watcher_pages_lists_where_streaming_is_refused_and_relists_when_expired() -> None:
    fleet = Fleet(MemoryNodeClient())
    deleted = kwok_node_at("a", "130")
    watcher: ListWatcher
    core = FakeCore(
        pages=[([kwok_node("a")], "page-2"), ([kwok_node("b")], None),  # the first list
               ([kwok_node("b")], None)],  # the list after the watch expired
        watches=[
            [{"type": "ADDED", "object": kwok_node("c")},
             {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "120"}}},
             {"type": "DELETED", "object": deleted}],
            [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}],
        ],
        on_exhausted=lambda: watcher.stop(),
    )
    watcher = fleet_watcher(core, fleet, node_selector="pool=h100")  # type: ignore[arg-type]
    watcher.run()
    assert watcher.synced.is_set()
    assert fleet.node_names() == ["b"]  # c came and went with the relist
    assert core.calls[0].get("send_initial_events")  # tried once, refused
    assert not any(c.get("send_initial_events") for c in core.calls[1:])
    watches = [call for call in core.calls[1:] if call.get("watch")]
    assert watches[0]["resource_version"] == "100"
    assert watches[1]["resource_version"] == "130"  # followed on from the last event
    lists = [call for call in core.calls if not call.get("watch")]
    assert [call["_continue"] for call in lists] == [None, "page-2", None]
    assert all(call["label_selector"] == f"{LABEL_GPU_PRODUCT},pool=h100"
               for call in core.calls)


def test_fleet_runner_threads_write_the_listed_nodes() -> None:
    api = MemoryNodeClient([kwok_node(f"n{i}") for i in range(3)])
    fleet = Fleet(api)
    core = FakeCore(pages=[([api.get(f"n{i}") for i in range(3)], None)], watches=[],
                    on_exhausted=lambda: time.sleep(0.05))
    runner = FleetRunner(fleet, fleet_watcher(core, fleet), interval=0.05,  # type: ignore[arg-type]
                         writers=2)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(api.writes) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stopping = time.monotonic()
        runner.stop()
    assert time.monotonic() - stopping < 5
    assert sorted(api.writes) == [(f"n{i}", ("annotations", "condition")) for i in range(3)]
