"""The crucible: every probe on fresh, identically seeded modules, summarised in one report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from esper.karn.template import SlotShape
from esper.urabrask.probes import (
    HAZARDS,
    DeterminismResult,
    GradientResult,
    LatencyResult,
    MemoryResult,
    NanResult,
    PrecisionResult,
    ProbeResult,
    probe_determinism,
    probe_gradient,
    probe_latency,
    probe_memory,
    probe_nan,
    probe_precision,
)
from esper.urabrask.thresholds import DEFAULT_THRESHOLDS, Thresholds

__all__ = ["DEFAULT_THRESHOLDS", "CrucibleReport", "Thresholds", "run_crucible"]


@dataclass(frozen=True, slots=True)
class CrucibleReport:
    """What the crucible measured for one module design on one slot."""

    slot: str
    """`SlotShape.as_key()`: `v64`, `c16x8x8`."""
    device: str
    seed: int
    nan: NanResult
    gradient: GradientResult
    precision: PrecisionResult
    determinism: DeterminismResult
    memory: MemoryResult
    latency: LatencyResult
    hazards: tuple[str, ...]
    """Hazard names found, most severe first (see `probes.HAZARDS`); empty when the module is clean."""
    probe_seconds: tuple[tuple[str, float], ...]
    """Wall time of each probe, in run order."""
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    """The thresholds the probes judged by."""

    @property
    def clean(self) -> bool:
        return not self.hazards

    @property
    def latency_p50_ms(self) -> float:
        return self.latency.p50_ms

    @property
    def latency_p95_ms(self) -> float:
        return self.latency.p95_ms

    @property
    def param_bytes(self) -> int:
        return self.memory.param_bytes

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def findings(self) -> tuple[str, ...]:
        """`probe: reason` for every flagged probe."""
        return tuple(f"{name}: {result.reason}" for name, result in self._results() if result.flagged)

    @property
    def total_seconds(self) -> float:
        return sum(s for _, s in self.probe_seconds)

    def _results(self) -> tuple[tuple[str, ProbeResult], ...]:
        return (("nan", self.nan), ("gradient", self.gradient), ("precision", self.precision),
                ("determinism", self.determinism), ("memory", self.memory), ("latency", self.latency))


_R = TypeVar("_R", NanResult, GradientResult, PrecisionResult, DeterminismResult, MemoryResult, LatencyResult)


@contextlib.contextmanager
def _private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds torch's global RNGs (modules draw init and noise from them) and restores them afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """Temporarily sets torch's intra-op thread count (process-wide; restored afterwards)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    """A factory whose every module has the same initial weights (each probe gets a fresh twin)."""
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return factory()
    return build


def run_crucible(module_factory: Callable[[], nn.Module], slot: SlotShape, *, seed: int = 0,
                 thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device | str = "cpu",
                 cpu_threads: int | None = 1) -> CrucibleReport:
    """Runs every probe on a fresh module from `module_factory` (same initial weights each time).

    Deterministic for a given seed, apart from latency; torch's global RNG state is left as it was.
    Exceptions from the factory or the module are reported as the `exception` hazard, never raised.
    `cpu_threads` (default 1) is torch's intra-op thread count while probing, restored afterwards: tiny
    probe batches gain nothing from threads, and contended OpenMP barriers are the main source of
    latency noise on a busy CPU. None leaves it alone.
    """
    dev = torch.device(device)
    build = _seeded(module_factory, seed)
    timings: list[tuple[str, float]] = []

    def run(name: str, probe: Callable[..., _R]) -> _R:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + len(timings))
        start = time.perf_counter()
        result = probe(build, slot, generator=generator, thresholds=thresholds, device=dev)
        timings.append((name, time.perf_counter() - start))
        return result

    with _private_rng(seed, dev), _cpu_threads(cpu_threads):
        nan = run("nan", probe_nan)
        grad = run("gradient", probe_gradient)
        prec = run("precision", probe_precision)
        det = run("determinism", probe_determinism)
        mem = run("memory", probe_memory)
        lat = run("latency", probe_latency)
    found = {h for r in (nan, grad, prec, det, mem, lat) for h in r.hazards}
    return CrucibleReport(slot=slot.as_key(), device=str(dev), seed=seed, nan=nan, gradient=grad, precision=prec,
                          determinism=det, memory=mem, latency=lat,
                          hazards=tuple(h for h in HAZARDS if h in found), probe_seconds=tuple(timings),
                          thresholds=thresholds)
