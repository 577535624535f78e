"""Karpenter's own KWOK provider (sigs.k8s.io/karpenter/kwok), run for real
next to the local cluster, so karpenter pools are tested against upstream.

It runs out of cluster as a plain process: KUBECONFIG in its environment (a
--kubeconfig flag panics), no leader election, ports of its own (it would
take 8080/8081, the operator's), the StaticCapacity and NodeRepair feature
gates, and 8-GPU H100/H200 instance types named as AWS names them
(hack/karpenter/instance-types.json; prices are placeholders: the provider
only compares them). The nodes it creates carry kwok.x-k8s.io/node=fake, so
the local cluster's KWOK keeps them Ready.

Standard library only, like devcluster. The binary and its CRDs come from
`hack/build-karpenter.sh` (cached next to the cluster's binaries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from gpucluster import devcluster

BUILD_SCRIPT = devcluster.REPO_ROOT / "hack" / "build-karpenter.sh"
INSTANCE_TYPES = devcluster.REPO_ROOT / "hack" / "karpenter" / "instance-types.json"
BINARY = "karpenter-kwok"
FEATURE_GATES = "StaticCapacity=true,NodeRepair=true"
READY_TIMEOUT_S = 90.0


class KarpenterError(RuntimeError):
    pass


@dataclass
class KarpenterState:
    state_dir: str
    binary: str = ""
    pid: int = 0
    metrics_port: int = 0
    health_port: int = 0
    log: str = ""

    def save(self) -> None:
        (Path(self.state_dir) / "karpenter.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> KarpenterState | None:
        path = state_dir / "karpenter.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def binary(bin_dir: Path) -> Path | None:
    """The cached binary, or None when it was never built (this never builds:
    a cold build takes many minutes; `make binaries` does it)."""
    path = bin_dir / BINARY
    return path if path.exists() else None


def crd_dir(bin_dir: Path) -> Path:
    return bin_dir.parent / "karpenter-crds"


def build() -> Path:
    """Builds the binary and its CRDs if the cache lacks them; returns the bin folder."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def install_crds(kubeconfig: str, bin_dir: Path) -> None:
    """Applies Karpenter's CRDs (NodePool, NodeClaim, KWOKNodeClass, ...) and
    waits until the API server serves them."""
    kubectl = [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}"]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(crd_dir(bin_dir))], check=True,
                   capture_output=True)
    crds = [f"crd/{p.stem.split('_', 1)[1]}.{p.stem.split('_', 1)[0]}"
            for p in sorted(crd_dir(bin_dir).glob("*.yaml"))]
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s", *crds], check=True,
                   capture_output=True)


def up(state_dir: Path, kubeconfig: str, bin_dir: Path) -> KarpenterState:
    """Installs the CRDs and starts the provider; returns once it is ready."""
    path = binary(bin_dir)
    if path is None:
        raise KarpenterError(f"{bin_dir / BINARY} is not built: run hack/build-karpenter.sh (or make binaries)")
    if status(state_dir) is not None:
        raise KarpenterError(f"Karpenter of {state_dir} is already up; stop it first")
    install_crds(kubeconfig, bin_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = KarpenterState(state_dir=str(state_dir), binary=str(path), metrics_port=devcluster._free_port(),
                           health_port=devcluster._free_port(), log=str(state_dir / "karpenter.log"))
    env = {**os.environ, "KUBECONFIG": kubeconfig, "DISABLE_LEADER_ELECTION": "true",
           "METRICS_PORT": str(state.metrics_port), "HEALTH_PROBE_PORT": str(state.health_port),
           "FEATURE_GATES": FEATURE_GATES, "INSTANCE_TYPES_FILE_PATH": str(INSTANCE_TYPES),
           "LOG_LEVEL": "info", "SYSTEM_NAMESPACE": "kube-system"}
    with open(state.log, "ab") as log:
        proc = subprocess.Popen([state.binary], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    state.pid = proc.pid
    state.save()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _healthy(state.health_port):
        if proc.poll() is not None or time.monotonic() > deadline:
            down(state_dir)
            raise KarpenterError(f"Karpenter did not become ready; last lines of {state.log}:\n"
                                 f"{devcluster._tail(state.log)}")
        time.sleep(0.3)
    return state


def status(state_dir: Path) -> KarpenterState | None:
    state = KarpenterState.load(state_dir)
    if state is None or not state.pid or not devcluster._alive(state.pid, state.binary):
        return None
    return state


def down(state_dir: Path) -> bool:
    """Stops the provider this state folder started, by pid. Returns whether
    one was running."""
    state = KarpenterState.load(state_dir)
    if state is None or not state.pid:
        return False
    stopped = devcluster.stop_process(state.pid, state.binary)
    state.pid = 0
    state.save()
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpucluster.devkarpenter",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=devcluster.DEFAULT_STATE_DIR,
                        help="the local cluster's state folder (default: %(default)s)")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    if args.action == "up":
        cluster = devcluster.status(state_dir)
        if cluster is None:
            print("no cluster is up; run `hack/cluster.sh up` first", file=sys.stderr)
            return 1
        try:
            state = up(state_dir, cluster.kubeconfig, build())
        except KarpenterError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"Karpenter (KWOK provider) up, pid {state.pid}; log: {state.log}", file=sys.stderr)
    elif args.action == "down":
        print("stopped" if down(state_dir) else "nothing was running", file=sys.stderr)
    else:
        running = status(state_dir)
        if running is None:
            print("down", file=sys.stderr)
            return 1
        print(json.dumps(asdict(running), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
