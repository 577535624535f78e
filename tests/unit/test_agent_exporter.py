"""/metrics: dcgm-exporter's names and labels from a custom collector."""

from __future__ import annotations

import urllib.request

from gpucluster.agent.exporter import (
    GPU_HEALTHY,
    LABELS,
    DcgmCollector,
    NodeGpus,
    serve_metrics,
)
from gpucluster.agent.fake import FakeGpuSet
from gpucluster.agent.gpu_profile import H100_80GB_HBM3, H200_141GB, load_profile
from gpucluster.agent.injection import parse_injections
from gpucluster.planning.health import node_verdict
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

NOW = 1_800_000_000.0


def node(name: str, profile: str = H100_80GB_HBM3, faults: str = "") -> NodeGpus:
    gpus = FakeGpuSet(load_profile(profile), name, clock=lambda: NOW)
    gpus.apply(parse_injections(faults))
    readings = gpus.read()
    verdict = node_verdict(readings, expected_gpus=8, now=NOW, known_uuids=gpus.uuids)
    return NodeGpus(name, readings, verdict)


def scrape(*nodes: NodeGpus) -> dict[str, list]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DcgmCollector(lambda: nodes))
    text = generate_latest(registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_dcgm_names_labels_and_values() -> None:
    families = scrape(node("node-a"))
    for name in ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED",
                 "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_SM_CLOCK",
                 "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_XID_ERRORS",
                 "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE",
                 "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", GPU_HEALTHY):
        assert len(families[name]) == 8, name
    temp = families["DCGM_FI_DEV_GPU_TEMP"][3]
    assert set(temp.labels) == set(LABELS)
    assert temp.labels["gpu"] == "3"
    assert temp.labels["device"] == "nvidia3"
    assert temp.labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert temp.labels["Hostname"] == "node-a"
    assert temp.labels["UUID"].startswith("GPU-")
    assert temp.value == 39
    power = families["DCGM_FI_DEV_POWER_USAGE"][0]
    assert power.value == 92.593
    assert {s.value for s in families[GPU_HEALTHY]} == {1.0}


def test_counter_like_fields_keep_their_bare_dcgm_names() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DcgmCollector(lambda: [node("node-a")]))
    text = generate_latest(registry).decode()
    assert "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{" in text
    assert "_total{" not in text.replace("_VOL_TOTAL{", "").replace("_AGG_TOTAL{", "")


def test_faults_show_in_the_metrics() -> None:
    families = scrape(node("node-a", faults="gpu=2,xid=79;gpu=5,fault=gone;gpu=6,fault=dbe"))
    xid = {s.labels["gpu"]: s.value for s in families["DCGM_FI_DEV_XID_ERRORS"]}
    assert xid["2"] == 79 and xid["6"] == 48 and xid["0"] == 0
    assert "5" not in xid  # the driver no longer lists it: no telemetry
    # A lost GPU reports its XID but no temperature.
    assert "2" not in {s.labels["gpu"] for s in families["DCGM_FI_DEV_GPU_TEMP"]}
    healthy = {s.labels["gpu"]: s for s in families[GPU_HEALTHY]}
    assert {g: s.value for g, s in healthy.items() if s.value == 0} == {"2": 0, "5": 0, "6": 0}
    assert healthy["5"].labels["UUID"].startswith("GPU-")  # remembered UUID of a gone GPU
    dbe = {s.labels["gpu"]: s.value for s in families["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"]}
    assert dbe["6"] == 1


def test_one_collector_exports_many_nodes() -> None:
    families = scrape(*(node(f"node-{n}", H200_141GB) for n in range(20)))
    temps = families["DCGM_FI_DEV_GPU_TEMP"]
    assert len(temps) == 160
    assert len({(s.labels["Hostname"], s.labels["gpu"]) for s in temps}) == 160
    assert {s.labels["modelName"] for s in temps} == {"NVIDIA H200"}


def test_serves_metrics_over_http() -> None:
    server = serve_metrics(DcgmCollector(lambda: [node("node-a")]), port=0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        server.stop()
    assert "DCGM_FI_DEV_FB_FREE{" in body and 'Hostname="node-a"' in body
    assert "python_gc" not in body  # its own registry: only the GPUs
