"""The `gpucluster agent` and `gpucluster device-plugin` subcommands.

gpucluster/cli.py wires them in:

    from gpucluster.agent.cli import add_agent_parser, add_device_plugin_parser
    add_agent_parser(sub)           # sub = parser.add_subparsers(...)
    add_device_plugin_parser(sub)

Each sets `func`, a callable taking the parsed arguments and returning an
exit status. The heavy modules (pynvml, grpc, the kubernetes client) are
imported when a command runs, not when the parser is built, so `gpucluster
--help` stays fast and `agent --backend nvml` needs no gRPC.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpucluster.agent.gpu_profile import H100_80GB_HBM3, PROFILE_NAMES

if TYPE_CHECKING:
    from gpucluster.agent.backend import GpuBackend
    from gpucluster.agent.fake import FakeGpuSet

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
DEFAULT_PLUGIN_INTERVAL_S = 5.0


def add_agent_parser(subparsers: Any) -> argparse.ArgumentParser:
    from gpucluster.agent.exporter import DEFAULT_METRICS_PORT
    from gpucluster.agent.fake import GPUS_PER_NODE

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="the node agent: GPU health onto the Node, dcgm-exporter metrics on /metrics",
        description="Reads the node's GPUs (NVML, or a fake set from a GPU profile), writes "
        "the GPUHealthy condition and the healthy-gpus annotation onto the Node when they "
        "change, and serves per-GPU metrics under dcgm-exporter's names. With --fleet, one "
        "process does this for every KWOK GPU node, with fake GPUs.",
    )
    _add_backend_flags(parser, default_backend="nvml", gpus_per_node=GPUS_PER_NODE)
    parser.add_argument("--fleet", action="store_true",
                        help="play the agent of every KWOK node with a GPU product label "
                        "(fake GPUs of the label's profile; faults from each node's "
                        "gpucluster.dev/inject-fault annotation)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="port of /metrics (default: %(default)s, dcgm-exporter's)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S,
                        help="seconds between two readings of the GPUs (default: %(default)s)")
    parser.add_argument("--writers", type=int, default=8,
                        help="fleet: concurrent writes to the API server (default: %(default)s)")
    parser.add_argument("--node-selector", default="",
                        help="fleet: only the nodes this label selector also selects (to "
                        "split a fleet over several processes)")
    parser.add_argument("--no-kube", action="store_true",
                        help="do not talk to the API server: only serve /metrics")
    _add_kube_flags(parser)
    parser.set_defaults(func=run_agent)
    return parser


def add_device_plugin_parser(subparsers: Any) -> argparse.ArgumentParser:
    from gpucluster.agent.devices import DEFAULT_ENDPOINT, DEFAULT_PLUGIN_DIR
    from gpucluster.agent.fake import GPUS_PER_NODE
    from gpucluster.names import GPU_RESOURCE

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "device-plugin",
        help="a kubelet device plugin offering the node's (fake) GPUs as nvidia.com/gpu",
        description="Serves the kubelet device-plugin API v1beta1 for the node's GPUs: "
        "registers with the kubelet, streams each GPU as Healthy or Unhealthy, and "
        "allocates them with NVIDIA_VISIBLE_DEVICES. Re-registers when the kubelet restarts.",
    )
    _add_backend_flags(parser, default_backend="fake", gpus_per_node=GPUS_PER_NODE)
    parser.add_argument("--plugin-dir", default=DEFAULT_PLUGIN_DIR,
                        help="the kubelet's device-plugin directory (default: %(default)s)")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                        help="the plugin's socket name in that directory (default: %(default)s)")
    parser.add_argument("--resource-name", default=GPU_RESOURCE,
                        help="the extended resource offered (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=DEFAULT_PLUGIN_INTERVAL_S,
                        help="seconds between two health checks and kubelet.sock checks "
                        "(default: %(default)s)")
    parser.add_argument("--watch-faults", action="store_true",
                        help="fake backend: take faults from the Node's "
                        "gpucluster.dev/inject-fault annotation (needs the API server)")
    _add_kube_flags(parser)
    parser.set_defaults(func=run_device_plugin)
    return parser


def _add_backend_flags(
    parser: argparse.ArgumentParser, *, default_backend: str, gpus_per_node: int
) -> None:
    parser.add_argument("--backend", choices=["nvml", "fake"], default=default_backend,
                        help="real GPUs through NVML, or fake ones from a GPU profile "
                        "(default: %(default)s)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, default=H100_80GB_HBM3,
                        help="fake backend: the board model (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=gpus_per_node,
                        help="fake backend: GPUs on the node (default: %(default)s)")
    parser.add_argument("--node-name", default=None,
                        help="this node's name (default: $NODE_NAME, from the downward API)")


def _add_kube_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster in a pod, else the "
                        "default kubeconfig)")
    parser.add_argument("--in-cluster", action="store_true",
                        help="use the pod's service account")


def run_agent(args: argparse.Namespace) -> int:
    _configure_logging()
    if args.fleet:
        return _run_fleet(args)
    node_name = _node_name(args)
    if node_name is None:
        log.error("no node name: pass --node-name or set NODE_NAME")
        return 2
    from gpucluster.agent.exporter import DcgmCollector, serve_metrics
    from gpucluster.agent.fake import FakeGpuSet
    from gpucluster.agent.node_agent import NodeAgent

    backend = _backend(args, node_name)
    nodes = None
    if not args.no_kube:
        from gpucluster.agent.nodestatus import KubeNodeClient, connect

        nodes = KubeNodeClient(connect(args.kubeconfig, args.in_cluster or None))
    fake = backend if isinstance(backend, FakeGpuSet) else None
    agent = NodeAgent(backend, node_name, nodes, fault_target=fake)
    metrics = serve_metrics(DcgmCollector(agent.snapshot), args.metrics_port)
    log.info("agent of node %s: %s backend, /metrics on :%d", node_name, args.backend,
             metrics.port)
    stop = _stop_on_signals()
    try:
        agent.run(stop, args.interval)
    finally:
        metrics.stop()
        backend.close()
    return 0


def _run_fleet(args: argparse.Namespace) -> int:
    if args.no_kube:
        log.error("--fleet needs the API server: it finds its nodes there")
        return 2
    from gpucluster.agent.exporter import DcgmCollector, serve_metrics
    from gpucluster.agent.fleet import Fleet, FleetRunner, fleet_watcher
    from gpucluster.agent.nodestatus import KubeNodeClient, connect

    core = connect(args.kubeconfig, args.in_cluster or None, pool_size=args.writers + 2)
    fleet = Fleet(KubeNodeClient(core))
    watcher = fleet_watcher(core, fleet, node_selector=args.node_selector)
    runner = FleetRunner(fleet, watcher, interval=args.interval, writers=args.writers)
    metrics = serve_metrics(DcgmCollector(fleet.snapshot), args.metrics_port)
    log.info("fleet agent: /metrics on :%d", metrics.port)
    stop = _stop_on_signals()
    runner.start()
    try:
        stop.wait()
    finally:
        runner.stop()
        metrics.stop()
    return 0


def run_device_plugin(args: argparse.Namespace) -> int:
    _configure_logging()
    node_name = _node_name(args)
    if node_name is None and (args.backend == "fake" or args.watch_faults):
        log.error("no node name (the fake GPUs' UUIDs derive from it): "
                  "pass --node-name or set NODE_NAME")
        return 2
    from gpucluster.agent.deviceplugin import DevicePluginServer
    from gpucluster.agent.fake import FakeGpuSet

    backend = _backend(args, node_name or "")
    before_tick = None
    if args.watch_faults:
        if not isinstance(backend, FakeGpuSet):
            log.error("--watch-faults needs --backend fake")
            return 2
        before_tick = _fault_watch(args, backend, node_name or "")
    server = DevicePluginServer(backend, plugin_dir=args.plugin_dir, endpoint=args.endpoint,
                                resource_name=args.resource_name, before_tick=before_tick)
    log.info("device plugin for %s in %s", args.resource_name, args.plugin_dir)
    try:
        server.run(_stop_on_signals(), args.interval)
    finally:
        backend.close()
    return 0


def _fault_watch(
    args: argparse.Namespace, backend: FakeGpuSet, node_name: str
) -> Callable[[], None]:
    """A before_tick that applies the Node's fault annotation to the fake GPUs."""
    from gpucluster.agent.injection import injection_annotation
    from gpucluster.agent.nodestatus import KubeNodeClient, connect

    nodes = KubeNodeClient(connect(args.kubeconfig, args.in_cluster or None))
    return lambda: backend.apply_annotation(injection_annotation(nodes.get(node_name)))


def _backend(args: argparse.Namespace, node_name: str) -> GpuBackend:
    if args.backend == "nvml":
        from gpucluster.agent.nvml import NvmlBackend

        return NvmlBackend()
    from gpucluster.agent.fake import FakeGpuSet
    from gpucluster.agent.gpu_profile import load_profile

    return FakeGpuSet(load_profile(args.profile), node_name, args.gpus)


def _node_name(args: argparse.Namespace) -> str | None:
    return args.node_name or os.environ.get("NODE_NAME") or None


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
