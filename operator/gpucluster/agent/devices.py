"""What the fake device plugin offers the kubelet: one device per GPU, named
by its UUID, with its health and NUMA node, and which devices to prefer for
an allocation. Plain data; deviceplugin.py speaks the gRPC side. Also the
kubelet's device-plugin directory layout, so `gpucluster device-plugin
--help` needs no gRPC.

Topology: an HGX board hangs four GPUs off each of its two CPU sockets, so
GPU i sits on NUMA node i // (count / 2), and allocations that stay on one
NUMA node, then on contiguous indices, are preferred. (On HGX every GPU pair
is NVLink-connected through NVSwitch, so locality to the CPU and its PCIe
switches is what sets one set of GPUs apart from another.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpucluster.planning.health import NodeVerdict

API_VERSION = "v1beta1"
DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_ENDPOINT = "gpucluster-gpu.sock"
# Beyond this many candidate sets, prefer greedily instead of trying them all.
_MAX_CANDIDATE_SETS = 50_000


@dataclass(frozen=True)
class PluginDevice:
    id: str  # the GPU UUID
    index: int
    healthy: bool
    numa_node: int


def numa_node_of(index: int, gpu_count: int) -> int:
    return index // max(1, gpu_count // 2)


def plugin_devices(verdict: NodeVerdict) -> tuple[PluginDevice, ...]:
    """One device per GPU of the verdict; a GPU without a known UUID (gone
    before it was ever seen) cannot be named and is left out."""
    return tuple(
        PluginDevice(gpu.uuid, gpu.index, gpu.healthy, numa_node_of(gpu.index, verdict.total_gpus))
        for gpu in verdict.gpus
        if gpu.uuid
    )


def preferred_allocation(
    devices: Mapping[str, PluginDevice],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """The devices to allocate: all of `must_include`, then the available
    ones that touch the fewest NUMA nodes, then span the fewest indices
    (contiguous), then the lowest indices."""
    chosen = list(dict.fromkeys(must_include))
    if size <= len(chosen):
        return chosen[:size]
    candidates = [device for device in dict.fromkeys(available) if device not in chosen]
    needed = min(size - len(chosen), len(candidates))

    def cost(extra: Sequence[str]) -> tuple[int, int, list[int]]:
        picked = [devices[device] for device in (*chosen, *extra) if device in devices]
        indices = sorted(device.index for device in picked)
        span = indices[-1] - indices[0] if indices else 0
        return len({device.numa_node for device in picked}), span, indices

    if math.comb(len(candidates), needed) > _MAX_CANDIDATE_SETS:
        by_index = sorted(candidates, key=lambda d: devices[d].index if d in devices else 0)
        return chosen + by_index[:needed]
    best = min(itertools.combinations(candidates, needed), key=cost)
    return chosen + list(best)
