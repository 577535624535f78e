"""Kueue, run out of cluster against the local control plane: the peer
bench/compare.py measures gpucluster against.

`hack/build-kueue.sh` builds the pinned Kueue (hack/versions.env) from its Go
module and keeps its CRDs and webhook manifests beside the binary. What it
takes to run it outside a cluster (read from its source):
- leader election off, and internal certificate management off (otherwise
  it waits forever for a Secret mounted into a pod); the webhook server gets a
  certificate for 127.0.0.1 made here, and the webhook configurations point
  at it by URL (only the batch/v1 Job and Kueue's own entries);
- the metrics server reads its certificate from a fixed path even when it
  serves nothing, so Kueue runs in a mount namespace of its own where an
  overlay on /etc holds that file (the machine's /etc is not touched);
- `VisibilityOnDemand` off (it needs an aggregated API server);
- its CRDs Established before it starts, or it exits ("no matches for kind").
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from common import REPO, BenchCluster
from gpucluster import names

BUILD_SCRIPT = REPO / "hack" / "build-kueue.sh"
API_VERSION = "kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TOPOLOGY_ANNOTATIONS = {"required": "kueue.x-k8s.io/podset-required-topology",
                        "preferred": "kueue.x-k8s.io/podset-preferred-topology"}
TOPOLOGY_NAME = "gpu"
# Kueue's topology levels, top down: a gang kept in one block or one rack,
# and each pod assigned to a node (the lowest level is the hostname).
LEVEL_LABELS = {"block": names.LABEL_BLOCK, "rack": names.LABEL_RACK}
NAMESPACE = "kueue-system"
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class KueueBuild:
    binary: Path
    crds: Path
    webhooks: Path

    @property
    def cached(self) -> bool:
        return self.binary.exists() and self.webhooks.exists() and any(self.crds.glob("*.yaml"))


def build(compile_if_missing: bool = True) -> KueueBuild:
    """Where the pinned Kueue lives; builds it first unless told not to."""
    if compile_if_missing:
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run(["bash", "-c", f"source {REPO / 'hack' / 'lib.sh'} && echo $BIN_DIR && echo $KUEUE_DIR"],
                         check=True, capture_output=True, text=True).stdout.split()
    return KueueBuild(Path(out[0]) / "kueue", Path(out[1]) / "crd", Path(out[1]) / "webhook" / "manifests.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Kueue:
    """One Kueue process on the bench's cluster, with its CRDs and webhooks."""

    def __init__(self, bench: BenchCluster, state_dir: Path, qps: int, burst: int) -> None:
        self.bench = bench
        self.dir = state_dir / "kueue"
        self.qps, self.burst = qps, burst
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "kueue.log"

    def start(self, kueue: KueueBuild) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        certs = self.dir / "etc-upper" / "kueue" / "metrics" / "certs"
        certs.mkdir(parents=True)
        (self.dir / "etc-work").mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(certs / "tls.key"), "-out", str(certs / "tls.crt"), "-days", "30",
                        "-subj", "/CN=kueue-webhook", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        # The Workload CRD is over the 256 KiB a client-side apply may write
        # into its last-applied annotation.
        self.bench.kubectl("apply", "--server-side", "-f", str(kueue.crds))
        self._wait_established({f"{p.stem.split('_', 1)[1]}.kueue.x-k8s.io" for p in kueue.crds.glob("*.yaml")})
        self.bench.kubectl("create", "namespace", NAMESPACE)
        webhook_port, health_port = _free_port(), _free_port()
        self._apply_webhooks(kueue.webhooks, webhook_port, (certs / "tls.crt").read_bytes())
        config = self.dir / "config.yaml"
        config.write_text(json.dumps(self.configuration(webhook_port, health_port, certs), indent=2))
        script = ('mount -t overlay overlay -o lowerdir=/etc,upperdir="$1",workdir="$2" /etc && shift 2 '
                  '&& exec "$@"')
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                 str(self.dir / "etc-upper"), str(self.dir / "etc-work"),
                 str(kueue.binary), f"--config={config}", f"--kubeconfig={self.bench.kubeconfig}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready(health_port)

    def _wait_established(self, crds: set[str]) -> None:
        """Until every CRD is Established. Polled: on a loaded machine
        `kubectl wait` gave up at once on a CRD the API server was still
        registering."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                listed = json.loads(self.bench.kubectl("get", "crd", "-o", "json"))["items"]
            except RuntimeError:
                listed = []
            established = {c["metadata"]["name"] for c in listed
                           if any(k["type"] == "Established" and k["status"] == "True"
                                  for k in (c.get("status") or {}).get("conditions") or [])}
            if crds <= established:
                return
            time.sleep(1)
        raise RuntimeError(f"Kueue's CRDs not Established after {READY_TIMEOUT_S:.0f} s: {sorted(crds - established)}")

    def configuration(self, webhook_port: int, health_port: int, certs: Path) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "clientConnection": {"qps": self.qps, "burst": self.burst},
            # Evict and requeue a workload whose pods are not all Ready within
            # the timeout; blockAdmission stays off (TAS has already picked
            # the nodes, so admitted pods cannot deadlock on each other).
            "waitForPodsReady": {"timeout": "5m", "blockAdmission": False},
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }

    def _apply_webhooks(self, manifests: Path, port: int, ca: bytes) -> None:
        """Kueue's webhook configurations for batch/v1 Jobs and its own kinds,
        pointed at the local process by URL instead of at a Service."""
        bundle = base64.b64encode(ca).decode()
        for doc in yaml.safe_load_all(manifests.read_text()):
            kept = [hook for hook in doc["webhooks"]
                    if re.search(r"-(batch-v1-job|kueue-x-k8s-io-.*)$", hook["clientConfig"]["service"]["path"])]
            for hook in kept:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
            doc["metadata"] = {"name": f"kueue-{doc['metadata']['name']}"}
            doc["webhooks"] = kept
            self.bench.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def _wait_ready(self, health_port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kueue exited ({self.proc.returncode}); log {self.log}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"kueue not ready after {READY_TIMEOUT_S:.0f} s; log {self.log}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def version(self) -> str:
        """The version the running binary reports in its first log lines."""
        found = re.search(r'"gitVersion"\s*:\s*"([^"]+)"', self.log.read_text(errors="replace"))
        return found.group(1) if found else "unknown"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def queue_objects(pool_gpus: Mapping[str, int], namespace: str) -> list[dict[str, Any]]:
    """A Topology (block, rack, node), then per pool a ResourceFlavor of its
    nodes, a ClusterQueue whose GPU quota is the whole pool, and a LocalQueue
    of the pool's name in `namespace`."""
    objects: list[dict[str, Any]] = [{
        "apiVersion": API_VERSION, "kind": "Topology", "metadata": {"name": TOPOLOGY_NAME},
        "spec": {"levels": [{"nodeLabel": names.LABEL_BLOCK}, {"nodeLabel": names.LABEL_RACK},
                            {"nodeLabel": "kubernetes.io/hostname"}]},
    }]
    for pool, gpus in pool_gpus.items():
        objects += [
            {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": pool},
             "spec": {"nodeLabels": {names.LABEL_POOL: pool}, "topologyName": TOPOLOGY_NAME}},
            {"apiVersion": API_VERSION, "kind": "ClusterQueue", "metadata": {"name": pool},
             "spec": {"namespaceSelector": {}, "resourceGroups": [{
                 "coveredResources": [names.GPU_RESOURCE],
                 "flavors": [{"name": pool, "resources": [{"name": names.GPU_RESOURCE, "nominalQuota": gpus}]}],
             }]}},
            {"apiVersion": API_VERSION, "kind": "LocalQueue", "metadata": {"name": pool, "namespace": namespace},
             "spec": {"clusterQueue": pool}},
        ]
    return objects
