"""What the agent and the device plugin need of a GPU backend (nvml.NvmlBackend
on real GPUs, fake.FakeGpuSet elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gpucluster.planning.health import GpuReading


class GpuBackend(Protocol):
    @property
    def expected_gpus(self) -> int:
        """How many GPUs the node has: readings missing below it are GPUs lost."""
        ...

    def read(self) -> Sequence[GpuReading]:
        """The GPUs the driver lists now, by index."""
        ...

    def close(self) -> None:
        """Release what the backend holds (NVML, its event thread)."""
        ...
