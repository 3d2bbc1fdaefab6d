"""The Runtime value: device, precision, rank and world size, passed explicitly to whatever needs it.

Nothing here runs at import. `Runtime.detect()` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, through `core/distributed.py`) when present, so the same code runs in one process or
under `torchrun`; the process group is `distributed.process_group`, the model wrappers live in
`core/parallel.py`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from llmctl.core import cpu_bf16
from llmctl.core.distributed import launch_env

Precision = Literal["auto", "fp32", "bf16"]

# Dense bf16 peak FLOP/s for MFU, by device name substring (no sparsity). CPU MFU is not reported.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def _host_available_bytes() -> float:
    """MemAvailable from /proc/meminfo (Linux); physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@contextlib.contextmanager
def _cpu_bf16_autocast() -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_bf16.matmuls():
        yield


@dataclass(frozen=True)
class Runtime:
    """Where and how computation runs."""

    device: torch.device
    precision: Literal["fp32", "bf16"]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def detect(cls, device: str = "auto", precision: Precision = "auto") -> Runtime:
        """Choose the device (cuda > mps > cpu) and precision (bf16 where the hardware does it
        natively: CUDA with bf16 support, or a CPU with AVX512-BF16/AMX; else fp32)."""
        rank, world, local = launch_env()
        if device == "auto":
            if torch.cuda.is_available():
                device = f"cuda:{local}"
            elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                device = "mps"
            else:
                device = "cpu"
        dev = torch.device(device)
        if precision == "auto":
            if dev.type == "cuda":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
            elif dev.type == "cpu":
                precision = "bf16" if cpu_bf16.native_bf16_cpu() else "fp32"
            else:
                precision = "fp32"
        return cls(dev, precision, rank, world, local)

    @property
    def is_main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast context (weights stay fp32), or a no-op in fp32. On a CPU without native
        bf16 the matmuls and attention run through fp32 kernels on bf16-rounded operands
        (`core/cpu_bf16.py`: the same numbers, 7-10x faster there than torch's bf16 kernels)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        if self.device.type != "cpu" or not cpu_bf16.emulate():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return _cpu_bf16_autocast()

    def peak_flops(self) -> float | None:
        """Peak dense bf16 FLOP/s of this accelerator, if known (for MFU); None on CPU."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

    def memory_bytes(self) -> float:
        """Memory this process may plan to use: the GPU's total, or on CPU the host's available
        memory shared by the processes of this node (LOCAL_WORLD_SIZE)."""
        if self.device.type == "cuda":
            return float(torch.cuda.get_device_properties(self.device).total_memory)
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        return _host_available_bytes() / per_node

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        """For manifests and reports."""
        d = {
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.world_size,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d
