"""Real nodes beside the KWOK ones: containerd, a kubelet and kube-proxy
running pods as real processes, the way kind's nodes do.

A kind node is a container on a Docker network. Here, without Docker, it is
the same set of namespaces:
- the network: a holder process (`sleep`) owns a network namespace with one
  bridge, the switch every node and the host plug into (a veth pair each);
- each node: a holder owns a network namespace and a mount namespace, and
  containerd, the kubelet and kube-proxy are started inside both (nsenter).
  Its iptables rules (kube-proxy's), CNI bridge and pod veths live in its
  network namespace; /var/lib, /var/log and /run are bound, inside the node
  only, to folders of the state directory, so the kubelet's fixed paths
  (device plugins, pod logs) and containerd's (shim sockets, pod network
  namespaces) are the node's own, and every mount the node makes is gone
  with its last process. Two checkouts can run nodes on one machine.
Nodes reach each other's pods by routes through the bridge; the API server
reaches each kubelet (logs, exec, port-forward) at its InternalIP through the
host's veth. Pod cgroups go under a root of each node's own.

The API server listens on 127.0.0.1 of the host and advertises
`devcluster.API_ADVERTISE_ADDRESS` as the `kubernetes` Service's endpoint (an
endpoint may not be a loopback address). Inside each node that address is on
the loopback device, where a small forwarder (`forward`) relays to the
host's 127.0.0.1: a node-local API load balancer, as kubespray's nginx-proxy
or Talos's KubePrism. Pods reach it through kube-proxy's rules for
10.96.0.1:443, as in any cluster.

Pods run images built without a registry (`hack/realnode/build-images.sh`)
and imported into each containerd; CoreDNS runs in a pod as cluster DNS.
`stop` ends every process by pid (the node's processes are those in its
namespaces and cgroups), and the holders last, with which the namespaces,
veths, bridges and iptables rules go; then it removes the cgroups.

Standard library only, like devcluster: `hack/cluster.sh up --real-node`
works before any virtualenv. Needs root, Debian's containerd, runc,
containernetworking-plugins and iptables, and the binaries of
hack/build-kubelet.sh and hack/realnode/build-binaries.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpucluster import devcluster

REPO_ROOT = devcluster.REPO_ROOT
HACK = REPO_ROOT / "hack"
# Labels every real node registers with: `nvidia.com/gpu.present` is what GPU
# feature discovery puts on a GPU node (the agent DaemonSet selects it); the
# other marks the node as real for nodeSelectors (a static pool, the chart's
# values for these nodes, CoreDNS), since KWOK's nodes run nothing.
LABEL_REAL_NODE = "gpucluster.dev/real-node"
NODE_LABELS = {LABEL_REAL_NODE: "true", "nvidia.com/gpu.present": "true"}
# Node i's pods get 10.88.i.0/24.
POD_CIDR = ipaddress.IPv4Network("10.88.0.0/16")
CLUSTER_DNS = "10.96.0.10"
# The nodes' network is a /24 of this range that no address of the host
# falls in, picked per state folder: the host is .1, node i is .(i + 2).
NETWORK_RANGE = ipaddress.IPv4Network("10.89.0.0/16")
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"  # as a node sees it
PAUSE_IMAGE = "localhost/gpucluster-pause:1"
READY_TIMEOUT_S = 180.0
REQUIRED_TOOLS = {
    "containerd": "containerd", "ctr": "containerd", "runc": "runc", "iptables": "iptables",
    "nsenter": "util-linux", "unshare": "util-linux", "ip": "iproute2", "openssl": "openssl",
    "buildah": "buildah", "debootstrap": "debootstrap", "gcc": "gcc",
}
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


class NodeError(RuntimeError):
    """A real node could not start; the message says why (and a log's tail)."""


@dataclass
class Processes:
    """What one holder of namespaces runs, by name: pids, what each one's
    /proc/<pid>/cmdline starts with while it is ours, and logs. `namespaces`
    are the holder's (st_ino of /proc/<pid>/ns/*): every process still in
    them is ours, even once the holder is gone."""

    pids: dict[str, int] = field(default_factory=dict)
    argv0: dict[str, str] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    namespaces: dict[str, int] = field(default_factory=dict)

    @property
    def holder(self) -> int:
        return self.pids["holder"]


@dataclass
class NodeState:
    name: str
    index: int
    ip: str
    pod_subnet: str
    cgroup_root: str
    dir: str
    procs: Processes = field(default_factory=Processes)

    @property
    def root(self) -> Path:
        """What the node sees at /var/lib, /var/log and /run, from the host."""
        return Path(self.dir) / "root"

    @property
    def host_socket(self) -> str:
        """containerd's socket as the host sees it."""
        return str(self.root / "run" / "containerd" / "containerd.sock")


@dataclass
class RealNodes:
    """The nodes of one local cluster and the network they share."""

    dir: str
    cluster_state_dir: str
    subnet: str = ""
    host_ip: str = ""
    veth: str = ""
    images: dict[str, str] = field(default_factory=dict)
    # The cluster's kubectl, as its admin: `stop` deletes the Node objects.
    kubectl: list[str] = field(default_factory=list)
    procs: Processes = field(default_factory=Processes)
    nodes: list[NodeState] = field(default_factory=list)

    def save(self) -> None:
        (Path(self.dir) / "nodes.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, cluster_state_dir: Path) -> RealNodes | None:
        path = state_dir_of(cluster_state_dir) / "nodes.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        nodes = [NodeState(**{**n, "procs": Processes(**n["procs"])}) for n in raw.pop("nodes")]
        return cls(**{**raw, "procs": Processes(**raw.pop("procs")), "nodes": nodes})


def state_dir_of(cluster_state_dir: Path) -> Path:
    return cluster_state_dir / "realnode"


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run real nodes; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (containerd and the kubelet need it)")
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian: {package})")
    if any(not (CNI_BIN_DIR / p).exists() for p in CNI_PLUGINS):
        missing.append(f"CNI plugins in {CNI_BIN_DIR} (Debian: containernetworking-plugins)")
    if not _cgroup_hierarchies():
        missing.append("cgroup v1 controllers under /sys/fs/cgroup (the kubelet here runs with cgroupfs on v1)")
    return missing


# --- processes ---------------------------------------------------------------------------------------


def _run(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise NodeError(f"{' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _enter(procs: Processes, *args: str, mount: bool = True) -> list[str]:
    """The command line that runs `args` inside the holder's namespaces."""
    spaces = [f"--net=/proc/{procs.holder}/ns/net"]
    if mount:
        spaces.append(f"--mount=/proc/{procs.holder}/ns/mnt")
    return ["nsenter", *spaces, "--", *args]


# Processes started by this `up`, by pid: liveness is asked of the Popen
# object, since /proc/<pid>/cmdline can still read the parent's just after exec.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _start(procs: Processes, log: Path, name: str, argv: list[str], argv0: str,
           env: dict[str, str] | None = None) -> None:
    with open(log, "ab") as out:
        # A session of its own: the node outlives `up` and is stopped by pid.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    _children[proc.pid] = proc
    procs.pids[name], procs.argv0[name], procs.logs[name] = proc.pid, argv0, str(log)


def _alive(procs: Processes, name: str) -> bool:
    pid = procs.pids.get(name)
    if pid is None:
        return False
    if pid in _children:
        return _children[pid].poll() is None
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return argv0 == procs.argv0[name]


def _wait(procs: Processes, name: str, check: Callable[[], bool], what: str,
          timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(procs, name):
            raise NodeError(f"{name} exited before {what}; last lines of {procs.logs[name]}:\n"
                            f"{devcluster._tail(procs.logs[name])}")
        if check():
            return
        time.sleep(0.5)
    raise NodeError(f"{name} not {what} after {timeout:.0f} s; last lines of {procs.logs[name]}:\n"
                    f"{devcluster._tail(procs.logs[name])}")


def _hold(procs: Processes, log: Path, unshare: list[str], script: str, *args: str) -> None:
    """Starts a holder: `unshare`, then `script`, which sets the namespaces
    up, touches its last argument and execs `sleep infinity`."""
    ready = log.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    _start(procs, log, "holder", ["unshare", *unshare, "--", "sh", "-c", script, "sh", *args, str(ready)],
           argv0="sleep")
    _wait(procs, "holder", ready.exists, "holding its namespaces", 30)
    procs.namespaces = {ns: os.stat(f"/proc/{procs.holder}/ns/{ns}").st_ino
                        for ns in ("net", "mnt") if ns == "net" or "--mount" in unshare}


NETWORK_SCRIPT = """set -e
ip link set lo up
ip link add br0 type bridge
ip link set br0 up
touch "$1"
exec sleep infinity
"""

NODE_SCRIPT = """set -e
mount --bind "$1/var/lib" /var/lib
mount --bind "$1/var/log" /var/log
mount --bind "$1/run" /run
ip link set lo up
ip addr add "$2/32" dev lo
sysctl -qw net.ipv4.ip_forward=1
touch "$3"
exec sleep infinity
"""


# --- addresses ---------------------------------------------------------------------------------------


def _pick_subnet(state_dir: Path) -> ipaddress.IPv4Network:
    """A /24 for the nodes' network that no address of the host falls in,
    starting from one derived from the state folder (two checkouts seldom
    try the same one)."""
    used = [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(_run("ip", "-json", "addr")) for a in link.get("addr_info", [])
            if a.get("family") == "inet"]
    subnets = list(NETWORK_RANGE.subnets(new_prefix=24))
    first = int(_hash(str(state_dir), 64), 16) % len(subnets)
    for subnet in subnets[first:] + subnets[:first]:
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise NodeError(f"no free /24 in {NETWORK_RANGE} for the nodes' network")


def _node_ip(subnet: ipaddress.IPv4Network, index: int) -> str:
    return str(subnet.network_address + 2 + index)


def _pod_subnet(index: int) -> str:
    return str(list(POD_CIDR.subnets(new_prefix=24))[index])


def _hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# --- certificates and configuration ------------------------------------------------------------------


def _client_kubeconfig(cluster: devcluster.ClusterState, node: NodeState, user: str, subject: str) -> Path:
    """A client certificate signed by the cluster's CA, and a kubeconfig that
    reaches the API server through the node's forwarder."""
    pki = Path(cluster.state_dir) / "pki"
    out = Path(node.dir) / "pki"
    out.mkdir(exist_ok=True)
    ext = out / "client.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\n")
    key, csr, crt = (out / f"{user}.{e}" for e in ("key", "csr", "crt"))
    _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", subject)
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
         "-CAcreateserial", "-CAserial", str(out / "ca.srl"), "-days", "365", "-out", str(crt),
         "-extfile", str(ext))
    path = Path(node.dir) / f"{user}.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": f"https://{devcluster.API_ADVERTISE_ADDRESS}:{cluster.ports['apiserver']}",
            "certificate-authority": str(pki / "ca.crt"),
            # The serving certificate names 127.0.0.1 and kubernetes, not the
            # node-local address the forwarder answers on.
            "tls-server-name": "kubernetes"}}],
        "users": [{"name": user, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }, indent=2))
    return path


def _containerd_config(node: NodeState) -> Path:
    # The paths are the node's: /var/lib and /run are its own inside its
    # mount namespace, so the CNI configuration sits under /var/lib too.
    path = Path(node.dir) / "containerd.toml"
    path.write_text(f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{CONTAINERD_SOCKET}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE on these machines: without this every container
  # start fails ("can't get final child's PID from pipe") trying to set an
  # OOM score below containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroup v1 with the cgroupfs driver, as the kubelet: no systemd here.
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "/var/lib/cni/net.d"
""")
    return path


def _cni_config(node: NodeState) -> None:
    conf_dir = node.root / "var" / "lib" / "cni" / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-gpucluster.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "gpucluster",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             # A pod reaching itself through a Service comes back to its own port.
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": node.pod_subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=2))


def _kubelet_config(cluster: devcluster.ClusterState, node: NodeState) -> Path:
    resolv = Path(node.dir) / "resolv.conf"
    # Pods get cluster DNS only: the host's resolver is not reachable from
    # the nodes, and its search domains would only slow every lookup down.
    resolv.write_text("")
    path = Path(node.dir) / "kubelet.json"
    path.write_text(json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": node.ip, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        # The API server presents the cluster's admin certificate (its
        # --kubelet-client-certificate); anyone else is asked about.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(Path(cluster.state_dir) / "pki" / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        # cgroup v1 (hybrid) with cgroupfs: no systemd runs here. The pods'
        # cgroups go under a root of this node's own, not /kubepods, so that
        # no other node on the machine ever shares them.
        "cgroupDriver": "cgroupfs", "failCgroupV1": False, "cgroupRoot": node.cgroup_root,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "clusterDNS": [CLUSTER_DNS], "clusterDomain": "cluster.local", "resolvConf": str(resolv),
        "failSwapOn": False,
        # The images are imported, not pulled: garbage collection would lose
        # them for good, and a shared build machine's disk is often fuller
        # than the eviction defaults like.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "registerNode": True,
    }, indent=2))
    return path


def _kube_proxy_config(node: NodeState, kubeconfig: Path) -> Path:
    path = Path(node.dir) / "kube-proxy.json"
    path.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables", "hostnameOverride": node.name, "clusterCIDR": str(POD_CIDR),
        "nodePortAddresses": ["primary"],
        "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
        # Service traffic between pods of one bridge comes back through the
        # node, whether or not the host loads br_netfilter.
        "iptables": {"masqueradeAll": True},
        # nf_conntrack_max is the host's, shared with everything else on the
        # machine: leave it, and the timeouts, as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }, indent=2))
    return path


# --- cgroups -----------------------------------------------------------------------------------------


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies mounted under /sys/fs/cgroup."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup" and fields[4].startswith("/sys/fs/cgroup/"):
            found.append(Path(fields[4]))
    return found


def _make_cgroup_root(node: NodeState) -> None:
    for hierarchy in _cgroup_hierarchies():
        path = hierarchy / node.cgroup_root.lstrip("/")
        path.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            # A new v1 cpuset starts with no CPUs and no memory nodes; the
            # cgroups the kubelet makes below copy these.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (path / knob).write_text((hierarchy / knob).read_text())


def _cgroup_pids(node: NodeState) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / node.cgroup_root.lstrip("/")
        if root.is_dir():
            for procs in root.rglob("cgroup.procs"):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _remove_cgroups(node: NodeState) -> None:
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / node.cgroup_root.lstrip("/")
        if root.is_dir():
            # Children before parents: a cgroup goes only once it has none.
            for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                path.rmdir()
            root.rmdir()


# --- the API server's node-local forwarder -----------------------------------------------------------


CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def forward(netns: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
    """Relays TCP connections made to `listen` inside the network namespace
    `netns` to `target` in this process's own. The listening socket is made
    inside the node's namespace and stays there; connections to the target
    are made after switching back."""
    with open("/proc/self/ns/net") as home, open(netns) as node:
        _setns(node.fileno())
        server = socket.create_server(listen)
        _setns(home.fileno())

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def serve() -> None:
        async with await asyncio.start_server(relay, sock=server):
            await asyncio.Event().wait()

    asyncio.run(serve())


# --- start -------------------------------------------------------------------------------------------


def build_images() -> dict[str, str]:
    """Runs hack/realnode/build-images.sh (cached by a hash of its inputs;
    its progress goes to stderr) and returns image reference -> archive."""
    out = subprocess.run(["bash", str(HACK / "realnode" / "build-images.sh")], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise NodeError("hack/realnode/build-images.sh failed (its output is above)")
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


class Kubectl:
    """The cached kubectl, as the cluster's admin."""

    def __init__(self, cluster: devcluster.ClusterState) -> None:
        self.argv = [str(Path(cluster.bin_dir) / "kubectl"), f"--kubeconfig={cluster.kubeconfig}"]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run([*self.argv, *args], input=input, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def node_ready(self, name: str) -> bool:
        out = self("get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                   check=False)
        return out.strip() == "True"


def start(cluster: devcluster.ClusterState, count: int = 1) -> RealNodes:
    """Starts `count` real nodes on their network and returns once every one
    is Ready and CoreDNS is available."""
    missing = missing_prerequisites()
    if missing:
        raise NodeError("this machine lacks what a real node needs: " + "; ".join(missing))
    started = time.monotonic()
    for script in ("build-kubelet.sh", "realnode/build-binaries.sh"):
        subprocess.run(["bash", str(HACK / script)], check=True, stdout=subprocess.DEVNULL)
    images = build_images()
    cluster_dir = Path(cluster.state_dir)
    stop(cluster_dir)
    sdir = state_dir_of(cluster_dir)
    shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir(parents=True)
    kubectl = Kubectl(cluster)
    nodes = RealNodes(dir=str(sdir), cluster_state_dir=str(cluster_dir), images=images, kubectl=kubectl.argv)
    try:
        _start_network(nodes)
        for index in range(count):
            _start_node(cluster, nodes, index, count)
        for node in nodes.nodes:
            _wait(node.procs, "kubelet", functools.partial(kubectl.node_ready, node.name), "Ready")
        _start_coredns(kubectl, nodes)
    except BaseException:
        stop(cluster_dir)
        raise
    print(f"{count} real node(s) up in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return nodes


def _log(nodes: RealNodes, name: str) -> Path:
    return Path(nodes.cluster_state_dir) / "logs" / f"realnode-{name}.log"


def _start_network(nodes: RealNodes) -> None:
    subnet = _pick_subnet(Path(nodes.dir))
    nodes.subnet, nodes.host_ip = str(subnet), str(subnet.network_address + 1)
    # Interface names hold 15 characters; the hash keeps checkouts apart.
    nodes.veth = "gpcn" + _hash(nodes.dir)
    _hold(nodes.procs, _log(nodes, "network"), ["--net"], NETWORK_SCRIPT)
    nodes.save()
    _run("ip", "link", "add", nodes.veth, "type", "veth", "peer", "name", "host", "netns", str(nodes.procs.holder))
    _run("ip", "addr", "add", f"{nodes.host_ip}/{subnet.prefixlen}", "dev", nodes.veth)
    _run("ip", "link", "set", nodes.veth, "up")
    _run(*_enter(nodes.procs, "ip", "link", "set", "host", "master", "br0", "up", mount=False))


def _start_node(cluster: devcluster.ClusterState, nodes: RealNodes, index: int, count: int) -> None:
    subnet = ipaddress.IPv4Network(nodes.subnet)
    name = f"realnode-{index}"
    node = NodeState(name=name, index=index, ip=_node_ip(subnet, index), pod_subnet=_pod_subnet(index),
                     cgroup_root=f"/gpucluster-{_hash(nodes.dir)}-{index}", dir=str(Path(nodes.dir) / name))
    for sub in ("var/lib", "var/log", "run"):
        (node.root / sub).mkdir(parents=True)
    nodes.nodes.append(node)
    procs = node.procs
    _hold(procs, _log(nodes, f"{index}-holder"), ["--net", "--mount", "--propagation", "private"],
          NODE_SCRIPT, str(node.root), devcluster.API_ADVERTISE_ADDRESS)
    nodes.save()

    # The node's eth0 is plugged into the network's bridge.
    port = f"node{index}"
    _run(*_enter(nodes.procs, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", str(procs.holder), mount=False))
    _run(*_enter(nodes.procs, "ip", "link", "set", port, "master", "br0", "up", mount=False))
    commands = [["addr", "add", f"{node.ip}/{subnet.prefixlen}", "dev", "eth0"], ["link", "set", "eth0", "up"],
                ["route", "add", "default", "via", nodes.host_ip]]
    # Every other node's pods are behind that node.
    commands += [["route", "add", _pod_subnet(other), "via", _node_ip(subnet, other)]
                 for other in range(count) if other != index]
    for args in commands:
        _run(*_enter(procs, "ip", *args))

    port_number = cluster.ports["apiserver"]
    _start(procs, _log(nodes, f"{index}-apiserver-forwarder"), "apiserver-forwarder", [
        sys.executable, "-m", "gpucluster.realnode", "_forward", f"/proc/{procs.holder}/ns/net",
        devcluster.API_ADVERTISE_ADDRESS, str(port_number), str(port_number)], argv0=sys.executable,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator")})

    _cni_config(node)
    containerd = shutil.which("containerd") or "containerd"
    _start(procs, _log(nodes, f"{index}-containerd"), "containerd",
           _enter(procs, containerd, "--config", str(_containerd_config(node))), argv0=containerd)
    nodes.save()
    _wait(procs, "containerd", lambda: Path(node.host_socket).exists(), "serving its socket", 60)
    for image, archive in nodes.images.items():
        started = time.monotonic()
        _run("ctr", "--address", node.host_socket, "--namespace", "k8s.io", "images", "import", archive)
        print(f"{name}: imported {image} in {time.monotonic() - started:.1f} s", file=sys.stderr)

    _make_cgroup_root(node)
    kubelet = _bin(cluster, "kubelet")
    kubeconfig = _client_kubeconfig(cluster, node, "kubelet", f"/O=system:nodes/CN=system:node:{name}")
    labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
    _start(procs, _log(nodes, f"{index}-kubelet"), "kubelet", _enter(
        procs, kubelet, f"--config={_kubelet_config(cluster, node)}", f"--kubeconfig={kubeconfig}",
        f"--hostname-override={name}", f"--node-ip={node.ip}", f"--node-labels={labels}", "--v=1"), argv0=kubelet)
    kube_proxy = _bin(cluster, "kube-proxy")
    kubeconfig = _client_kubeconfig(cluster, node, "kube-proxy", "/CN=system:kube-proxy")
    _start(procs, _log(nodes, f"{index}-kube-proxy"), "kube-proxy", _enter(
        procs, kube_proxy, f"--config={_kube_proxy_config(node, kubeconfig)}", "--v=1"), argv0=kube_proxy)
    nodes.save()


def _bin(cluster: devcluster.ClusterState, name: str) -> str:
    path = Path(cluster.bin_dir) / name
    if not path.exists():
        raise NodeError(f"no {path}: hack/build-kubelet.sh and hack/realnode/build-binaries.sh build it")
    return str(path)


def _start_coredns(kubectl: Kubectl, nodes: RealNodes) -> None:
    image = next(i for i in nodes.images if "coredns" in i)
    manifest = string.Template((HACK / "realnode" / "coredns.yaml").read_text()).substitute(
        IMAGE=image, CLUSTER_DNS=CLUSTER_DNS, NODE_LABEL_KEY=LABEL_REAL_NODE)
    kubectl("apply", "-f", "-", input=manifest)
    kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", f"--timeout={READY_TIMEOUT_S:.0f}s")


# --- stop --------------------------------------------------------------------------------------------


def _held(procs: Processes) -> dict[str, int]:
    """The holder's namespaces, while its holder holds them: only then is
    every process in them surely ours. Once a namespace is gone the kernel
    gives its inode number to new ones, so a number alone proves nothing."""
    if not _alive(procs, "holder"):
        return {}
    try:
        held = {ns: os.stat(f"/proc/{procs.holder}/ns/{ns}").st_ino for ns in procs.namespaces}
    except OSError:
        return {}
    return procs.namespaces if held == procs.namespaces else {}


def _pids_in(namespaces: dict[str, int]) -> set[int]:
    """Every process in any of these namespaces."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for ns, inode in namespaces.items():
            try:
                if os.stat(entry / "ns" / ns).st_ino == inode:
                    found.add(int(entry.name))
                    break
            except OSError:
                break
    return found - {os.getpid()}


def _terminate(pid: int, wait_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `wait_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    if pid in _children:
        return _children[pid].poll() is not None
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_node(node: NodeState) -> list[str]:
    procs = node.procs
    held = _held(procs)
    stopped = []
    for name in ("kubelet", "kube-proxy"):
        if _alive(procs, name):
            _terminate(procs.pids[name])
            stopped.append(f"{node.name}/{name}")
    if _alive(procs, "containerd"):
        # Through containerd first, so that every shim ends its container and exits.
        ctr = ["ctr", "--address", node.host_socket, "--namespace", "k8s.io"]
        tasks = subprocess.run([*ctr, "tasks", "ls", "--quiet"], capture_output=True, text=True).stdout.split()
        for task in tasks:
            subprocess.run([*ctr, "tasks", "kill", "--all", "--signal", "SIGKILL", task], capture_output=True)
        for task in tasks:
            subprocess.run([*ctr, "tasks", "delete", "--force", task], capture_output=True)
        _terminate(procs.pids["containerd"])
        stopped.append(f"{node.name}/containerd")
    # Whatever is left of the node (a shim, a container's process) is killed
    # by pid; then the forwarder and the holder.
    holder = procs.pids.get("holder", 0)
    _kill((_pids_in(held) | _cgroup_pids(node)) - {holder})
    for name in ("apiserver-forwarder", "holder"):
        if _alive(procs, name):
            _terminate(procs.pids[name])
            stopped.append(f"{node.name}/{name}")
    _wait_until(lambda: not (_pids_in(held) | _cgroup_pids(node)))
    _remove_cgroups(node)
    procs.pids = {}
    return stopped


def _wait_until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


def stop(cluster_state_dir: Path) -> list[str]:
    """Stops the real nodes of this cluster state folder, if any run, and
    their network; returns the names of what it stopped."""
    nodes = RealNodes.load(cluster_state_dir)
    if nodes is None:
        return []
    stopped = []
    for node in nodes.nodes:
        stopped += _stop_node(node)
        nodes.save()
    if nodes.nodes and nodes.kubectl:
        # Gone, not NotReady: a later `up` may start fewer nodes. Best effort:
        # the API server may be down already.
        subprocess.run([*nodes.kubectl, "delete", "node", "--wait=false", "--request-timeout=10s",
                        *(n.name for n in nodes.nodes)], capture_output=True)
    held = _held(nodes.procs)
    _kill(_pids_in(held) - {nodes.procs.pids.get("holder", 0)})
    if _alive(nodes.procs, "holder"):
        _terminate(nodes.procs.holder)
        stopped.append("network")
    _wait_until(lambda: not _pids_in(held))
    # The veth goes with the network's namespace, once the kernel has torn
    # that down (after its last process, not at once); if it lingers past
    # the wait, it is deleted (and may vanish meanwhile: no error then).
    veth = Path(f"/sys/class/net/{nodes.veth}")
    if nodes.veth:
        _wait_until(lambda: not veth.exists())
        if veth.exists():
            subprocess.run(["ip", "link", "del", nodes.veth], capture_output=True)
    nodes.procs.pids = {}
    nodes.save()
    for thing in leftovers(cluster_state_dir):
        print(f"warning: the real nodes left behind {thing}", file=sys.stderr)
    return stopped


def leftovers(cluster_state_dir: Path) -> list[str]:
    """What of the real nodes of this state folder is still on the machine:
    processes in their namespaces or cgroups, cgroups, the host's veth,
    mounts under the state folder. Empty after a clean `stop`."""
    nodes = RealNodes.load(cluster_state_dir)
    if nodes is None:
        return []
    found = [f"process {pid} in the network's namespace" for pid in _pids_in(_held(nodes.procs))]
    if nodes.veth and Path(f"/sys/class/net/{nodes.veth}").exists():
        found.append(f"host interface {nodes.veth}")
    for node in nodes.nodes:
        found += [f"process {pid} of {node.name}" for pid in _pids_in(_held(node.procs)) | _cgroup_pids(node)]
        found += [f"cgroup {h / node.cgroup_root.lstrip('/')}" for h in _cgroup_hierarchies()
                  if (h / node.cgroup_root.lstrip("/")).exists()]
    found += [f"mount on {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(nodes.dir)]
    return found


def running(cluster_state_dir: Path) -> RealNodes | None:
    """The real nodes of this cluster state folder while their network runs."""
    nodes = RealNodes.load(cluster_state_dir)
    return nodes if nodes is not None and _alive(nodes.procs, "holder") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpucluster.realnode", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("up", "down", "status"):
        p = sub.add_parser(action)
        p.add_argument("--state-dir", type=Path, default=devcluster.DEFAULT_STATE_DIR,
                       help="the local cluster's state folder (default: %(default)s)")
        if action == "up":
            p.add_argument("--nodes", type=int, default=1, help="how many real nodes (default: %(default)s)")
    fwd = sub.add_parser("_forward", help=argparse.SUPPRESS)
    fwd.add_argument("netns")
    fwd.add_argument("address")
    fwd.add_argument("port", type=int)
    fwd.add_argument("target_port", type=int)
    args = parser.parse_args(argv)
    if args.action == "_forward":
        forward(args.netns, (args.address, args.port), ("127.0.0.1", args.target_port))
        return 0
    state_dir: Path = args.state_dir.resolve()
    try:
        if args.action == "up":
            cluster = devcluster.status(state_dir)
            if cluster is None:
                raise NodeError(f"no cluster of {state_dir} is up: `hack/cluster.sh up` first")
            start(cluster, args.nodes)
        elif args.action == "down":
            print(f"stopped: {', '.join(stop(state_dir)) or 'nothing was running'}", file=sys.stderr)
        else:
            nodes = running(state_dir)
            if nodes is None:
                print("down", file=sys.stderr)
                return 1
            print(json.dumps({n.name: {"ip": n.ip, "pids": n.procs.pids, "logs": n.procs.logs}
                              for n in nodes.nodes}, indent=2))
    except NodeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
