"""List-then-watch of Nodes or Pods in a thread, for processes that keep
their own view of thousands of them (the fleet agent, the operator's node and
pod indexes).

The kubernetes client is synchronous, so the watch runs in a thread of its
own and hands each object to a sink. Objects are read as plain JSON: the
client's model decoding of a Node costs more than the event."""

from __future__ import annotations

import codecs
import json
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from kubernetes.client import ApiException

from gpucluster.kube.client import read_reply

log = logging.getLogger(__name__)


class Sink(Protocol):
    def replace_all(self, objects: Iterator[Mapping[str, Any]]) -> None:
        """A fresh list of every object, page by page as they arrive: the
        sink must read it to the end, and forget the objects not in it."""

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED (also sent when an
        object stops matching the selector)."""


INITIAL_EVENTS_END = "k8s.io/initial-events-end"


class WatchExpired(Exception):
    """The version a watch follows on from is gone (410): list again."""


class StreamCut(Exception):
    """A streaming list ended before its initial events did."""


# A reply of 25,000 Nodes is about 124 MB of JSON; it is read this much at a
# time, and spooled to a file past SPOOL_IN_MEMORY.
CACHED_LIST_CHUNK = 1 << 20
SPOOL_IN_MEMORY = 16 << 20
_BETWEEN_ITEMS = re.compile(r"[\s,]*")


class ListWatcher:
    """Lists, then watches, the objects a list call returns (`core.list_node`,
    `core.list_pod_for_all_namespaces`) that match a label selector, and
    feeds them to a sink; lists again when the watch expires (410 Gone) or
    breaks.

    The list is a watch's initial events (`sendInitialEvents`, Kubernetes'
    streaming list) where the API server has them, else pages of a list
    call. A paged list is a snapshot the watch must then follow on from, and
    at 25,000 Nodes on a busy server reading it took longer than the server
    keeps past events: the watch after it failed at once with 410, and the
    list began again, over and over. A streaming list goes on as the watch,
    with no gap to fall into.

    On an API server whose watch cache is minutes behind etcd (25,000 Nodes
    on 2 cores) a streaming list does not get through either: the server
    cuts a watch whose reader falls a few dozen events behind, which reading
    25,000 initial events in Python always does, and one that asks for a
    fresh list waits for the cache and times out. The index then stayed
    blind for 40 minutes. So after a stream that failed either way, the next
    list is the watch cache's own (`resourceVersion=0`): one reply that the
    server neither cuts nor holds back, as stale as the cache it comes
    from, and the watch follows on from its version, which the cache still
    holds."""

    def __init__(
        self,
        list_call: Callable[..., Any],
        sink: Sink,
        *,
        label_selector: str = "",
        page_size: int = 500,
        watch_timeout_s: int = 300,
    ) -> None:
        self._list_call = list_call
        self._sink = sink
        self._selector = label_selector
        self._page_size = page_size
        self._watch_timeout_s = watch_timeout_s
        self._streaming = True  # until the API server refuses it
        self._cached_next = False  # the last streaming list failed: list the watch cache
        self._stop = threading.Event()
        self._response: Any = None
        self.synced = threading.Event()  # set once the first list is in

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                resource_version: str | None
                if self._cached_next:
                    self._cached_next = False
                    resource_version = self._cached_list()
                else:
                    resource_version = self._stream() if self._streaming else self._list()
                while not self._stop.is_set() and resource_version is not None:
                    resource_version = self._watch(resource_version)
            except StreamCut as err:
                self._cached_next = True
                if not self._failed(err):
                    return
            except ApiException as err:
                if self._streaming and err.status in (400, 403, 422):
                    # An API server without the WatchList feature refuses
                    # sendInitialEvents as an invalid request.
                    log.warning("streaming list of %s refused (%s %s): paged lists from now on",
                                self._list_call.__name__, err.status, err.reason)
                    self._streaming = False
                elif not self._failed(err):
                    return
            except Exception as err:
                if not self._failed(err):
                    return

    def _failed(self, err: Exception) -> bool:
        """Logs a failure and waits a little; False when stopping."""
        if self._stop.is_set():
            return False
        log.warning("watching %s failed, listing again: %s", self._list_call.__name__, err)
        self._stop.wait(2.0)
        return True

    def start(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=name, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            # Unblocks the read the watch thread is waiting in.
            try:
                response.shutdown()
            except (AttributeError, ValueError, RuntimeError, OSError):
                response.close()

    def _list(self) -> str:
        """Hands the sink every object, a page at a time (never the whole
        list held at once: 25,000 parsed Nodes are hundreds of MiB); returns
        the list's resourceVersion."""
        versions: list[str] = []

        def pages() -> Iterator[Mapping[str, Any]]:
            token = None
            while True:
                response: Any = self._list_call(
                    label_selector=self._selector, limit=self._page_size,
                    _continue=token, _preload_content=False,
                )
                page = json.loads(read_reply(response))
                yield from page.get("items") or []
                token = page["metadata"].get("continue")
                if not token:
                    versions.append(str(page["metadata"]["resourceVersion"]))
                    return

        return self._hand_over(pages(), versions)

    def _hand_over(self, objects: Iterator[Mapping[str, Any]], versions: list[str]) -> str:
        """Gives the sink a whole list; returns its version, which `objects`
        appends to `versions` once it has given its last object."""
        self._sink.replace_all(objects)
        if not versions:
            raise RuntimeError(f"the sink of {self._list_call.__name__} stopped reading the list before its end")
        self.synced.set()
        return versions[0]

    def _stream(self) -> str | None:
        """A streaming list: the sink reads the watch's initial events as its
        list, and the same watch then goes on with the changes after it.
        Returns the version to follow on from, as `_watch`."""
        events = self._open(send_initial_events=True, resource_version_match="NotOlderThan")
        try:
            end: list[str] = []

            def initial() -> Iterator[Mapping[str, Any]]:
                for kind, obj in events:
                    if kind != "BOOKMARK":
                        yield obj
                    elif (obj["metadata"].get("annotations") or {}).get(INITIAL_EVENTS_END) == "true":
                        end.append(obj["metadata"]["resourceVersion"])
                        return
                raise StreamCut(f"the watch of {self._list_call.__name__} ended before its initial events did")

            try:
                version = self._hand_over(initial(), end)
            except WatchExpired:
                # Expired, or the server timed out waiting for its cache to
                # be as fresh as the list asked for.
                self._cached_next = True
                return None
            return self._follow(events, version)
        finally:
            self._close()

    def _cached_list(self) -> str:
        """Hands the sink every object in the API server's watch cache, an
        object at a time; returns its version.

        The reply is read whole, into a file past SPOOL_IN_MEMORY, before the
        sink sees its first object: the server ends a list it has not sent
        within its request timeout (60 s), and a sink that reads as it goes
        is as slow as its slowest object. At 25,000 nodes the fleet agent's
        sink, sharing a lock with its health writes, took longer than that,
        and every list of the cache was cut ("Response ended prematurely")."""
        response = self._list_call(label_selector=self._selector, resource_version="0",
                                   _preload_content=False)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            try:
                for chunk in response.stream(CACHED_LIST_CHUNK):
                    spool.write(chunk)
            finally:
                response.release_conn()
            spool.seek(0)
            versions: list[str] = []
            chunks = iter(lambda: spool.read(CACHED_LIST_CHUNK), b"")
            return self._hand_over(list_items(chunks, versions), versions)

    def _watch(self, resource_version: str) -> str | None:
        """Follows the watch from a version; returns the version to follow on
        from, or None when the watch expired and the sink must list again."""
        events = self._open(resource_version=resource_version)
        try:
            return self._follow(events, resource_version)
        finally:
            self._close()

    def _open(self, **options: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
        self._response = self._list_call(
            label_selector=self._selector, watch=True, allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s, _preload_content=False, **options,
        )
        return self._events(self._response)

    def _events(self, response: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """The watch's events, as (type, object); raises WatchExpired on the
        server's ERROR event (410 Gone: the version is too old to watch from)."""
        for line in response:
            if self._stop.is_set():
                return
            if not line.strip():
                continue
            event = json.loads(line)
            if event["type"] == "ERROR":
                log.info("watch of %s ended: %s", self._list_call.__name__, event["object"].get("message"))
                raise WatchExpired(event["object"].get("message"))
            yield event["type"], event["object"]

    def _follow(self, events: Iterator[tuple[str, Mapping[str, Any]]], resource_version: str) -> str | None:
        try:
            for kind, obj in events:
                resource_version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self._sink.observe(kind, obj)
        except WatchExpired:
            return None
        return None if self._stop.is_set() else resource_version

    def _close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.release_conn()


def list_items(chunks: Iterator[bytes], versions: list[str]) -> Iterator[Mapping[str, Any]]:
    """The items of a list reply, decoded one at a time from its chunks, so
    only one chunk and one object are held at once. The reply's
    resourceVersion (its metadata comes before its items) is appended to
    `versions` once the items end."""
    decoder = json.JSONDecoder()
    text_of = codecs.getincrementaldecoder("utf-8")()
    buffer, position, head_done, version = "", 0, False, None
    for chunk in chunks:
        buffer = buffer[position:] + text_of.decode(chunk)
        position = 0
        if not head_done:
            start = buffer.find('"items":[')
            if start < 0:
                continue
            if (found := re.search(r'"resourceVersion":"([^"]*)"', buffer[:start])) is not None:
                version = found.group(1)
            position, head_done = start + len('"items":['), True
        while True:
            between = _BETWEEN_ITEMS.match(buffer, position)
            position = between.end() if between else position
            if buffer.startswith("]", position):
                if version is None:
                    raise ValueError("a list reply without a resourceVersion")
                versions.append(version)
                return
            try:
                item, position = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError:
                break  # the object goes on in the next chunk
            yield item
    raise ValueError("the list reply ended before its items did")
