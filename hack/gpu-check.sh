#!/usr/bin/env bash
# On a machine with a real NVIDIA GPU: run tests/gpu and record what the board
# reports (nvidia-smi, and the NVML backend's readings and verdict) under $OUT
# (default .local-cluster/gpu-check). Exits with pytest's status.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.local-cluster/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
python3 -m pytest tests/gpu --confcutdir=tests/gpu -p no:cacheprovider -v -s -rs 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
PYTHONPATH=operator python3 - <<'PY' 2>&1 | tee "$OUT/readings.txt"
import dataclasses
import json
import time

import pynvml

from gpucluster.agent.nvml import NvmlBackend
from gpucluster.planning.health import node_verdict

backend = NvmlBackend()
readings = backend.read()
for reading in readings:
    print(json.dumps(dataclasses.asdict(reading), default=str))
print(node_verdict(readings, expected_gpus=backend.expected_gpus, now=time.time()))
print("driver", pynvml.nvmlSystemGetDriverVersion())
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
for query in ("VbiosVersion", "BoardPartNumber", "PowerManagementDefaultLimit",
              "PowerManagementLimitConstraints", "EccMode", "PersistenceMode", "MigMode",
              "CudaComputeCapability"):
    try:
        print(query, getattr(pynvml, f"nvmlDeviceGet{query}")(handle))
    except pynvml.NVMLError as err:
        print(query, "not given:", err)
backend.close()
PY
exit "$status"
