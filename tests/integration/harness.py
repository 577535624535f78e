"""What integration tests share: the operator as a real process, kubectl,
waiting, and the KWOK-side tricks tests use to play a kubelet."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], T], timeout: float = 30, interval: float = 0.25,
             what: str = "condition") -> T:
    """Polls until `check` returns something truthy; fails with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


class Kubectl:
    def __init__(self, kubeconfig: str, bin_dir: str) -> None:
        self.kubeconfig = kubeconfig
        self.binary = str(Path(bin_dir) / "kubectl")

    def run(self, *args: str, input: str | None = None, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.binary, f"--kubeconfig={self.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def apply(self, manifest: dict[str, Any] | str, check: bool = True,
              ) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.run("apply", "-f", "-", input=text, check=check)

    def get(self, *args: str) -> Any:
        return json.loads(self.run("get", *args, "-o", "json").stdout)

    def delete_cluster(self, name: str, timeout: float = 180) -> None:
        """Deletes a TrainingCluster and waits for the operator's finalizer
        to let it go; on a timeout the failure shows what still holds it
        (finalizers, Kopf's progress annotations, conditions)."""
        self.run("delete", "tc", name, "--wait=false", "--ignore-not-found")

        def gone() -> bool:
            return self.run("get", "tc", name, "--ignore-not-found", "-o", "name").stdout.strip() == ""

        try:
            wait_for(gone, timeout=timeout, interval=1, what=f"TrainingCluster {name} to be deleted")
        except AssertionError as err:
            left = self.run("get", "tc", name, "-o", "json", check=False).stdout
            raise AssertionError(f"{err}\nwhat is left of it:\n{left}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, and SIGKILL if it is still there after 15 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def node_ready(kubectl: Kubectl, name: str) -> bool:
    """The node exists and its Ready condition is True."""
    node = kubectl.run("get", "node", name, "-o", "json", check=False)
    if node.returncode != 0:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in json.loads(node.stdout)["status"].get("conditions", []))


class GpuclusterProcess:
    """A `gpucluster` subcommand as a real process, so a test can kill it mid-work."""

    role = "gpucluster"

    def __init__(self, kubeconfig: str, log_dir: Path, extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.metrics_port = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.role}-{self.starts}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.starts += 1
        self.metrics_port = free_port()
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gpucluster.cli", *self.command(),
                                          *self.extra_args], stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a node dies under the operator."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class OperatorProcess(GpuclusterProcess):
    role = "operator"

    def command(self) -> list[str]:
        return ["run", "--metrics-port", str(self.metrics_port), "--liveness-port", str(free_port())]


class AgentProcess(GpuclusterProcess):
    """The node agent in fleet mode over the TrainingClusters' KWOK nodes."""

    role = "agent"

    def command(self) -> list[str]:
        return ["agent", "--backend", "fake", "--fleet", "--interval", "0.5",
                "--node-selector", "gpucluster.dev/cluster", "--metrics-port", str(self.metrics_port)]


def finish_pod(kubectl: Kubectl, namespace: str, name: str, exit_code: int) -> None:
    """Ends a pod on a KWOK node as its container would: Succeeded on exit 0,
    Failed otherwise. KWOK's own stages only complete Job-owned pods, and they
    leave a pod alone once it is Running, so a status patch sticks."""
    phase = "Succeeded" if exit_code == 0 else "Failed"
    pod = kubectl.get("pod", "-n", namespace, name)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    statuses = [{
        "name": c["name"], "image": c["image"], "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "startedAt": now, "finishedAt": now,
                                 "reason": "Completed" if exit_code == 0 else "Error"}},
    } for c in pod["spec"]["containers"]]
    kubectl.run("patch", "pod", "-n", namespace, name, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"phase": phase, "containerStatuses": statuses}}))


def set_node_ready(kubectl: Kubectl, name: str, ready: bool) -> None:
    """Makes a KWOK node NotReady (or Ready again) as a dead kubelet would.
    The kwok.x-k8s.io/status=custom annotation tells KWOK to leave the status
    a test wrote; removing it hands the node back to KWOK's heartbeat."""
    kubectl.run("annotate", "node", name, "--overwrite",
                "kwok.x-k8s.io/status=custom" if not ready else "kwok.x-k8s.io/status-")
    if not ready:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        node = kubectl.get("node", name)
        conditions = [c for c in node["status"].get("conditions", []) if c["type"] != "Ready"]
        conditions.append({"type": "Ready", "status": "False", "reason": "KubeletStopped",
                           "message": "kubelet stopped posting status (test)",
                           "lastHeartbeatTime": now, "lastTransitionTime": now})
        kubectl.run("patch", "node", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"conditions": conditions}}))
