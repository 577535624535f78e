"""`gpucluster agent` and `gpucluster device-plugin`: the parsers the main
CLI wires in, and an agent run end to end in a process of its own."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gpucluster.agent.cli import add_agent_parser, add_device_plugin_parser, run_agent

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gpucluster")
    sub = top.add_subparsers(dest="command", required=True)
    add_agent_parser(sub)
    add_device_plugin_parser(sub)
    return top


def test_agent_defaults() -> None:
    args = parser().parse_args(["agent"])
    assert (args.backend, args.profile, args.gpus) == ("nvml", "h100-80gb-hbm3", 8)
    assert (args.fleet, args.metrics_port, args.interval) == (False, 9400, 10.0)
    assert (args.kubeconfig, args.in_cluster, args.node_name) == (None, False, None)
    assert args.func is run_agent


def test_agent_flags() -> None:
    args = parser().parse_args([
        "agent", "--backend", "fake", "--profile", "h200-141gb", "--gpus", "4", "--fleet",
        "--metrics-port", "9500", "--kubeconfig", "/tmp/kc", "--interval", "2",
        "--node-name", "n1", "--writers", "16", "--node-selector", "pool=h100",
    ])
    assert (args.backend, args.profile, args.gpus, args.fleet) == ("fake", "h200-141gb", 4, True)
    assert (args.metrics_port, args.kubeconfig, args.interval) == (9500, "/tmp/kc", 2.0)
    assert (args.node_name, args.writers, args.node_selector) == ("n1", 16, "pool=h100")


def test_device_plugin_defaults() -> None:
    args = parser().parse_args(["device-plugin", "--in-cluster", "--watch-faults"])
    assert (args.backend, args.plugin_dir) == ("fake", "/var/lib/kubelet/device-plugins")
    assert (args.endpoint, args.resource_name) == ("gpucluster-gpu.sock", "nvidia.com/gpu")
    assert args.in_cluster and args.watch_faults
    assert callable(args.func)


def test_refuses_what_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert run_agent(parser().parse_args(["agent", "--backend", "fake", "--no-kube"])) == 2
    assert run_agent(parser().parse_args(["agent", "--fleet", "--no-kube"])) == 2
    plugin = parser().parse_args(["device-plugin"])
    assert plugin.func(plugin) == 2  # fake UUIDs need the node name


AGENT = """
import argparse, sys
from gpucluster.agent.cli import add_agent_parser
top = argparse.ArgumentParser()
add_agent_parser(top.add_subparsers())
args = top.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_a_fake_agent_serves_metrics_until_terminated() -> None:
    env = {**os.environ, "NODE_NAME": "kind-worker-2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, "agent", "--backend", "fake", "--profile", "h200-141gb",
         "--no-kube", "--metrics-port", "0", "--interval", "0.2"],
        env=env, cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if found := re.search(r"/metrics on :(\d+)", line):
                port = int(found.group(1))
        assert port is not None, "the agent never said where /metrics is"
        url = f"http://127.0.0.1:{port}/metrics"
        body = ""
        while "gpucluster_gpu_healthy{" not in body and time.monotonic() < deadline:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        assert 'Hostname="kind-worker-2"' in body and 'modelName="NVIDIA H200"' in body
        assert body.count("DCGM_FI_DEV_FB_TOTAL{") == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_building_the_parsers_imports_nothing_heavy() -> None:
    """The main CLI builds these parsers on every command, `gpucluster run` too."""
    code = (
        "import argparse, sys\n"
        "from gpucluster.agent.cli import add_agent_parser, add_device_plugin_parser\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "add_agent_parser(sub); add_device_plugin_parser(sub)\n"
        "print(sorted(m for m in ('grpc', 'pynvml', 'kubernetes', 'kopf') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stderr
