"""What the cluster benchmarks share: a local control plane with the CRDs
applied, kubectl and a client on it, a raw node watch, and the CPU time of
a process."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from gpucluster import devcluster  # noqa: E402
from gpucluster.kube.client import CONCURRENCY  # noqa: E402

LEASE_SECONDS = 40
LEASES_UP_TO_NODES = 2000
NODES_PER_KWOK = 5000
MAX_DEFAULT_KWOK_SHARDS = 8

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class BenchCluster:
    kubeconfig: str
    core: kubernetes.client.CoreV1Api
    kubectl_bin: str
    state_dir: Path

    def kubectl(self, *argv: str, input: str | None = None) -> str:
        result = subprocess.run([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *argv], input=input,
                                text=True, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def gpucluster(self, *argv: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A `gpucluster` subcommand against this cluster, logging to `log`."""
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONPATH": str(REPO / "operator"), **(env or {})}
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "gpucluster.cli", *argv], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """KWOK's settings for a bench of many nodes; `simulator_settings` fills
    in the defaults for the run's node count."""
    parser.add_argument("--lease-seconds", type=int, default=None,
                        help="KWOK's node Lease duration, renewed every quarter of it; 0: no Leases, the "
                             "node status posts (one per node about every 300 s) keep nodes Ready. "
                             f"Default: {LEASE_SECONDS} (a kubelet's 10 s renewals) up to "
                             f"{LEASES_UP_TO_NODES:,} nodes, 0 above: the operator watches Nodes, not Leases, "
                             "and 2,500 renewals a second at 25,000 nodes are more than an API server on 2 "
                             "shared cores takes")
    parser.add_argument("--kwok-shards", type=devcluster.kwok_shard_count, default=None,
                        help=f"KWOK controllers sharing the simulated nodes (devcluster.py); default: one "
                             f"per {NODES_PER_KWOK:,} nodes, at most {MAX_DEFAULT_KWOK_SHARDS}")


def simulator_settings(args: argparse.Namespace, nodes: int) -> tuple[int, int]:
    """The node Lease duration and the KWOK controllers for a run of `nodes`."""
    lease_seconds = args.lease_seconds if args.lease_seconds is not None else (
        LEASE_SECONDS if nodes <= LEASES_UP_TO_NODES else 0)
    kwok_shards = args.kwok_shards or min(MAX_DEFAULT_KWOK_SHARDS, max(1, -(-nodes // NODES_PER_KWOK)))
    return lease_seconds, kwok_shards


def simulator_args(lease_seconds: int) -> dict[str, list[str]]:
    return {"kwok": [f"--node-lease-duration-seconds={lease_seconds}"]}


def simulator_summary(lease_seconds: int, kwok_shards: int, nodes: int) -> str:
    leases = f"{lease_seconds} s, renewed every {lease_seconds / 4:g} s" if lease_seconds else "off"
    return (f"KWOK: {kwok_shards} controller(s); node leases: {leases}; node status posts about every 300 s "
            f"({nodes / 300:.0f}/s)")


@contextlib.contextmanager
def bench_cluster(name: str, extra_args: dict[str, list[str]] | None = None,
                  kwok_shards: int = 1) -> Iterator[BenchCluster]:
    """A control plane of its own (or GPUCLUSTER_KUBECONFIG's), CRDs applied;
    `extra_args` adds flags to its components, `kwok_shards` KWOK controllers
    share its nodes (devcluster.up)."""
    external = os.environ.get("GPUCLUSTER_KUBECONFIG")
    state_dir = REPO / ".local-cluster" / name
    # A run stopped with SIGTERM unwinds through the finally below.
    devcluster.interrupt_on_sigterm()
    if not external:
        devcluster.down(state_dir)
        kubeconfig = devcluster.up(state_dir, extra_args, kwok_shards).kubeconfig
    else:
        kubeconfig = external
    try:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = CONCURRENCY * 2
        cluster = BenchCluster(kubeconfig, kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration)),
                               str(devcluster.bin_dir() / "kubectl"), Path(kubeconfig).parent)
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
        yield cluster
    finally:
        if not external:
            devcluster.down(state_dir)


def watch_nodes(core: kubernetes.client.CoreV1Api, selector: str,
                on_event: Callable[[str, dict[str, Any]], bool]) -> threading.Thread:
    """Streams node events as raw JSON (the client's model decoding would be
    the bottleneck at thousands of nodes) to `on_event(type, node)` on a
    thread, until it returns True or the control plane goes away."""
    return watch_raw(core.list_node, selector, on_event)


def watch_raw(list_call: Callable[..., Any], selector: str,
              on_event: Callable[[str, dict[str, Any]], bool]) -> threading.Thread:
    """`watch_nodes` for any list call of the client (pods of all namespaces:
    `core.list_pod_for_all_namespaces`)."""
    def run() -> None:
        version = "0"
        while True:
            try:
                stream = list_call(watch=True, label_selector=selector, resource_version=version,
                                   allow_watch_bookmarks=True, timeout_seconds=600, _preload_content=False)
            except urllib3.exceptions.HTTPError as err:
                if _server_gone(err):
                    return  # the control plane stopped: the run is over
                # A server too busy to answer now (a dropped connection, a
                # timeout) may answer later; ending here left colossus's job
                # watch blind to 356 of 1,000 admissions at 25,000 nodes.
                time.sleep(1)
                continue
            except kubernetes.client.ApiException:
                time.sleep(1)  # 429, 5xx: likewise
                continue
            for event in _events(stream):
                if event["type"] == "ERROR":
                    # 410 Gone: the version fell out of the watch cache; start
                    # again from a fresh list (every object ADDED again).
                    version = "0"
                    stream.close()
                    break
                version = event["object"]["metadata"].get("resourceVersion", version)
                if event["type"] != "BOOKMARK" and on_event(event["type"], event["object"]):
                    stream.close()
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _server_gone(err: urllib3.exceptions.HTTPError) -> bool:
    """Whether the API server refused the connection: nothing listens."""
    reason = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) else err
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _events(stream: Any) -> Iterator[dict[str, Any]]:
    buffer = b""
    for chunk in _chunks(stream):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (json.loads(line) for line in lines)


def _chunks(stream: Any) -> Iterator[bytes]:
    """The watch's bytes; the stream ending as the control plane stops at the
    end of a run is its end, not an error."""
    try:
        yield from stream.stream(1 << 16)
    except urllib3.exceptions.HTTPError:
        return


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
