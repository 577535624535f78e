"""One configured Kubernetes client per process, and a thread pool sized for
the API server's concurrency: the kubernetes client is synchronous, so Kopf's
event loop hands blocking calls to these threads."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kubernetes

T = TypeVar("T")
CONCURRENCY = 32


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        configuration = kubernetes.client.Configuration.get_default_copy()
    except kubernetes.config.ConfigException:
        configuration = kubernetes.client.Configuration()
        # KUBECONFIG as it is now: the client reads it once, at import.
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    configuration.connection_pool_maxsize = sum(LANE_THREADS.values()) + CONCURRENCY
    return kubernetes.client.ApiClient(configuration)


@functools.cache
def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


@functools.cache
def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


# The thread pool a call waits in, set per task (and inherited by the tasks
# it starts). Remediation has a lane of its own: measured at 1,000 nodes, a
# quarantine queued behind an admission cycle's hundreds of pod creations
# took 11 s to reach the API server. Its drains have another: a cordon
# queued behind a hundred nodes' pod lists and evictions.
LANE: contextvars.ContextVar[str] = contextvars.ContextVar("kube_lane", default="default")
LANE_THREADS = {"default": CONCURRENCY, "remediation": 8, "drain": 8}


@functools.cache
def _executor(lane: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=LANE_THREADS[lane], thread_name_prefix=f"kube-{lane}")


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs one blocking client call off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(LANE.get()), functools.partial(fn, *args, **kwargs))


async def call_raw(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """One client call whose reply body is returned unparsed: the client's
    model decoding of a Node costs more than the request."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(LANE.get()),
                                      lambda: read_reply(fn(*args, _preload_content=False, **kwargs)))


def read_reply(response: Any) -> bytes:
    """The whole body of a reply made without preloading (the client then
    returns the raw HTTP response, and still raises ApiException for an error
    status), its connection handed back to the pool. A reply left unread
    keeps its connection, and the next call opens a new TLS session."""
    try:
        return bytes(response.data)
    finally:
        response.release_conn()


def status_of(err: BaseException) -> int | None:
    return err.status if isinstance(err, kubernetes.client.ApiException) else None
