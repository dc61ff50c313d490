"""The packet's memory and utilisation figures, where the platform has them (REFERENCE_PROTOTYPE
metrics.md names): `cpu_mem_peak_gb`; on CUDA `gpu_mem_used_gb`, `gpu_mem_free_gb`,
`gpu_util_percent` and `cpu_util_percent`.

Tamiyo's pressure rules read the two utilisations (GPU >= 95 % with <= 0.2 GB free: PAUSE; CPU >= 95 %:
SEED downgraded to OPTIMIZER). `cpu_util_percent` is the whole machine's, as the prototype's psutil
reading was, and is sent only when the model trains on an accelerator: there a saturated CPU starves the
device and growth should wait. On a CPU trainer the training itself is the CPU load, so the figure would
read ~100 % on every step of a healthy run and stop all growth; it is left out there (documented).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import psutil
import torch

from esper.core.logging import get_logger

try:  # Unix only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = ["ResourceSampler", "cpu_util_percent", "gpu_util_percent", "resource_metrics"]

log = get_logger("esper.tolaria.resources")


class ResourceSampler:
    """`resource_metrics` at most once per `interval_s`, the same figures in between: peak RSS and the
    allocator's totals move slowly, and reading them for every packet (getrusage; on CUDA a driver
    call) cost ~2-4 % of a 0.4 ms step (py-spy, width 32). The CPU utilisation is the machine's over
    the interval between two samples (psutil keeps the previous reading)."""

    def __init__(self, device: torch.device, *, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.interval_s = interval_s
        self._clock = clock
        self._at = -math.inf  # the first read always samples
        self._last: dict[str, float] = {}
        self.gpu_util_unavailable = ""  # why `gpu_util_percent` is not sent (logged once), "" when it is
        if device.type != "cpu":
            psutil.cpu_percent(interval=None)  # the first reading is a baseline, not a utilisation

    def read(self) -> dict[str, float]:
        now = self._clock()
        if now - self._at >= self.interval_s:
            self._last, self._at = self._sample(), now
        return self._last

    def _sample(self) -> dict[str, float]:
        out = resource_metrics(self.device)
        if self.device.type == "cpu":
            return out
        out["cpu_util_percent"] = cpu_util_percent()
        if self.device.type == "cuda" and not self.gpu_util_unavailable:
            try:
                out["gpu_util_percent"] = gpu_util_percent(self.device)
            except Exception as e:  # no NVML (driver, library): the figure is unavailable, said once
                self.gpu_util_unavailable = f"{type(e).__name__}: {e}"[:200]
                log.warning("gpu_util_percent not reported: NVML unavailable", error=self.gpu_util_unavailable)
        return out


def resource_metrics(device: torch.device) -> dict[str, float]:
    """Memory where the platform says: process peak RSS (GB) on Unix, allocator figures on CUDA."""
    out: dict[str, float] = {}
    if resource is not None:
        out["cpu_mem_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["gpu_mem_used_gb"] = (total - free) / 1024**3
        out["gpu_mem_free_gb"] = free / 1024**3
    return out


def cpu_util_percent() -> float:
    """The whole machine's CPU utilisation (0-100) since the previous call (psutil; no wait)."""
    return float(psutil.cpu_percent(interval=None))


def gpu_util_percent(device: torch.device) -> float:
    """The device's utilisation over NVML's last sample period (0-100); raises without NVML."""
    return float(torch.cuda.utilization(device))
