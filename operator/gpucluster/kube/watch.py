"""List-then-watch of Nodes or Pods in a thread, for processes that keep
their own view of thousands of them (the fleet agent, the operator's node and
pod indexes).

The kubernetes client is synchronous, so the watch runs in a thread of its
own and hands each object to a sink. Objects are read as plain JSON: the
client's model decoding of a Node costs more than the event."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from gpucluster.kube.client import read_reply

log = logging.getLogger(__name__)


class Sink(Protocol):
    def replace_all(self, objects: Iterator[Mapping[str, Any]]) -> None:
        """A fresh list of every object, page by page as they arrive: the
        sink must read it to the end, and forget the objects not in it."""

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED (also sent when an
        object stops matching the selector)."""


class ListWatcher:
    """Lists, then watches, the objects a list call returns (`core.list_node`,
    `core.list_pod_for_all_namespaces`) that match a label selector, and
    feeds them to a sink; lists again when the watch expires (410 Gone) or
    breaks."""

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
        self._stop = threading.Event()
        self._response: Any = None
        self.synced = threading.Event()  # set once the first list is in

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                resource_version: str | None = self._list()
                self.synced.set()
                while not self._stop.is_set() and resource_version is not None:
                    resource_version = self._watch(resource_version)
            except Exception as err:
                if self._stop.is_set():
                    return
                log.warning("watching %s failed, listing again: %s", self._list_call.__name__, err)
                self._stop.wait(2.0)

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

        self._sink.replace_all(pages())
        if not versions:
            raise RuntimeError(f"the sink of {self._list_call.__name__} stopped reading the list before its end")
        return versions[0]

    def _watch(self, resource_version: str) -> str | None:
        """Follows the watch from a version; returns the version to follow on
        from, or None when the watch expired and the sink must list again."""
        self._response = self._list_call(
            label_selector=self._selector, watch=True, allow_watch_bookmarks=True,
            resource_version=resource_version, timeout_seconds=self._watch_timeout_s,
            _preload_content=False,
        )
        try:
            for line in self._response:
                if self._stop.is_set():
                    return None
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    # 410 Gone: the version is too old to watch from.
                    log.info("watch of %s ended: %s", self._list_call.__name__, obj.get("message"))
                    return None
                resource_version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self._sink.observe(kind, obj)
        finally:
            response, self._response = self._response, None
            response.release_conn()
        return resource_version
