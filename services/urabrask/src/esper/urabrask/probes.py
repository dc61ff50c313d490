"""The crucible's probes: each runs a module for real and reports what it measured.

A probe never looks at a module's name, class or catalogue tier; it only measures behaviour. Every
probe takes a module (or a factory of fresh ones), the slot it grafts into and a seeded generator for
its inputs, and returns a frozen result with the measured values, `flagged`, the `hazards` found and a
human-readable `reason`. An exception raised by the module (or its factory) is a finding — hazard
`exception` — never a crash of the crucible. A module that never returns cannot be stopped in-process;
the caller bounds the crucible with a process or thread deadline if it runs untrusted code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esper.karn.template import SlotShape
from esper.urabrask.measure import (
    ModuleSource,
    exception_reason,
    forward,
    materialise,
    param_bytes,
    percentile,
    probe_input,
    reachable_tensor_bytes,
    reference_module,
    relative_l2,
    synchronize,
    timed_call_ms,
)
from esper.urabrask.optrace import trace_forward
from esper.urabrask.thresholds import DEFAULT_THRESHOLDS, Thresholds

HAZARD_NAN = "nan"
HAZARD_GRADIENT_EXPLODE = "gradient_explode"
HAZARD_GRADIENT_VANISH = "gradient_vanish"
HAZARD_PRECISION = "precision"
HAZARD_OSCILLATION = "oscillation"
HAZARD_MEMORY_GROWTH = "memory_growth"
HAZARD_LATENCY = "latency"
HAZARD_EXCEPTION = "exception"
HAZARDS = (HAZARD_EXCEPTION, HAZARD_NAN, HAZARD_GRADIENT_EXPLODE, HAZARD_GRADIENT_VANISH, HAZARD_MEMORY_GROWTH,
           HAZARD_OSCILLATION, HAZARD_PRECISION, HAZARD_LATENCY)
"""Every hazard name a probe can report, most severe first (the order of `CrucibleReport.hazards`)."""

_CPU = torch.device("cpu")


def _hazards(error: str | None, flagged: bool, name: str) -> tuple[str, ...]:
    if error is not None:
        return (HAZARD_EXCEPTION,)
    return (name,) if flagged else ()


@dataclass(frozen=True, slots=True)
class NanResult:
    """Non-finite values seen over `calls` forward+backward passes on unit-normal float32 input."""

    calls: int
    nonfinite_outputs: int
    nonfinite_loss: bool
    nonfinite_grads: bool
    flagged: bool
    reason: str
    error: str | None = None

    @property
    def hazards(self) -> tuple[str, ...]:
        return _hazards(self.error, self.flagged, HAZARD_NAN)


def probe_nan(source: ModuleSource, slot: SlotShape, *, generator: torch.Generator,
              thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device = _CPU) -> NanResult:
    """Train-mode forward, MSE loss to a random target, backward: any NaN/inf in output, loss or a gradient."""
    calls, outputs, loss_bad, grads_bad = 0, 0, False, False
    try:
        module = materialise(source, device).train()
        for _ in range(thresholds.nan_calls):
            x = probe_input(slot, thresholds.batch, generator, device, requires_grad=True)
            target = probe_input(slot, thresholds.batch, generator, device)
            module.zero_grad(set_to_none=True)
            y = forward(module, x)
            outputs += int((~torch.isfinite(y)).sum())
            loss = F.mse_loss(y, target)
            loss_bad |= not bool(torch.isfinite(loss))
            if loss.requires_grad:
                torch.autograd.backward(loss)
            grads = [x.grad, *(p.grad for p in module.parameters())]
            grads_bad |= any(g is not None and not bool(torch.isfinite(g).all()) for g in grads)
            calls += 1
    except Exception as exc:
        return NanResult(calls, outputs, loss_bad, grads_bad, True, exception_reason(exc), exception_reason(exc))
    found = {f"{outputs} non-finite output elements": outputs > 0, "non-finite loss": loss_bad,
             "non-finite gradients": grads_bad}
    flagged = any(found.values())
    reason = "; ".join(k for k, bad in found.items() if bad) if flagged else "all finite"
    reason += f" over {calls} calls"
    return NanResult(calls, outputs, loss_bad, grads_bad, flagged, reason)


@dataclass(frozen=True, slots=True)
class GradientResult:
    """Gradient norms of an MSE loss against the same-run reference layer's, and the ratios judged.

    `recovered_input_ratio` is the input-gradient ratio after `grad_recovery_steps` SGD steps (NaN when
    no recovery was needed or possible): a zero-initialised branch passes no input gradient at first,
    but wakes up after one step, while a saturated stack stays silent.
    """

    input_grad_norm: float
    param_grad_norm: float
    ref_input_grad_norm: float
    ref_param_grad_norm: float
    input_ratio: float
    param_ratio: float
    recovered_input_ratio: float
    explode: bool
    vanish: bool
    flagged: bool
    reason: str
    error: str | None = None

    @property
    def hazards(self) -> tuple[str, ...]:
        if self.error is not None:
            return (HAZARD_EXCEPTION,)
        return (HAZARD_GRADIENT_EXPLODE,) * self.explode + (HAZARD_GRADIENT_VANISH,) * self.vanish


def _grad_norms(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(input-gradient norm, parameter-gradient norm) of `mse(module(x), target)`; NaN/inf pass through."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    loss = F.mse_loss(forward(module, x), target)
    if not loss.requires_grad:
        return 0.0, 0.0
    torch.autograd.backward(loss)
    in_norm = float(torch.linalg.vector_norm(x.grad)) if x.grad is not None else 0.0
    grads = [p.grad.detach().double() for p in module.parameters() if p.grad is not None]
    p_norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))) if grads else 0.0
    return in_norm, p_norm


def _ratio(value: float, reference: float) -> float:
    if not math.isfinite(value):
        return math.inf
    return value / reference if reference > 0.0 else (0.0 if value == 0.0 else math.inf)


def _recover(module: nn.Module, x: torch.Tensor, target: torch.Tensor, th: Thresholds) -> float:
    """Input-gradient norm after a few plain SGD steps on the same batch."""
    params = [p for p in module.parameters() if p.requires_grad]
    for _ in range(th.grad_recovery_steps):
        _grad_norms(module, x, target)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(th.grad_recovery_lr * p.grad)
    return _grad_norms(module, x, target)[0]


def probe_gradient(source: ModuleSource, slot: SlotShape, *, generator: torch.Generator,
                   thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device = _CPU) -> GradientResult:
    """Explode: input- or parameter-gradient ratio to the reference above `grad_explode_ratio`, or
    non-finite. Vanish: input-gradient ratio below `grad_vanish_ratio` and, for a module with trainable
    parameters, still below it after a few SGD steps (a parameter-free module has nothing to recover)."""
    th = thresholds
    try:
        module = materialise(source, device).train()
        x = probe_input(slot, th.batch, generator, device)
        target = probe_input(slot, th.batch, generator, device)
        ref_in, ref_p = _grad_norms(reference_module(slot, generator, device).train(), x, target)
        g_in, g_p = _grad_norms(module, x, target)
    except Exception as exc:
        nan, why = math.nan, exception_reason(exc)
        return GradientResult(nan, nan, nan, nan, nan, nan, nan, False, False, True, why, why)
    in_ratio, p_ratio = _ratio(g_in, ref_in), _ratio(g_p, ref_p)
    explode = not (in_ratio <= th.grad_explode_ratio and p_ratio <= th.grad_explode_ratio)
    recovered, vanish = math.nan, False
    if not explode and in_ratio < th.grad_vanish_ratio:
        trainable = any(p.requires_grad for p in module.parameters())
        try:
            recovered = _ratio(_recover(module, x, target, th), ref_in) if trainable else in_ratio
        except Exception as exc:  # it ran once, then broke under training: still a finding
            why = exception_reason(exc)
            return GradientResult(g_in, g_p, ref_in, ref_p, in_ratio, p_ratio, math.nan, False, False, True, why, why)
        vanish = not recovered >= th.grad_vanish_ratio
    if explode:
        reason = (f"gradient explodes: input ratio {in_ratio:.3g}, parameter ratio {p_ratio:.3g} "
                  f"(limit {th.grad_explode_ratio:.3g})")
    elif vanish:
        reason = (f"gradient vanishes: input ratio {in_ratio:.3g} (after {th.grad_recovery_steps} SGD steps "
                  f"{recovered:.3g}; limit {th.grad_vanish_ratio:.3g})")
    else:
        reason = f"gradient in range: input ratio {in_ratio:.3g}, parameter ratio {p_ratio:.3g}"
    return GradientResult(g_in, g_p, ref_in, ref_p, in_ratio, p_ratio, recovered, explode, vanish,
                          explode or vanish, reason)


@dataclass(frozen=True, slots=True)
class PrecisionResult:
    """Relative L2 error of the float32 output against the same weights run in float64 (eval mode)."""

    relative_error: float
    float64_ok: bool
    flagged: bool
    reason: str
    error: str | None = None

    @property
    def hazards(self) -> tuple[str, ...]:
        return _hazards(self.error, self.flagged, HAZARD_PRECISION)


def probe_precision(source: ModuleSource, slot: SlotShape, *, generator: torch.Generator,
                    thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device = _CPU) -> PrecisionResult:
    """Runs float32, then converts the module itself to float64 (the same weights, exactly) and runs again.

    Converting in place instead of `copy.deepcopy(m).double()` also works for modules that cannot be
    deep-copied (locks, generators). A module that breaks in float64 is a precision finding, not a crash.
    """
    try:
        module = materialise(source, device).eval()
        x = probe_input(slot, thresholds.batch, generator, device)
        with torch.no_grad():
            y32 = forward(module, x)
    except Exception as exc:
        return PrecisionResult(math.nan, False, True, exception_reason(exc), exception_reason(exc))
    try:
        with torch.no_grad():
            y64 = forward(module.double(), x.double())
    except Exception as exc:
        return PrecisionResult(math.inf, False, True, f"float64 forward failed: {exception_reason(exc)}")
    err = relative_l2(y32, y64)
    flagged = not err <= thresholds.precision_rel_error
    verdict = ">" if flagged else "<="
    limit = thresholds.precision_rel_error
    return PrecisionResult(err, True, flagged, f"float32 vs float64 relative error {err:.3g} {verdict} {limit:.3g}")


@dataclass(frozen=True, slots=True)
class DeterminismResult:
    """Largest relative L2 difference between `calls` identical eval-mode calls and the first one."""

    calls: int
    max_relative_diff: float
    flagged: bool
    reason: str
    error: str | None = None

    @property
    def hazards(self) -> tuple[str, ...]:
        return _hazards(self.error, self.flagged, HAZARD_OSCILLATION)


def probe_determinism(source: ModuleSource, slot: SlotShape, *, generator: torch.Generator,
                      thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device = _CPU) -> DeterminismResult:
    """Oscillation: the same input in eval mode must give the same output (catches hidden mutable state,
    fresh noise, races)."""
    th, worst, calls = thresholds, 0.0, 0
    try:
        module = materialise(source, device).eval()
        x = probe_input(slot, th.batch, generator, device)
        with torch.no_grad():
            first = forward(module, x).clone()
            calls = 1
            for _ in range(th.determinism_calls - 1):
                worst = max(worst, relative_l2(forward(module, x), first))
                calls += 1
    except Exception as exc:
        return DeterminismResult(calls, worst, True, exception_reason(exc), exception_reason(exc))
    flagged = not worst <= th.determinism_rel_diff
    verdict = ">" if flagged else "<="
    return DeterminismResult(calls, worst, flagged, f"identical calls differ by {worst:.3g} {verdict} "
                                                    f"{th.determinism_rel_diff:.3g} (relative L2, {calls} calls)")


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """Tensor bytes reachable from the module before any call, after one warm-up call, and after `calls`
    more; `growth_bytes` is the last minus the warm-up (lazily built caches are allowed once)."""

    calls: int
    param_count: int
    param_bytes: int
    bytes_before: int
    bytes_warm: int
    bytes_after: int
    growth_bytes: int
    slack_bytes: int
    walk_truncated: bool
    cuda_growth_bytes: int | None
    flagged: bool
    reason: str
    error: str | None = None

    @property
    def hazards(self) -> tuple[str, ...]:
        return _hazards(self.error, self.flagged, HAZARD_MEMORY_GROWTH)


def probe_memory(source: ModuleSource, slot: SlotShape, *, generator: torch.Generator,
                 thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device = _CPU) -> MemoryResult:
    """Train-mode forwards (graphs dropped each call): flagged when retained tensor bytes grow by more
    than max(`memory_slack_bytes`, `memory_slack_param_fraction` x parameter bytes)."""
    th = thresholds
    count = nbytes = before = warm = 0
    calls = 0
    try:
        module = materialise(source, device).train()
        count, nbytes = sum(p.numel() for p in module.parameters()), param_bytes(module)
        x = probe_input(slot, th.memory_batch, generator, device)
        before, _ = reachable_tensor_bytes(module, th.memory_walk_items)
        forward(module, x)
        warm, _ = reachable_tensor_bytes(module, th.memory_walk_items)
        synchronize(device)
        cuda_warm = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        for _ in range(th.memory_calls):
            forward(module, x)
            calls += 1
        after, truncated = reachable_tensor_bytes(module, th.memory_walk_items)
        synchronize(device)
        cuda_growth = torch.cuda.memory_allocated(device) - cuda_warm if device.type == "cuda" else None
    except Exception as exc:
        why = exception_reason(exc)
        return MemoryResult(calls, count, nbytes, before, warm, warm, 0, 0, False, None, True, why, why)
    slack = max(th.memory_slack_bytes, int(th.memory_slack_param_fraction * nbytes))
    growth = after - warm
    flagged = growth > slack
    reason = (f"retained tensor bytes grew by {growth} over {calls} calls "
              f"({'>' if flagged else '<='} slack {slack})")
    return MemoryResult(calls, count, nbytes, before, warm, after, growth, slack, truncated, cuda_growth,
                        flagged, reason)


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """Forward latency (eval, no_grad) of the module and of the same-run reference layer, in ms.

    `p95_ratio` is the module's p95 over the reference's p50. `live_ms` is the median time of the ops
    the output depends on (op-traced calls), `stall_ms` = p50 - live_ms (never below 0) and
    `stall_share` = stall_ms / p50; `dead_ops` of `ops` traced ops in one call did not reach the output.
    If the op trace fails on a module that runs fine untraced, these are NaN and the timings alone decide.
    """

    samples: int
    p50_ms: float
    p95_ms: float
    ref_p50_ms: float
    ref_p95_ms: float
    p95_ratio: float
    live_ms: float
    stall_ms: float
    stall_share: float
    ops: int
    dead_ops: int
    flagged: bool
    reason: str
    error: str | None = None

    @property
    def hazards(self) -> tuple[str, ...]:
        return _hazards(self.error, self.flagged, HAZARD_LATENCY)


def _latency_round(module: nn.Module, ref: nn.Module, x: torch.Tensor, th: Thresholds,
                   device: torch.device) -> tuple[list[float], list[float]]:
    """(module ms, reference ms) for alternating calls, stopping early past `latency_budget_s`."""
    mine: list[float] = []
    ref_ms: list[float] = []
    start = time.perf_counter()
    for _ in range(th.latency_calls):
        ref_ms.append(timed_call_ms(ref, x, device))
        mine.append(timed_call_ms(module, x, device))
        if len(mine) >= 5 and time.perf_counter() - start > th.latency_budget_s:
            break
    return mine, ref_ms


def _slow(mine: list[float], ref_ms: list[float], th: Thresholds, q: float = 0.95) -> bool:
    """The module's q-quantile is above both the ratio to the reference's p50 and the floor."""
    t = percentile(mine, q)
    return _ratio(t, percentile(ref_ms, 0.5)) > th.latency_p95_ratio and t > th.latency_floor_ms


def probe_latency(source: ModuleSource, slot: SlotShape, *, generator: torch.Generator,
                  thresholds: Thresholds = DEFAULT_THRESHOLDS, device: torch.device = _CPU) -> LatencyResult:
    """Flagged when p95 exceeds `latency_p95_ratio` x the reference's p50 *and* `latency_floor_ms`, *and*
    at least `latency_stall_share` of the median call is stall (see `optrace`).

    The reference's median is its cost; its own tail is mostly machine noise, so it is no baseline.
    Module and reference calls alternate, so sustained machine load slows both. A round that looks slow
    only in its tail is sampled once more and the calmer round is kept: a module that is slow on every
    call (a busy loop, a lock wait) is slow twice, a one-off scheduler stall is not. Each round stops early once
    `latency_budget_s` has passed (keeping at least 5 samples).
    """
    th = thresholds
    rounds: list[tuple[list[float], list[float]]] = []
    try:
        module = materialise(source, device).eval()
        ref = reference_module(slot, generator, device).eval()
        x = probe_input(slot, th.batch, generator, device)
        with torch.no_grad():
            for _ in range(th.latency_warmup_calls):
                forward(module, x)
                ref(x)
            synchronize(device)
            rounds.append(_latency_round(module, ref, x, th, device))
            if _slow(*rounds[0], th) and not _slow(*rounds[0], th, q=0.5):  # slow tail only: a stall?
                rounds.append(_latency_round(module, ref, x, th, device))
    except Exception as exc:
        why = exception_reason(exc)
        mine, ref_ms = rounds[0] if rounds else ([], [])
        nan = math.nan
        return LatencyResult(len(mine), percentile(mine, 0.5), percentile(mine, 0.95), percentile(ref_ms, 0.5),
                             percentile(ref_ms, 0.95), nan, nan, nan, nan, 0, 0, True, why, why)
    mine, ref_ms = min(rounds, key=lambda r: percentile(r[0], 0.95))
    p50, p95, ref_p50 = percentile(mine, 0.5), percentile(mine, 0.95), percentile(ref_ms, 0.5)
    ratio = _ratio(p95, ref_p50)
    try:
        traces = [trace_forward(module, x, device) for _ in range(th.latency_trace_calls)]
    except Exception as exc:  # untraceable (it ran fine untraced): judge by the timings alone
        traces, trace_note = [], f"op trace failed ({exception_reason(exc)}), stall unknown"
    if traces:
        live_ms = percentile([t.live_ms for t in traces], 0.5)
        stall_ms = max(0.0, p50 - live_ms)
        share = stall_ms / p50 if p50 > 0.0 else 0.0
        trace_note = (f"of which stall {stall_ms:.3g} ms ({share:.0%}, limit {th.latency_stall_share:.0%}), "
                      f"{traces[0].dead_ops} dead ops")
    else:
        live_ms = stall_ms = share = math.nan
    flagged = _slow(mine, ref_ms, th) and not share < th.latency_stall_share
    reason = (f"p95 {p95:.3g} ms = {ratio:.3g}x reference p50 (limits {th.latency_p95_ratio:g}x, "
              f"{th.latency_floor_ms:g} ms), p50 {p50:.3g} ms {trace_note}; "
              + ("too slow for nothing" if flagged else "within limits"))
    ops, dead = (traces[0].live_ops + traces[0].dead_ops, traces[0].dead_ops) if traces else (0, 0)
    return LatencyResult(len(mine), p50, p95, ref_p50, percentile(ref_ms, 0.95), ratio, live_ms, stall_ms, share,
                         ops, dead, flagged, reason)


ProbeResult = NanResult | GradientResult | PrecisionResult | DeterminismResult | MemoryResult | LatencyResult
