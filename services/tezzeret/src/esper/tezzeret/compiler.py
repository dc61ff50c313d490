"""Compile one blueprint for one slot: build, validate, warm up, pack the artifact.

Plain functions (no IO) so tests call them directly. What an artifact holds is the *initial* weights,
snapshotted right after the build: a warm-up forward may change buffers (running statistics, a
hazard's hidden state), and Kasmina must start every seed from the same weights the digest names.

Warm-up: on CUDA with compile enabled, `torch.compile` and a few timed calls (the compile cost lands
here, never on a training step); on CPU, eager calls (inductor's start-up compile costs far more than
these small modules can save on a CPU). A compiler failure falls back to eager and is recorded, and
the retry ladder goes standard → conservative (eager, fewer warm-up calls) before giving up
(prototype: "standard or conservative compile, with eager fallback").
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from esper.karn.template import BlueprintTemplate, KarnError, SlotShape
from esper.urza.artifact import guard_digest, pack_artifact

__all__ = ["CompileError", "CompileResult", "Mode", "compile_blueprint", "compile_with_retries"]

Mode = Literal["standard", "conservative"]
VALIDATION_BATCH = 4
WARMUP_CALLS: dict[Mode, int] = {"standard": 20, "conservative": 5}


class CompileError(Exception):
    """The blueprint cannot be turned into an artifact for this slot. `reason` is a stable code:
    `bad_parameters`, `slot_mismatch`, `build_failed`, `forward_failed`, `shape_mismatch`, `dtype_mismatch`,
    `warmup_failed`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CompileResult:
    """An artifact and how it was made (timings feed `KernelCatalogUpdate` and Urza's catalogue)."""

    blueprint_id: str
    slot: SlotShape
    params: dict[str, float]
    artifact: bytes
    guard_digest: str
    mode: Mode
    compiled: bool  # torch.compile served the warm-up (CUDA only)
    fallback_reason: str  # why a requested compile fell back to eager; "" when none
    compile_ms: float  # build + validate + compile + warm-up
    prewarm_p50_ms: float
    prewarm_p95_ms: float
    retries: int = 0


def _validate(module: nn.Module, slot: SlotShape, device: torch.device) -> None:
    """Shape and dtype fit: the seed's output replaces/blends with the slot's activations."""
    x = slot.example_input(VALIDATION_BATCH, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            y = module(x)
    except Exception as e:  # may be transient (device OOM): the retry ladder decides
        raise CompileError("forward_failed", f"{type(e).__name__}: {e}") from e
    if not isinstance(y, torch.Tensor):
        raise CompileError("shape_mismatch", f"forward returned {type(y).__name__}, not a tensor")
    if tuple(y.shape) != tuple(x.shape):
        raise CompileError("shape_mismatch", f"output {tuple(y.shape)} for input {tuple(x.shape)}")
    if y.dtype != x.dtype:
        raise CompileError("dtype_mismatch", f"output {y.dtype} for input {x.dtype}")


def _timed_calls(fn: nn.Module, x: torch.Tensor, n: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    out: list[float] = []
    with torch.no_grad():
        for _ in range(n):
            t0 = time.perf_counter()
            fn(x)
            if sync is not None:
                sync()
            out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _p95(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def compile_blueprint(template: BlueprintTemplate, slot: SlotShape, params: Mapping[str, float] | None = None, *,
                      mode: Mode = "standard", device: torch.device | str = "cpu", compile_enabled: bool = False,
                      seed: int = 0) -> CompileResult:
    """Build `template` for `slot` (initial weights from `seed`), validate, warm up, pack."""
    device = torch.device(device)
    t0 = time.perf_counter()
    try:
        resolved = template.resolve_params(params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = template.build(slot, resolved)
    except KarnError as e:
        reason = "slot_mismatch" if "slot" in type(e).__name__.lower() else "bad_parameters"
        raise CompileError(reason, str(e)) from e
    except Exception as e:  # template code is trusted but may still fail for an odd slot
        raise CompileError("build_failed", f"{type(e).__name__}: {e}") from e
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module = module.to(device).eval()
    _validate(module, slot, device)
    runner: nn.Module = module
    compiled, fallback = False, ""
    if mode == "standard" and compile_enabled and device.type == "cuda":
        try:
            runner = torch.compile(module)  # type: ignore[assignment]
            compiled = True
        except Exception as e:  # compiler bug: eager serves, recorded
            fallback = f"compile_error:{type(e).__name__}"
    x = slot.example_input(VALIDATION_BATCH, generator=torch.Generator().manual_seed(1)).to(device)
    try:
        timings = _timed_calls(runner, x, WARMUP_CALLS[mode], device)
    except Exception as e:
        if not compiled:
            raise CompileError("warmup_failed", f"{type(e).__name__}: {e}") from e
        compiled, fallback = False, f"runtime_error:{type(e).__name__}"
        timings = _timed_calls(module, x, WARMUP_CALLS[mode], device)
    compile_ms = (time.perf_counter() - t0) * 1000.0
    steady = timings[1:] or timings  # the first call pays compile / allocator warm-up
    artifact = pack_artifact(template.blueprint_id, slot, resolved, initial)
    return CompileResult(
        blueprint_id=template.blueprint_id, slot=slot, params=resolved, artifact=artifact,
        guard_digest=guard_digest(template.blueprint_id, slot, resolved, str(torch.__version__)), mode=mode,
        compiled=compiled, fallback_reason=fallback, compile_ms=compile_ms,
        prewarm_p50_ms=statistics.median(steady), prewarm_p95_ms=_p95(steady),
    )


def compile_with_retries(template: BlueprintTemplate, slot: SlotShape, params: Mapping[str, float] | None = None,
                         *, device: torch.device | str = "cpu", compile_enabled: bool = False, seed: int = 0,
                         max_attempts: int = 2) -> CompileResult:
    """Standard first, then conservative; errors that no retry can fix (parameters, slot, shapes) are
    raised at once. `result.retries` counts the failed attempts before the one that succeeded."""
    permanent = {"bad_parameters", "slot_mismatch", "shape_mismatch", "dtype_mismatch"}
    last: CompileError | None = None
    for attempt in range(max_attempts):
        mode: Mode = "standard" if attempt == 0 else "conservative"
        try:
            result = compile_blueprint(template, slot, params, mode=mode, device=device,
                                       compile_enabled=compile_enabled, seed=seed)
        except CompileError as e:
            if e.reason in permanent:
                raise
            last = e
            continue
        return dataclasses.replace(result, retries=attempt)
    assert last is not None
    raise last
