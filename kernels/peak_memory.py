"""Peak memory of a block of work above what was resident when it began, in MiB.

On CUDA: `torch.cuda.max_memory_allocated` after a reset. On Linux CPUs: the kernel's
high-water mark of resident memory (VmHWM), reset by writing 5 to /proc/self/clear_refs; it
counts every byte the block touches in this process. Where neither works the figure is nan.
"""

from __future__ import annotations

import math

import torch


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.mib`, or `start()` ... `stop()`;
    nan where it cannot be measured."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.method = "cuda max_memory_allocated" if self.device.type == "cuda" else "VmHWM"
        self.mib = math.nan

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        elif _reset_high_water_mark():
            self._base = _status_mib("VmRSS")
        else:
            self.method, self._base = "unavailable", math.nan
        return self

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        elif not math.isnan(self._base):
            self.mib = _status_mib("VmHWM") - self._base
        return self.mib

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
