"""`gpucluster device-plugin` against a real kubelet's device manager.

A real kubelet (k8s.io/kubernetes/cmd/kubelet, the pinned version) registers
a node with the session's API server, its container runtime played by
hack/fakecri (the upstream fake CRI: sandboxes and containers exist only in
its memory, nothing runs). The plugin registers with that kubelet, which
then offers nvidia.com/gpu on the node, admits a pod asking for GPUs, calls
Allocate (its checkpoint records the devices and our response) and takes an
unhealthy GPU out of allocatable.

The kubelet keeps its device-plugin socket at the fixed path
/var/lib/kubelet/device-plugins/ and its pod logs under /var/log, whatever
--root-dir says, so it runs in a mount namespace of its own (unshare) with
scratch folders bound over /var/lib and /var/log: nothing of the host's is
touched, and its tmpfs mounts vanish with it. Needs root, unshare, and the
binaries of hack/build-kubelet.sh (skipped without them).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gpucluster import devcluster
from gpucluster.agent._proto import api_pb2
from gpucluster.agent.devices import numa_node_of
from gpucluster.agent.fake import FakeGpuSet
from gpucluster.agent.gpu_profile import H100_80GB_HBM3, load_profile
from gpucluster.names import ANNOTATION_INJECT_FAULT, GPU_RESOURCE

from .harness import GpuclusterProcess, Kubectl, free_port, node_ready, stop_process, wait_for

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
NODE = f"dp-kubelet-{RUN}"
GPUS = 8
# Keeps the scheduler from placing other tests' pods on this real node.
TAINT_KEY = "gpucluster.dev/real-kubelet"
NAMESPACE = "default"
CHECKPOINT = "kubelet_internal_checkpoint"


class DevicePluginProcess(GpuclusterProcess):
    role = "device-plugin"

    def __init__(self, kubeconfig: str, log_dir: Path, plugin_dir: Path) -> None:
        super().__init__(kubeconfig, log_dir)
        self.plugin_dir = plugin_dir

    def command(self) -> list[str]:
        return ["device-plugin", "--backend", "fake", "--gpus", str(GPUS), "--node-name", NODE,
                "--plugin-dir", str(self.plugin_dir), "--interval", "0.5", "--watch-faults",
                "--kubeconfig", self.kubeconfig]


@dataclass
class RealKubelet:
    """The fake CRI, the kubelet (in its own mount namespace) and the plugin."""

    bin_dir: Path
    scratch: Path
    log_dir: Path
    kubeconfig: str  # the kubelet's own, as system:node:NODE
    fakecri: subprocess.Popen[bytes] | None = None
    kubelet: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def plugin_dir(self) -> Path:
        """/var/lib/kubelet/device-plugins as the kubelet sees it."""
        return self.scratch / "var-lib" / "kubelet" / "device-plugins"

    @property
    def cri_endpoint(self) -> str:
        return f"unix://{self.scratch / 'fakecri.sock'}"

    def start_fakecri(self) -> None:
        with open(self.log_dir / "fakecri.log", "ab") as log:
            self.fakecri = subprocess.Popen(
                [str(self.bin_dir / "fakecri"), "--listen", self.cri_endpoint],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: (self.scratch / "fakecri.sock").exists(), timeout=10, what="fakecri's socket")

    def start_kubelet(self) -> None:
        self.starts += 1
        for sub in ("var-lib", "var-log"):
            (self.scratch / sub).mkdir(exist_ok=True)
        config = self.scratch / "kubelet-config.json"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            # No QoS cgroups nor node-allocatable enforcement: nothing runs.
            "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "failSwapOn": False, "localStorageCapacityIsolation": False, "evictionHard": {},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "containerRuntimeEndpoint": self.cri_endpoint, "imageServiceEndpoint": self.cri_endpoint,
            "registerNode": True,
            "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
            "nodeStatusUpdateFrequency": "2s",
        }))
        # In a private mount namespace, scratch folders stand in for /var/lib
        # (the fixed device-plugin directory) and /var/log (pod logs).
        script = 'set -e; mount --bind "$1" /var/lib; mount --bind "$2" /var/log; shift 2; exec "$@"'
        command = [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            str(self.scratch / "var-lib"), str(self.scratch / "var-log"),
            str(self.bin_dir / "kubelet"), f"--config={config}", f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={self.scratch / 'root'}", f"--cert-dir={self.scratch / 'root' / 'pki'}",
            f"--hostname-override={NODE}", f"--node-labels=gpucluster.dev/test-run={RUN}", "--v=2",
        ]
        with open(self.log_path, "ab") as log:
            self.kubelet = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self._kubelet_exited() or (self.plugin_dir / "kubelet.sock").exists(),
                 timeout=30, what="the kubelet's registration socket")
        assert not self._kubelet_exited(), f"the kubelet exited; log:\n{self.log_tail()}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"kubelet-{self.starts}.log"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _kubelet_exited(self) -> bool:
        return self.kubelet is not None and self.kubelet.poll() is not None

    def stop_kubelet(self) -> None:
        stop_process(self.kubelet)
        self.kubelet = None

    def stop(self) -> None:
        self.stop_kubelet()
        stop_process(self.fakecri)
        self.fakecri = None

    def checkpoint(self) -> dict[str, Any]:
        path = self.plugin_dir / CHECKPOINT
        return dict(json.loads(path.read_text())["Data"]) if path.exists() else {}


def _skip_reason(bin_dir: Path, pki: Path) -> str | None:
    missing = [b for b in ("kubelet", "fakecri") if not (bin_dir / b).exists()]
    if missing:
        return f"no {' or '.join(missing)} in {bin_dir}: run hack/build-kubelet.sh"
    if os.geteuid() != 0:
        return "the kubelet needs root"
    if shutil.which("unshare") is None or shutil.which("openssl") is None:
        return "needs unshare (util-linux) and openssl"
    if not (pki / "ca.key").exists():
        return f"no cluster CA key at {pki}: the kubelet's client certificate is signed with it"
    return None


def _node_kubeconfig(kubectl: Kubectl, pki: Path, scratch: Path) -> str:
    """A client certificate for system:node:NODE (group system:nodes), as the
    Node authorizer expects of a kubelet, signed by the cluster's CA."""
    key, csr, crt = (scratch / f"kubelet.{ext}" for ext in ("key", "csr", "crt"))
    ext = scratch / "kubelet.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/O=system:nodes/CN=system:node:{NODE}")
    run("x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
        "-CAcreateserial", "-CAserial", str(scratch / "ca.srl"), "-days", "2", "-out", str(crt),
        "-extfile", str(ext))
    server = kubectl.run("config", "view", "--minify", "-o",
                         "jsonpath={.clusters[0].cluster.server}").stdout.strip()
    path = scratch / "kubelet.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server,
                                                    "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "kubelet", "user": {"client-certificate": str(crt), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "kubelet"}}],
        "current-context": "local",
    }))
    return str(path)


@pytest.fixture(scope="module")
def real_kubelet(cluster: devcluster.ClusterState, kubectl: Kubectl,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealKubelet]:
    bin_dir = Path(cluster.bin_dir)
    pki = Path(cluster.state_dir) / "pki"
    reason = _skip_reason(bin_dir, pki)
    if reason:
        pytest.skip(reason)
    # Short: unix socket paths are limited to 107 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="gpk-"))
    kubelet = RealKubelet(bin_dir, scratch, tmp_path_factory.mktemp("kubelet-logs"),
                          _node_kubeconfig(kubectl, pki, scratch))
    try:
        kubelet.start_fakecri()
        kubelet.start_kubelet()
        wait_for(lambda: node_ready(kubectl, NODE), timeout=60,
                 what=f"node {NODE} Ready; kubelet log: {kubelet.log_path}")
        yield kubelet
    finally:
        kubelet.stop()
        kubectl.run("delete", "pods", "-n", NAMESPACE, "-l", f"gpucluster.dev/test-run={RUN}",
                    "--force", "--grace-period=0", "--ignore-not-found", check=False)
        kubectl.run("delete", "node", NODE, "--ignore-not-found", check=False)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def plugin(real_kubelet: RealKubelet, kubeconfig: str) -> Iterator[DevicePluginProcess]:
    proc = DevicePluginProcess(kubeconfig, real_kubelet.log_dir, real_kubelet.plugin_dir)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _gpus(kubectl: Kubectl) -> tuple[str | None, str | None]:
    status = kubectl.get("node", NODE)["status"]
    return status.get("capacity", {}).get(GPU_RESOURCE), status.get("allocatable", {}).get(GPU_RESOURCE)


def _gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"gpucluster.dev/test-run": RUN}},
        "spec": {
            "nodeName": NODE,
            "automountServiceAccountToken": False,
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists"}],
            "containers": [{"name": "trainer", "image": "registry.invalid/cuda:fake",
                            "resources": {"limits": {GPU_RESOURCE: str(gpus)}}}],
        },
    }


def _index_of_uuid() -> dict[str, int]:
    """The fake backend names GPU i of a node by a UUID derived from the node."""
    return {r.uuid: r.index for r in FakeGpuSet(load_profile(H100_80GB_HBM3), NODE, GPUS).read()}


def _entries(kubelet: RealKubelet) -> list[dict[str, Any]]:
    return [e for e in kubelet.checkpoint().get("PodDeviceEntries") or []
            if e["ResourceName"] == GPU_RESOURCE]


def test_the_kubelet_offers_the_plugins_gpus(real_kubelet: RealKubelet, plugin: DevicePluginProcess,
                                            kubectl: Kubectl) -> None:
    wait_for(lambda: _gpus(kubectl) == (str(GPUS), str(GPUS)), timeout=60,
             what=f"nvidia.com/gpu capacity and allocatable {GPUS}; plugin log: {plugin.log_path}, "
             f"kubelet log: {real_kubelet.log_path}")
    registered = real_kubelet.checkpoint()["RegisteredDevices"][GPU_RESOURCE]
    assert sorted(registered) == sorted(_index_of_uuid())


def test_a_gpu_pod_is_admitted_and_allocated(real_kubelet: RealKubelet, plugin: DevicePluginProcess,
                                             kubectl: Kubectl) -> None:
    kubectl.apply(_gpu_pod("gpu-pod", 2))
    wait_for(lambda: kubectl.get("pod", "-n", NAMESPACE, "gpu-pod")["status"].get("phase") == "Running",
             timeout=60, what=f"gpu-pod Running; kubelet log: {real_kubelet.log_path}")
    uid = kubectl.get("pod", "-n", NAMESPACE, "gpu-pod")["metadata"]["uid"]
    entries = [e for e in _entries(real_kubelet) if e["PodUID"] == uid]
    assert len(entries) == 1, real_kubelet.checkpoint()
    devices = [d for ids in entries[0]["DeviceIDs"].values() for d in ids]
    assert len(devices) == 2
    # The kubelet kept what our Allocate answered: the GPUs in NVIDIA_VISIBLE_DEVICES.
    response = api_pb2.ContainerAllocateResponse.FromString(base64.b64decode(entries[0]["AllocResp"]))
    assert sorted(response.envs["NVIDIA_VISIBLE_DEVICES"].split(",")) == sorted(devices)
    # GetPreferredAllocation: both GPUs on one NUMA node.
    index = _index_of_uuid()
    assert len({numa_node_of(index[d], GPUS) for d in devices}) == 1, devices


def test_an_injected_fault_lowers_allocatable(real_kubelet: RealKubelet, plugin: DevicePluginProcess,
                                              kubectl: Kubectl) -> None:
    index = _index_of_uuid()
    in_use = {index[d] for e in _entries(real_kubelet) for ids in e["DeviceIDs"].values() for d in ids}
    faulty = max(set(range(GPUS)) - in_use)
    kubectl.run("annotate", "node", NODE, "--overwrite", f"{ANNOTATION_INJECT_FAULT}=gpu={faulty},xid=79")
    wait_for(lambda: _gpus(kubectl) == (str(GPUS), str(GPUS - 1)), timeout=60,
             what=f"allocatable {GPUS - 1} after an XID 79 on GPU {faulty}; plugin log: {plugin.log_path}")
    # A pod that would have fitted on the free GPUs before the fault is now
    # refused by the kubelet's device manager.
    wanted = GPUS - len(in_use)
    kubectl.apply(_gpu_pod("gpu-pod-too-big", wanted))
    pod = wait_for(lambda: (p := kubectl.get("pod", "-n", NAMESPACE, "gpu-pod-too-big"))["status"].get("phase")
                   == "Failed" and p, timeout=60, what="the kubelet to reject gpu-pod-too-big")
    assert pod["status"]["reason"] == "UnexpectedAdmissionError"
    assert f"Requested: {wanted}, Available: {wanted - 1}" in pod["status"]["message"]


def test_the_plugin_registers_again_when_the_kubelet_restarts(
    real_kubelet: RealKubelet, plugin: DevicePluginProcess, kubectl: Kubectl
) -> None:
    real_kubelet.stop_kubelet()
    real_kubelet.start_kubelet()
    # The new kubelet wipes the plugin's socket; the plugin serves and registers again.
    wait_for(lambda: plugin.log_path.read_text().count("registered nvidia.com/gpu") >= 2, timeout=60,
             what=f"a second registration; plugin log: {plugin.log_path}")
    wait_for(lambda: "Processed device updates" in real_kubelet.log_path.read_text(), timeout=30,
             what=f"the kubelet to take the plugin's devices; log: {real_kubelet.log_path}")
    # The running pod keeps its GPUs across the restart (from the checkpoint),
    # and the faulty GPU stays out.
    assert len(_entries(real_kubelet)) == 1
    wait_for(lambda: _gpus(kubectl) == (str(GPUS), str(GPUS - 1)), timeout=60,
             what=f"allocatable {GPUS - 1} after the restart")
