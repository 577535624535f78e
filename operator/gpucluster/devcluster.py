"""A real local Kubernetes control plane with KWOK-simulated GPU nodes.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the KWOK
controller run as plain processes on 127.0.0.1, with TLS and client
certificates made here, RBAC on, and every port picked free at start so two
checkouts can run side by side. It is the embedded default of the demo and
of the integration tests: no Docker and no existing cluster needed.

Nodes stay Ready the way kubelets keep them Ready, so that the operator
sees the Node traffic of a real cluster (`hack/kwok.yaml` is KWOK's
configuration; `bench/hold.py` measures what it costs):
- KWOK renews each node's Lease every 10 s (a quarter of its 40 s
  duration, as the kubelet does).
- The controller manager marks a node NotReady when neither its Lease nor
  its status moved for 900 s (checked every 5 s), not Kubernetes' 50 s:
  twice the longest status interval, so that either keeps a node Ready. (At
  600 s, 150 s past the longest interval, KWOK's posts fell that far behind
  under a 25,000-node run's jobs phase: nodes went NotReady for a while and
  gangs restarted.) On 2
  shared cores the API server can't take thousands of renewals every 10 s,
  and KWOK serves new nodes' Leases before renewals: with 50 s, 2,000 nodes
  created at once flapped from about 450 Ready on (`bench/hold.py`, at a
  load of 22). A KWOK that stops is still noticed, after 15 minutes; tests
  that need a node down say so (below).
- The Node status is posted by a heartbeat Stage 150 s to 450 s (uniformly)
  after the node last changed: 300 s on average, the kubelet's report
  interval when nothing changes, so N nodes make N / 300 status writes a
  second (83/s at 25,000). With a spread as wide as the mean, nodes created
  in one burst post at that rate from their first cycle on, not in lockstep.
- Without Leases, KWOK v0.7.0 picks its heartbeat Stage meant for nodes
  with Leases (a status post every 600 s to 610 s), so every node went
  NotReady when the controller manager's grace (then 180 s) ran out, at any
  node count.
- A node annotated `kwok.x-k8s.io/status=custom` keeps the status a test
  writes: a Stage of its own matches it and so replaces the node's pending
  heartbeat. Removing the annotation makes it Ready again.
- KWOK can run as several controllers (`up(kwok_shards=K)`), each managing
  the nodes of some of the buckets in their `gpucluster.dev/kwok-shard`
  label (bucket b: controller b mod K; nodes without the label: the first).
  One KWOK takes every node event through one goroutine before its stage
  workers, and at 25,000 nodes on 2 shared cores that intake fell behind the
  node creates and status posts (nodes Ready minutes after their create,
  watches closed as unresponsive): K controllers each see a K-th of the node
  events, filtered by the API server. Every controller still watches every
  bound pod (it keeps those on its own nodes).

Standard library only (and `gpucluster.names`), so `hack/cluster.sh` works
before any virtualenv.
The binaries come from `hack/build-binaries.sh` (built once, then cached).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpucluster import names

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-binaries.sh"
DEFAULT_STATE_DIR = REPO_ROOT / ".local-cluster"
READY_TIMEOUT_S = 60.0
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CLUSTER_IP = "10.96.0.1"
# The `kubernetes` Service's endpoint. The API server listens on 127.0.0.1
# only, and an endpoint may not be a loopback address (with 127.0.0.1 the
# Service had none). A real node (realnode.py) answers on this address inside
# its own network namespace and relays to 127.0.0.1, so its pods reach the API
# server through 10.96.0.1 as pods anywhere do.
API_ADVERTISE_ADDRESS = "10.90.0.1"
KWOK_CONFIG = REPO_ROOT / "hack" / "kwok.yaml"
KWOK = "kwok"
NODE_MONITOR_GRACE_PERIOD_S = 900
NODE_MONITOR_PERIOD_S = 5


class ClusterError(RuntimeError):
    """A component failed to start; the message carries the tail of its log."""


@dataclass
class ClusterState:
    state_dir: str
    bin_dir: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    # Flags appended to a component's command line, by component name (a
    # benchmark's KWOK stages, a scheduler's client QPS).
    extra_args: dict[str, list[str]] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> str:
        return str(Path(self.state_dir) / "admin.kubeconfig")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def audit_log(self) -> str:
        return str(Path(self.state_dir) / "logs" / "audit.log")

    def save(self) -> None:
        (Path(self.state_dir) / "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        path = state_dir / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def bin_dir() -> Path:
    """Builds the binaries if the cache lacks them, and returns their folder."""
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    out = subprocess.run(
        ["bash", "-c", f"source {REPO_ROOT / 'hack' / 'lib.sh'} && echo $BIN_DIR"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_CLIENT_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\n")


def _issue(pki: Path, name: str, subject: str, extensions: str) -> None:
    ext = pki / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", *_EC_KEY, "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"),
             "-subj", subject)
    _openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
             "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "3650",
             "-out", str(pki / f"{name}.crt"), "-extfile", str(ext))


def _make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate, one client certificate per
    identity, and the service-account signing key pair. Made once per state
    folder and reused by later `up`s."""
    if (pki / "done").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *_EC_KEY, "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
             "-days", "3650", "-subj", "/CN=gpucluster-local-ca")
    _issue(pki, "apiserver", "/CN=kube-apiserver",
           "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
           "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,"
           f"DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:{SERVICE_CLUSTER_IP}\n")
    _issue(pki, "admin", "/O=system:masters/CN=gpucluster-admin", _CLIENT_EXT)
    _issue(pki, "controller-manager", "/CN=system:kube-controller-manager", _CLIENT_EXT)
    _issue(pki, "scheduler", "/CN=system:kube-scheduler", _CLIENT_EXT)
    # KWOK plays every kubelet and patches node and pod status cluster-wide.
    _issue(pki, "kwok", "/O=system:masters/CN=kwok-controller", _CLIENT_EXT)
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    (pki / "done").write_text("")


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gpucluster-local", "cluster": {
            "server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(pki / f"{user}.crt"),
            "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "gpucluster-local", "context": {
            "cluster": "gpucluster-local", "user": user}}],
        "current-context": "gpucluster-local",
    }, indent=2))


def admin_kubeconfig_as(state: ClusterState, user: str) -> str:
    """A kubeconfig for a cluster admin of its own name (`user`), so the
    audit log tells its requests from everyone else's: two operator
    replicas, say. Its certificate is made once per state folder."""
    pki = Path(state.state_dir) / "pki"
    if not (pki / f"{user}.crt").exists():
        _issue(pki, user, f"/O=system:masters/CN={user}", _CLIENT_EXT)
    path = Path(state.state_dir) / f"{user}.kubeconfig"
    _write_kubeconfig(path, state.server, pki, user)
    return str(path)


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int, binary: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return cmdline == binary


# Processes started by this `up`: their liveness is asked of the Popen
# object, since /proc/<pid>/cmdline can still read the parent's just after exec.
_children: dict[str, subprocess.Popen[bytes]] = {}


def _start(state: ClusterState, name: str, args: list[str], args_of: str = "") -> None:
    """Starts `args` as component `name`, with the extra flags of component
    `args_of` (default: `name`)."""
    binary = str(Path(state.bin_dir) / args[0])
    log_path = str(Path(state.state_dir) / "logs" / f"{name}.log")
    with open(log_path, "ab") as log:
        # A session of its own: the cluster outlives the `up` command and is
        # stopped only by `down`, by pid.
        proc = subprocess.Popen([binary, *args[1:], *state.extra_args.get(args_of or name, [])], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _children[name] = proc
    state.pids[name] = proc.pid
    state.logs[name] = log_path
    state.save()


def _wait_until(state: ClusterState, name: str, check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if _children[name].poll() is not None:
            raise ClusterError(f"{name} exited before {what}; last lines of "
                               f"{state.logs[name]}:\n{_tail(state.logs[name])}")
        if check():
            return
        time.sleep(0.2)
    raise ClusterError(f"{name} not {what} after {READY_TIMEOUT_S:.0f} s; last lines of "
                       f"{state.logs[name]}:\n{_tail(state.logs[name])}")


def _https_ok(state: ClusterState, url: str) -> bool:
    pki = Path(state.state_dir) / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _local_https_ok(port: int, path: str) -> bool:
    """Health of kube-controller-manager and kube-scheduler, whose serving
    certificates are self-signed: only liveness is asked of them here."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx,
                                    timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


_BINARIES = {
    "etcd": "etcd",
    "kube-apiserver": "kube-apiserver",
    "kube-controller-manager": "kube-controller-manager",
    "kube-scheduler": "kube-scheduler",
    "kwok": "kwok",
}


def binary_of(component: str) -> str:
    """The binary a component runs: KWOK's shards are `kwok-1`, `kwok-2`, ..."""
    return KWOK if component.startswith(f"{KWOK}-") else _BINARIES[component]


def kwok_components(shards: int) -> list[str]:
    """The component names of `shards` KWOK controllers."""
    return [KWOK, *(f"{KWOK}-{i}" for i in range(1, shards))]


def kwok_shard_selectors(shards: int) -> list[str]:
    """The node label selector of each of `shards` KWOK controllers: bucket
    b goes to controller b mod `shards`, and the first also takes nodes with
    no bucket (made by hand, by a test, by Karpenter)."""
    if not 1 <= shards <= names.KWOK_SHARD_BUCKETS:
        raise ValueError(f"kwok_shards must be from 1 to {names.KWOK_SHARD_BUCKETS}, not {shards}")
    if shards == 1:
        return [""]
    buckets = [[str(b) for b in range(names.KWOK_SHARD_BUCKETS) if b % shards == i] for i in range(shards)]
    others = ",".join(b for shard in buckets[1:] for b in shard)
    return [f"{names.LABEL_KWOK_SHARD} notin ({others})",
            *(f"{names.LABEL_KWOK_SHARD} in ({','.join(shard)})" for shard in buckets[1:])]


def status(state_dir: Path = DEFAULT_STATE_DIR) -> ClusterState | None:
    """The running cluster of this state folder, or None when none runs."""
    state = ClusterState.load(state_dir)
    if state is None or not state.pids:
        return None
    running = [n for n, pid in state.pids.items()
               if _alive(pid, str(Path(state.bin_dir) / binary_of(n)))]
    return state if running else None


def up(state_dir: Path = DEFAULT_STATE_DIR, extra_args: dict[str, list[str]] | None = None,
       kwok_shards: int = 1) -> ClusterState:
    """Starts the control plane and KWOK (as `kwok_shards` controllers), and
    returns once the API server is ready, the controllers and scheduler are
    healthy, and the `default` service account exists (pods can be created).
    `extra_args` adds flags to a component, by name (`{"kwok": ["--config=
    stages.yaml"]}`; KWOK's go to every shard)."""
    selectors = kwok_shard_selectors(kwok_shards)
    if status(state_dir) is not None:
        raise ClusterError(f"a cluster of {state_dir} is already up; "
                           f"`hack/cluster.sh down` first, or use KUBECONFIG={state_dir}/admin.kubeconfig")
    started = time.monotonic()
    binaries = bin_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("etcd-data", "logs", "cert-dir"):
        shutil.rmtree(state_dir / stale, ignore_errors=True)
    (state_dir / "logs").mkdir()
    pki = state_dir / "pki"
    _make_pki(pki)
    state = ClusterState(state_dir=str(state_dir), bin_dir=str(binaries), extra_args=extra_args or {})
    state.ports = {name: _free_port() for name in
                   ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler",
                    *kwok_components(kwok_shards))}
    state.save()
    for user in ("admin", "controller-manager", "scheduler", "kwok"):
        _write_kubeconfig(state_dir / f"{user}.kubeconfig", state.server, pki, user)
    try:
        _start_all(state, pki, selectors)
    except BaseException:
        down(state_dir)
        raise
    print(f"cluster up in {time.monotonic() - started:.1f} s: {state.server}", file=sys.stderr)
    return state


# Who changed what, and when: every write but the control plane's own and
# KWOK's (thousands of simulated kubelets' heartbeats), at metadata level.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "users": ["kwok-controller", "system:kube-controller-manager",
                                    "system:kube-scheduler", "system:apiserver"]},
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "None", "verbs": ["get", "list", "watch"]},
        {"level": "Metadata"},
    ],
}


def _start_all(state: ClusterState, pki: Path, kwok_selectors: list[str]) -> None:
    sd = Path(state.state_dir)
    p = state.ports
    (sd / "audit-policy.json").write_text(json.dumps(AUDIT_POLICY, indent=2))
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
    _start(state, "etcd", [
        "etcd", "--name=local", f"--data-dir={sd / 'etcd-data'}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=local={peer_url}", "--quota-backend-bytes=8589934592",
        # A throwaway test store: durability across power loss buys nothing here.
        "--unsafe-no-fsync", "--log-level=warn",
    ])
    _wait_until(state, "etcd", lambda: _http_ok(f"{etcd_url}/health"), "healthy")

    _start(state, "kube-apiserver", [
        "kube-apiserver", f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", f"--advertise-address={API_ADVERTISE_ADDRESS}",
        # Logs, exec and port-forward of a real node's pods: the API server
        # dials the kubelet at its InternalIP as the cluster's admin.
        f"--kubelet-client-certificate={pki / 'admin.crt'}", f"--kubelet-client-key={pki / 'admin.key'}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        f"--secure-port={p['apiserver']}", f"--cert-dir={sd / 'cert-dir'}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC", "--allow-privileged=true",
        # Room for the provisioning benchmark's thousands of concurrent writes.
        "--max-requests-inflight=2000", "--max-mutating-requests-inflight=1000",
        f"--audit-policy-file={sd / 'audit-policy.json'}", f"--audit-log-path={state.audit_log}",
        "--audit-log-format=json", "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
        "--profiling=false", "--v=1",
    ])
    _wait_until(state, "kube-apiserver",
                lambda: _https_ok(state, f"{state.server}/readyz"), "ready")

    _start(state, "kube-controller-manager", [
        "kube-controller-manager", f"--kubeconfig={sd / 'controller-manager.kubeconfig'}",
        f"--authentication-kubeconfig={sd / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={sd / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1", f"--secure-port={p['controller-manager']}",
        f"--cert-dir={sd / 'cert-dir'}", "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        "--kube-api-qps=200", "--kube-api-burst=400",
        f"--node-monitor-grace-period={NODE_MONITOR_GRACE_PERIOD_S}s",
        # Not the 1-minute default for a new node's first status: at 25,000
        # nodes KWOK's first post lagged the create by more, and the node
        # controller marked fresh nodes Unknown and tainted them unreachable.
        f"--node-startup-grace-period={NODE_MONITOR_GRACE_PERIOD_S}s",
        f"--node-monitor-period={NODE_MONITOR_PERIOD_S}s", "--v=1",
    ])
    _start(state, "kube-scheduler", [
        "kube-scheduler", f"--kubeconfig={sd / 'scheduler.kubeconfig'}",
        f"--authentication-kubeconfig={sd / 'scheduler.kubeconfig'}",
        f"--authorization-kubeconfig={sd / 'scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1", f"--secure-port={p['scheduler']}",
        "--leader-elect=false", "--v=1",
    ])
    kwoks = kwok_components(len(kwok_selectors))
    for kwok, selector in zip(kwoks, kwok_selectors, strict=True):
        _start(state, kwok, [
            KWOK, f"--kubeconfig={sd / 'kwok.kubeconfig'}", f"--config={KWOK_CONFIG}",
            f"--server-address=127.0.0.1:{p[kwok]}",
            *([f"--manage-nodes-with-label-selector={selector}"] if selector else []),
        ], args_of=KWOK)
    _wait_until(state, "kube-controller-manager",
                lambda: _local_https_ok(p["controller-manager"], "/healthz"), "healthy")
    _wait_until(state, "kube-scheduler",
                lambda: _local_https_ok(p["scheduler"], "/healthz"), "healthy")
    for kwok in kwoks:
        healthz = f"http://127.0.0.1:{p[kwok]}/healthz"
        _wait_until(state, kwok, lambda: _http_ok(healthz), "healthy")  # noqa: B023 (called at once)
    _wait_until(state, "kube-controller-manager",
                lambda: _https_ok(state, f"{state.server}/api/v1/namespaces/default/serviceaccounts/default"),
                "creating the default service account")


def interrupt_on_sigterm() -> None:
    """Makes SIGTERM raise KeyboardInterrupt, as Ctrl-C does. A benchmark or a
    test session stopped with `kill` (or by a CI timeout) then unwinds through
    its `finally` blocks and fixtures and stops the control plane it started;
    Python's default for SIGTERM is to die at once and leave it running."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, interrupt)


def stop_process(pid: int, binary: str) -> bool:
    """Stops the process `pid` if it still runs `binary`: SIGTERM, then
    SIGKILL after 10 s. Returns whether it was running."""
    if not _alive(pid, binary):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid, binary) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid, binary):
        os.kill(pid, signal.SIGKILL)
    return True


def down(state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Stops every process this state folder started, by pid: SIGTERM, then
    SIGKILL after 10 s. Returns the names of those it stopped."""
    state = ClusterState.load(state_dir)
    if state is None:
        return []
    # Reverse start order: clients first, etcd last.
    stopped = [name for name in reversed(list(state.pids))
               if stop_process(state.pids[name], str(Path(state.bin_dir) / binary_of(name)))]
    state.pids = {}
    state.save()
    return stopped


def kwok_shard_count(text: str) -> int:
    """argparse's type for a `--kwok-shards` option."""
    shards = int(text) if text.isdigit() else 0
    if not 1 <= shards <= names.KWOK_SHARD_BUCKETS:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {names.KWOK_SHARD_BUCKETS}, not {text!r}")
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpucluster dev-cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status", "env", "build"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where certificates, kubeconfigs, logs and pids live (default: %(default)s)")
    parser.add_argument("--real-nodes", type=int, default=0, metavar="N",
                        help="up: also start N real nodes (containerd, a kubelet and kube-proxy each, "
                             "CoreDNS; see gpucluster.realnode)")
    parser.add_argument("--real-node", action="store_const", const=1, dest="real_nodes",
                        help="up: one real node (--real-nodes 1)")
    parser.add_argument("--kwok-shards", type=kwok_shard_count, default=1, metavar="K",
                        help=f"up: run KWOK as K controllers, each managing a K-th of the nodes by their "
                             f"{names.LABEL_KWOK_SHARD} label (1 to {names.KWOK_SHARD_BUCKETS}; default 1). "
                             f"For tens of thousands of nodes: one KWOK's node intake is one goroutine")
    args = parser.parse_args(argv)
    from gpucluster import realnode
    state_dir: Path = args.state_dir.resolve()
    # An `up` stopped half-way stops what it had started.
    interrupt_on_sigterm()
    try:
        if args.action == "build":
            print(bin_dir())
        elif args.action == "up":
            state = up(state_dir, kwok_shards=args.kwok_shards)
            if args.real_nodes:
                realnode.start(state, args.real_nodes)
            print(f"export KUBECONFIG={state.kubeconfig}")
            print(f"# logs: {Path(state.state_dir) / 'logs'}", file=sys.stderr)
        elif args.action == "down":
            stopped = realnode.stop(state_dir) + down(state_dir)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
        elif args.action == "status":
            running = status(state_dir)
            if running is None:
                print("down", file=sys.stderr)
                return 1
            print(json.dumps({"server": running.server, "kubeconfig": running.kubeconfig,
                              "pids": running.pids, "logs": running.logs}, indent=2))
        elif args.action == "env":
            running = status(state_dir)
            if running is None:
                print("no cluster is up; run `hack/cluster.sh up`", file=sys.stderr)
                return 1
            print(f"export KUBECONFIG={running.kubeconfig}")
            print(f"export PATH={running.bin_dir}:$PATH")
    except (ClusterError, realnode.NodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
