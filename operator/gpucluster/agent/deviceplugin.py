"""The fake GPU device plugin: offers a node's (fake) GPUs to the kubelet as
nvidia.com/gpu over the kubelet device-plugin API v1beta1, for clusters
without GPUs (kind).

It serves the DevicePlugin service on a unix socket in the kubelet's
device-plugin directory, registers it with the kubelet's Registration
service (kubelet.sock in the same directory), and streams every GPU as
Healthy or Unhealthy by the health verdict. When the kubelet restarts it
wipes the directory and creates kubelet.sock anew; the plugin notices,
serves its socket again and registers again. The devices it offers and
the allocations it prefers are decided in devices.py.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from gpucluster.agent._proto import api_pb2, api_pb2_grpc
from gpucluster.agent.backend import GpuBackend
from gpucluster.agent.devices import (
    API_VERSION,
    DEFAULT_ENDPOINT,
    DEFAULT_PLUGIN_DIR,
    KUBELET_SOCKET,
    PluginDevice,
    plugin_devices,
    preferred_allocation,
)
from gpucluster.names import GPU_RESOURCE
from gpucluster.planning.health import HealthPolicy, node_verdict

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
# The env NVIDIA's device plugin gives a container (its default envvar
# strategy): the UUIDs of its GPUs, which the NVIDIA container runtime mounts.
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"


class DevicePluginService(api_pb2_grpc.DevicePluginServicer):
    """The DevicePlugin gRPC service over the current device list."""

    def __init__(self, devices: Sequence[PluginDevice] = ()) -> None:
        self._devices = tuple(devices)
        self._changed = threading.Condition()
        self._closed = False

    def update(self, devices: Sequence[PluginDevice]) -> None:
        """New device list; open ListAndWatch streams send it if it differs."""
        devices = tuple(devices)
        with self._changed:
            if devices != self._devices:
                self._devices = devices
                self._changed.notify_all()

    def close(self) -> None:
        """End the open ListAndWatch streams."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return plugin_options()

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        # Wake the wait below when the kubelet hangs up, not only on updates.
        context.add_callback(self._wake)
        sent: tuple[PluginDevice, ...] | None = None
        while True:
            with self._changed:
                self._changed.wait_for(functools.partial(self._stream_due, context, sent))
                if self._closed or not context.is_active():
                    return
                sent = self._devices
            yield api_pb2.ListAndWatchResponse(devices=[_device_message(d) for d in sent])

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        devices = {device.id: device for device in self._devices}
        return api_pb2.PreferredAllocationResponse(container_responses=[
            api_pb2.ContainerPreferredAllocationResponse(deviceIDs=preferred_allocation(
                devices, list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                req.allocation_size,
            ))
            for req in request.container_requests
        ])

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        known = {device.id for device in self._devices}
        responses = []
        for req in request.container_requests:
            unknown = [device for device in req.devices_ids if device not in known]
            if unknown:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unknown devices {', '.join(unknown)}")
            responses.append(api_pb2.ContainerAllocateResponse(
                envs={VISIBLE_DEVICES_ENV: ",".join(req.devices_ids)}
            ))
        return api_pb2.AllocateResponse(container_responses=responses)

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()

    def _stream_due(
        self, context: grpc.ServicerContext, sent: tuple[PluginDevice, ...] | None
    ) -> bool:
        """Whether a ListAndWatch stream has to send, or to end."""
        return self._closed or not context.is_active() or self._devices != sent

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


def plugin_options() -> api_pb2.DevicePluginOptions:
    return api_pb2.DevicePluginOptions(pre_start_required=False,
                                       get_preferred_allocation_available=True)


def _device_message(device: PluginDevice) -> api_pb2.Device:
    return api_pb2.Device(
        ID=device.id,
        health=HEALTHY if device.healthy else UNHEALTHY,
        topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=device.numa_node)]),
    )


def _socket_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_ctime_ns


class DevicePluginServer:
    """Serves the plugin, keeps it registered, and streams health changes.

    `run` loops until stopped: each `interval` it reads the backend, judges
    the GPUs and updates the device list, and checks that kubelet.sock is
    the one it registered with and that its own socket is still there.
    """

    def __init__(
        self,
        backend: GpuBackend,
        *,
        plugin_dir: str = DEFAULT_PLUGIN_DIR,
        endpoint: str = DEFAULT_ENDPOINT,
        resource_name: str = GPU_RESOURCE,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.time,
        before_tick: Callable[[], None] | None = None,
    ) -> None:
        """`before_tick` runs at the start of every round (the CLI reads the
        node's fault-injection annotation there)."""
        self._backend = backend
        self._dir = Path(plugin_dir)
        self._endpoint = endpoint
        self._resource_name = resource_name
        self._policy = policy or HealthPolicy()
        self._clock = clock
        self._before_tick = before_tick
        self._known_uuids: dict[int, str] = {}
        self.service = DevicePluginService(self._devices_now())
        self._server: grpc.Server | None = None
        self._registered_with: tuple[int, int] | None = None
        self.registrations = 0

    @property
    def socket_path(self) -> Path:
        return self._dir / self._endpoint

    @property
    def kubelet_socket(self) -> Path:
        return self._dir / KUBELET_SOCKET

    def run(self, stop: threading.Event, interval: float) -> None:
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:
                    log.exception("device plugin round failed")
                stop.wait(interval)
        finally:
            self.shutdown()

    def tick(self) -> None:
        if self._before_tick is not None:
            self._before_tick()
        self.service.update(self._devices_now())
        self._keep_registered()

    def shutdown(self) -> None:
        self.service.close()
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def _devices_now(self) -> tuple[PluginDevice, ...]:
        readings = self._backend.read()
        self._known_uuids.update({reading.index: reading.uuid for reading in readings})
        verdict = node_verdict(readings, expected_gpus=self._backend.expected_gpus,
                               now=self._clock(), policy=self._policy,
                               known_uuids=self._known_uuids)
        return plugin_devices(verdict)

    def _keep_registered(self) -> None:
        kubelet = _socket_identity(self.kubelet_socket)
        if kubelet is None:
            return  # no kubelet yet: register when it comes
        if kubelet == self._registered_with and self.socket_path.exists():
            return
        # A new kubelet (or one that wiped our socket): serve afresh, register.
        self._serve()
        self._register()
        self._registered_with = kubelet

    def _serve(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
        self.socket_path.unlink(missing_ok=True)
        # One thread per open ListAndWatch stream (the kubelet keeps one) plus
        # the unary calls.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        # The generated gRPC module carries no type annotations.
        api_pb2_grpc.add_DevicePluginServicer_to_server(  # type: ignore[no-untyped-call]
            self.service, server
        )
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server

    def _register(self) -> None:
        with grpc.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            api_pb2_grpc.RegistrationStub(channel).Register(  # type: ignore[no-untyped-call]
                api_pb2.RegisterRequest(
                    version=API_VERSION,
                    endpoint=self._endpoint,
                    resource_name=self._resource_name,
                    options=plugin_options(),
                ),
                timeout=10,
            )
        self.registrations += 1
        log.info("registered %s at %s with the kubelet", self._resource_name,
                 self.socket_path)
