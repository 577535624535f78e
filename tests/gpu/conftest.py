"""The GPU tests run on a machine that has its own Python with pynvml,
prometheus-client, grpcio and pytest, and no kubernetes client, Kopf or
pydantic; the package is not installed there. So this folder imports nothing
heavy, and finds the package in the working tree when it is not installed.

Run them there with `python -m pytest tests/gpu --confcutdir=tests/gpu`, so
that no conftest above this folder is loaded either.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("gpucluster") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))
