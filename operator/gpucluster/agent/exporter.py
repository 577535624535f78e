"""Per-GPU metrics under dcgm-exporter's names and labels, so DCGM dashboards
and alerts work on gpucluster's agent unchanged.

A custom Collector builds the metrics at scrape time from whatever the agent
holds (one node's GPUs, or every fake node of the fleet) instead of global
gauges: one process can export many nodes, and a node that goes away leaves
no stale series behind.

dcgm-exporter writes some fields (ECC totals, remapped rows) as counters under
their bare DCGM names. prometheus_client would append `_total` to a counter's
name, so every field here is a gauge: the names stay exactly DCGM's, and the
volatile counters, which reset with the driver, are honest gauges anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpucluster.planning.health import GpuReading, NodeVerdict

DEFAULT_METRICS_PORT = 9400  # dcgm-exporter's

LABELS = ("gpu", "UUID", "device", "modelName", "Hostname")


@dataclass(frozen=True)
class NodeGpus:
    """What the collector exports for one node."""

    hostname: str
    readings: Sequence[GpuReading]
    verdict: NodeVerdict | None = None


@dataclass(frozen=True)
class _Field:
    name: str
    help: str
    value: Callable[[GpuReading], float | int | bool | None]


# Help texts follow dcgm-exporter's default-counters.csv.
FIELDS = (
    _Field("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda r: r.sm_clock_mhz),
    _Field("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).",
           lambda r: r.mem_clock_mhz),
    _Field("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda r: r.temperature_c),
    _Field("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda r: r.power_usage_w),
    _Field("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda r: r.gpu_util_percent),
    _Field("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).",
           lambda r: r.mem_util_percent),
    _Field("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.",
           lambda r: r.last_xid),
    _Field("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda r: r.fb_free_mib),
    _Field("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda r: r.fb_used_mib),
    _Field("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).",
           lambda r: r.fb_total_mib),
    _Field("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.",
           lambda r: r.ecc_sbe_volatile),
    _Field("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.",
           lambda r: r.ecc_dbe_volatile),
    _Field("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total number of single-bit persistent ECC errors.",
           lambda r: r.ecc_sbe_aggregate),
    _Field("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total number of double-bit persistent ECC errors.",
           lambda r: r.ecc_dbe_aggregate),
    _Field("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
           "Number of remapped rows for uncorrectable errors",
           lambda r: r.remapped_rows_uncorrectable),
    _Field("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
           "Number of remapped rows for correctable errors",
           lambda r: r.remapped_rows_correctable),
    _Field("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed",
           lambda r: r.row_remap_failure if r.reachable else None),
    _Field("DCGM_FI_DEV_ROW_REMAP_PENDING", "Whether remapping of rows is pending a GPU reset",
           lambda r: r.row_remap_pending if r.reachable else None),
)

GPU_HEALTHY = "gpucluster_gpu_healthy"


class DcgmCollector(Collector):
    def __init__(self, nodes: Callable[[], Iterable[NodeGpus]]) -> None:
        self._nodes = nodes

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe up front: registering must not scrape the nodes.
        return ()

    def collect(self) -> Iterable[Metric]:
        families = [GaugeMetricFamily(field.name, field.help, labels=LABELS) for field in FIELDS]
        healthy = GaugeMetricFamily(
            GPU_HEALTHY,
            "1 while the node agent finds no fault on the GPU (see the node's GPUHealthy "
            "condition for the reason), 0 otherwise.",
            labels=LABELS,
        )
        for node in self._nodes():
            by_index = {reading.index: reading for reading in node.readings}
            for reading in node.readings:
                labels = _labels(reading.index, reading, node.hostname)
                for field, family in zip(FIELDS, families, strict=True):
                    value = field.value(reading)
                    if value is not None:
                        family.add_metric(labels, float(value))
            if node.verdict is not None:
                for gpu in node.verdict.gpus:
                    labels = _labels(gpu.index, by_index.get(gpu.index), node.hostname, gpu.uuid)
                    healthy.add_metric(labels, 1.0 if gpu.healthy else 0.0)
        return [*families, healthy]


def _labels(
    index: int, reading: GpuReading | None, hostname: str, uuid: str = ""
) -> list[str]:
    """dcgm-exporter's labels; a GPU without a reading (gone from the driver)
    keeps its index and last known UUID."""
    if reading is None:
        return [str(index), uuid, "", "", hostname]
    minor = reading.index if reading.device_minor is None else reading.device_minor
    return [str(index), reading.uuid, f"nvidia{minor}", reading.name, hostname]


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(collector: Collector, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve /metrics for one collector on its own registry (port 0 picks a free port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread)
