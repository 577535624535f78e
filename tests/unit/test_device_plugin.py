"""The fake device plugin against the real protocol: the test plays the
kubelet (its Registration service on kubelet.sock, dialing the plugin back)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from gpucluster.agent._proto import api_pb2, api_pb2_grpc
from gpucluster.agent.deviceplugin import DevicePluginServer
from gpucluster.agent.devices import DEFAULT_ENDPOINT, PluginDevice, preferred_allocation
from gpucluster.agent.fake import FakeGpuSet, fake_gpu_uuid
from gpucluster.agent.gpu_profile import H100_80GB_HBM3, load_profile
from gpucluster.agent.injection import FaultKind, Injection

NODE = "kind-worker"
TIMEOUT = 10


def uuid(index: int) -> str:
    return fake_gpu_uuid(NODE, index)


class Kubelet(api_pb2_grpc.RegistrationServicer):
    """The kubelet's side: serves Registration on <dir>/kubelet.sock."""

    def __init__(self, plugin_dir: Path) -> None:
        self.dir = plugin_dir
        self.registrations: queue.Queue[api_pb2.RegisterRequest] = queue.Queue()
        self._server: grpc.Server | None = None

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext):
        self.registrations.put(request)
        return api_pb2.Empty()

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{self.dir / 'kubelet.sock'}")
        self._server.start()

    def stop(self) -> None:
        """As a kubelet going down and coming back does: its socket and every
        plugin socket in the directory are gone."""
        assert self._server is not None
        self._server.stop(grace=None).wait()
        for socket in self.dir.glob("*.sock"):
            socket.unlink()

    def dial(self, endpoint: str) -> api_pb2_grpc.DevicePluginStub:
        channel = grpc.insecure_channel(f"unix://{self.dir / endpoint}")
        return api_pb2_grpc.DevicePluginStub(channel)


@pytest.fixture()
def plugin_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture()
def gpus() -> FakeGpuSet:
    return FakeGpuSet(load_profile(H100_80GB_HBM3), NODE)


@pytest.fixture()
def kubelet(plugin_dir: Path) -> Iterator[Kubelet]:
    kubelet = Kubelet(plugin_dir)
    kubelet.start()
    yield kubelet
    if kubelet._server is not None:
        kubelet._server.stop(grace=None)


@pytest.fixture()
def plugin(gpus: FakeGpuSet, plugin_dir: Path) -> Iterator[DevicePluginServer]:
    server = DevicePluginServer(gpus, plugin_dir=str(plugin_dir))
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop, 0.05), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(timeout=TIMEOUT)
    assert not thread.is_alive()
    assert not server.socket_path.exists()


def health(response: api_pb2.ListAndWatchResponse) -> dict[str, str]:
    return {device.ID: device.health for device in response.devices}


def test_the_kubelet_protocol(kubelet: Kubelet, plugin: DevicePluginServer,
                              gpus: FakeGpuSet) -> None:
    request = kubelet.registrations.get(timeout=TIMEOUT)
    assert request.version == "v1beta1"
    assert request.resource_name == "nvidia.com/gpu"
    assert request.endpoint == DEFAULT_ENDPOINT
    assert request.options.get_preferred_allocation_available
    assert not request.options.pre_start_required

    stub = kubelet.dial(request.endpoint)
    options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT)
    assert options.get_preferred_allocation_available

    stream = stub.ListAndWatch(api_pb2.Empty(), timeout=30)
    first = next(stream)
    assert health(first) == {uuid(i): "Healthy" for i in range(8)}
    assert [d.topology.nodes[0].ID for d in first.devices] == [0, 0, 0, 0, 1, 1, 1, 1]

    gpus.inject(Injection(3, FaultKind.XID, 79))
    second = next(stream)
    assert health(second) == {uuid(i): "Unhealthy" if i == 3 else "Healthy" for i in range(8)}

    gpus.inject(Injection(5, FaultKind.GONE))
    third = next(stream)
    assert health(third)[uuid(5)] == "Unhealthy"  # still listed, by its last UUID
    stream.cancel()

    allocated = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=[uuid(0), uuid(1)]),
        api_pb2.ContainerAllocateRequest(devices_ids=[uuid(7)]),
    ]), timeout=TIMEOUT)
    assert [dict(c.envs) for c in allocated.container_responses] == [
        {"NVIDIA_VISIBLE_DEVICES": f"{uuid(0)},{uuid(1)}"},
        {"NVIDIA_VISIBLE_DEVICES": uuid(7)},
    ]
    with pytest.raises(grpc.RpcError) as refused:
        stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["GPU-not-here"]),
        ]), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    healthy = [uuid(i) for i in (0, 1, 2, 4, 6, 7)]
    preferred = stub.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=healthy, must_include_deviceIDs=[uuid(6)],
                allocation_size=2),
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=healthy, allocation_size=3),
        ]), timeout=TIMEOUT)
    assert [list(c.deviceIDs) for c in preferred.container_responses] == [
        [uuid(6), uuid(7)], [uuid(0), uuid(1), uuid(2)],
    ]

    assert stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=[uuid(0)]),
                                  timeout=TIMEOUT) == api_pb2.PreStartContainerResponse()


def registered(plugin: DevicePluginServer, times: int) -> None:
    """Waits until the plugin has seen `times` Register calls return."""
    deadline = time.monotonic() + TIMEOUT
    while plugin.registrations < times and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plugin.registrations == times


def test_registers_again_when_the_kubelet_restarts(kubelet: Kubelet, plugin: DevicePluginServer,
                                                  gpus: FakeGpuSet, plugin_dir: Path) -> None:
    kubelet.registrations.get(timeout=TIMEOUT)
    # The kubelet holds the request before the plugin's Register call returns;
    # stopping it in between cancels the reply, and the plugin (rightly)
    # registers again, which would count twice here.
    registered(plugin, 1)
    gpus.inject(Injection(2, FaultKind.DOUBLE_BIT_ECC))
    kubelet.stop()
    assert not plugin.socket_path.exists()

    restarted = Kubelet(plugin_dir)
    restarted.start()
    try:
        request = restarted.registrations.get(timeout=TIMEOUT)
        assert request.resource_name == "nvidia.com/gpu"
        assert plugin.socket_path.exists()
        stream = restarted.dial(request.endpoint).ListAndWatch(api_pb2.Empty(), timeout=30)
        assert health(next(stream))[uuid(2)] == "Unhealthy"
        stream.cancel()
        registered(plugin, 2)
    finally:
        restarted.stop()


def test_waits_for_a_kubelet_that_is_not_there_yet(plugin_dir: Path, gpus: FakeGpuSet,
                                                   plugin: DevicePluginServer) -> None:
    kubelet = Kubelet(plugin_dir)
    assert not plugin.socket_path.exists()
    kubelet.start()
    try:
        assert kubelet.registrations.get(timeout=TIMEOUT).version == "v1beta1"
    finally:
        kubelet.stop()


def devices(count: int = 8, unhealthy: tuple[int, ...] = ()) -> dict[str, PluginDevice]:
    return {f"d{i}": PluginDevice(f"d{i}", i, i not in unhealthy, i // (count // 2))
            for i in range(count)}


@pytest.mark.parametrize(("available", "must", "size", "expected"), [
    (range(8), (), 4, {0, 1, 2, 3}),          # one NUMA node, contiguous
    (range(8), (5,), 4, {4, 5, 6, 7}),        # stays with the device it must include
    (range(8), (5,), 2, {4, 5}),              # contiguous with it, the lower side first
    ((0, 2, 4, 5, 6, 7), (), 2, {4, 5}),      # the contiguous pair over a split one
    ((0, 1, 4, 6, 7), (), 3, {4, 6, 7}),      # one NUMA node beats contiguity
    ((0, 1, 4, 6), (), 3, {0, 1, 4}),         # two NUMA nodes needed: smallest span
    (range(8), (1, 6), 2, {1, 6}),            # must-include wins over locality
    (range(8), (), 8, set(range(8))),
])
def test_preferred_allocation(available, must, size, expected) -> None:
    chosen = preferred_allocation(devices(), [f"d{i}" for i in available],
                                  [f"d{i}" for i in must], size)
    assert len(chosen) == size
    assert {int(d[1:]) for d in chosen} == expected
    assert chosen[:len(must)] == [f"d{i}" for i in must]
