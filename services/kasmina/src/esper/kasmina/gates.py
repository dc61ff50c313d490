"""Gates G0-G5: pure checks over small typed inputs, each returning a :class:`GateResult`.

What each gate guards, and its checks (reason code on failure):

- **G0 sanity** (DORMANT -> GERMINATED, and the kernel at attach): seed id (``missing_seed_id``), slot
  registered (``unknown_seed``), blueprint id (``missing_blueprint_id``), finite command parameters
  (``non_finite_parameters``), the fetched kernel is the one commanded (``kernel_mismatch``), finite
  kernel weights (``non_finite_kernel_parameters``).
- **G1 gradient health** (GERMINATED -> TRAINING, then every step while isolated): the seed's output
  finite wherever its input was (``non_finite_output``), gradients arrived (``no_gradients``), finite
  (``non_finite_gradients``), bounded (``gradient_explosion``), isolation holds, |host·seed| <=
  threshold (``isolation_violation``).
- **G2 stability** (TRAINING -> BLENDING): a full window (``insufficient_window``), finite local loss
  (``non_finite_loss``), no divergence (``loss_diverged``), p95 seed latency within budget
  (``latency_over_budget``).
- **G3 interface** (kernel attach, and BLENDING -> SHADOWING): the probe forward runs
  (``probe_failed``), output shape (``shape_mismatch``) and
  dtype (``dtype_mismatch``) fit the host slot, finite output (``non_finite_output``), every
  ``mesh_host_layers`` layer registered (``mesh_coverage_missing``), blend mode allowed for the
  blueprint (``blend_mode_not_allowed``).
- **G4 system impact** (SHADOWING -> PROBATIONARY; the status rule on every step; a failed kernel
  fetch, which leaves only a fallback): status is not a fallback (``fallback_status_rejected``,
  terminal), no isolation violations (``isolation_violations``), a loss signal exists
  (``missing_loss_signal``), no regression against the host-only baseline (``loss_regression``).
- **G5 reset** (RESETTING -> DORMANT): no kernel attached (``kernel_still_attached``), no seed
  parameters left in the optimizer (``optimizer_state_left``), no hooks left (``hooks_left``).

No torch here: callers reduce tensors to the floats and booleans below.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from esper.leyline import pb

__all__ = [
    "FALLBACK_STATUS",
    "GateResult",
    "GradientObservation",
    "InterfaceProbe",
    "gate_g0_sanity",
    "gate_g1_gradient_health",
    "gate_g2_stability",
    "gate_g3_interface",
    "gate_g4_system_impact",
    "gate_g5_reset",
    "gate_name",
]

G0: Final[int] = pb.SEED_GATE_G0_SANITY
G1: Final[int] = pb.SEED_GATE_G1_GRADIENT_HEALTH
G2: Final[int] = pb.SEED_GATE_G2_STABILITY
G3: Final[int] = pb.SEED_GATE_G3_INTERFACE
G4: Final[int] = pb.SEED_GATE_G4_SYSTEM_IMPACT
G5: Final[int] = pb.SEED_GATE_G5_RESET

FALLBACK_STATUS: Final[str] = "fallback"


def gate_name(gate: int) -> str:
    """``pb.SEED_GATE_G3_INTERFACE`` → ``"G3_INTERFACE"``."""
    return pb.SeedLifecycleGate.Name(pb.SeedLifecycleGate.ValueType(gate)).removeprefix("SEED_GATE_")


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: int
    passed: bool
    reason: str = ""  # stable code; "" when passed
    detail: str = ""

    @property
    def name(self) -> str:
        return gate_name(self.gate)


def _ok(gate: int) -> GateResult:
    return GateResult(gate, True)


def _fail(gate: int, reason: str, detail: str = "") -> GateResult:
    return GateResult(gate, False, reason, detail)


# -- G0 ----------------------------------------------------------------------------------------------


def gate_g0_sanity(*, seed_id: str, registered: bool, blueprint_id: str,
                   parameters: Mapping[str, float] | None = None, kernel_finite: bool | None = None,
                   kernel_id: str | None = None, expected_kernel_id: str | None = None) -> GateResult:
    """IDs present and real, numbers finite. ``kernel_finite`` is None before a kernel is attached; at
    attach, ``kernel_id`` (what was fetched) must be ``expected_kernel_id`` (what the command asked for):
    a checksum proves the bytes are Urza's, not that they are the blueprint Tamiyo chose."""
    if not seed_id.strip():
        return _fail(G0, "missing_seed_id")
    if not registered:
        return _fail(G0, "unknown_seed", f"no slot registered for {seed_id!r}")
    if not blueprint_id.strip():
        return _fail(G0, "missing_blueprint_id")
    bad = sorted(k for k, v in (parameters or {}).items() if not math.isfinite(v))
    if bad:
        return _fail(G0, "non_finite_parameters", ", ".join(bad))
    if kernel_id is not None and expected_kernel_id is not None and kernel_id != expected_kernel_id:
        return _fail(G0, "kernel_mismatch", f"commanded {expected_kernel_id}, fetched {kernel_id}")
    if kernel_finite is False:
        return _fail(G0, "non_finite_kernel_parameters")
    return _ok(G0)


# -- G1 ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GradientObservation:
    """One step of a seed: whether gradients reached it, their norm, the isolation dot product, the
    gradient the seed branch sent toward the host (`IsolationStats.seed_norm`), and whether its output
    stayed finite on finite input."""

    grads_observed: bool
    grad_norm: float
    isolation_dot: float
    isolation_seed_norm: float = 0.0
    output_finite: bool = True


def gate_g1_gradient_health(obs: GradientObservation, *, isolation_threshold: float = 1e-6,
                            max_grad_norm: float = 1e3) -> GateResult:
    # First: a seed that turns finite activations into NaN/inf poisons every step it runs in, so the
    # trainer refuses them all and its gradients are never read (Kasmina.discard_step judges it).
    if not obs.output_finite:
        return _fail(G1, "non_finite_output", "the seed's output was non-finite on finite input")
    if not obs.grads_observed:
        return _fail(G1, "no_gradients", "the seed trained but no gradient reached its parameters")
    if not math.isfinite(obs.grad_norm):
        return _fail(G1, "non_finite_gradients", f"grad norm {obs.grad_norm}")
    if obs.grad_norm > max_grad_norm:
        return _fail(G1, "gradient_explosion", f"grad norm {obs.grad_norm:.4g} > {max_grad_norm:g}")
    if not math.isfinite(obs.isolation_dot) or abs(obs.isolation_dot) > isolation_threshold:
        return _fail(G1, "isolation_violation", f"|host·seed| = {abs(obs.isolation_dot):.4g} > {isolation_threshold:g}")
    # The dot is blind where the host branch carries no gradient (alpha 1: SHADOWING, PROBATIONARY) and
    # scales with the loss squared. An isolated seed consumes h.detach(), so its branch sends exactly
    # nothing toward the host: any gradient there is a leak, whatever the dot says.
    if not math.isfinite(obs.isolation_seed_norm) or obs.isolation_seed_norm > 0.0:
        return _fail(G1, "isolation_violation", f"the seed branch sent gradient {obs.isolation_seed_norm:.4g} toward "
                                                f"the host (|host·seed| = {abs(obs.isolation_dot):.4g})")
    return _ok(G1)


# -- G2 ----------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def gate_g2_stability(*, losses: Sequence[float], latencies_ms: Sequence[float], window: int,
                      max_loss_ratio: float = 2.0, latency_budget_ms: float = 50.0,
                      abs_tolerance: float = 1e-6) -> GateResult:
    """Over the last ``window`` steps: every local loss finite, the second half's mean at most
    ``max_loss_ratio`` x the first half's (+ ``abs_tolerance``, for losses that start at 0), and the
    p95 seed forward latency within budget."""
    if window < 1 or len(losses) < window:
        return _fail(G2, "insufficient_window", f"{len(losses)} of {window} steps")
    recent = list(losses[-window:])
    if not all(math.isfinite(v) for v in recent):
        return _fail(G2, "non_finite_loss")
    half = max(1, window // 2)
    first, last = _mean(recent[:half]), _mean(recent[-half:])
    if last > max_loss_ratio * first + abs_tolerance:
        return _fail(G2, "loss_diverged", f"mean loss {first:.4g} → {last:.4g}")
    if latencies_ms:
        window_ms = list(latencies_ms[-window:])
        # a NaN sorts anywhere: judged unmeasurable (over budget) before the order is trusted
        p95 = _p95(window_ms) if all(math.isfinite(v) for v in window_ms) else math.nan
        if not math.isfinite(p95) or p95 > latency_budget_ms:
            return _fail(G2, "latency_over_budget", f"p95 {p95:.3f} ms > {latency_budget_ms:g} ms")
    return _ok(G2)


# -- G3 ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InterfaceProbe:
    """What a probe forward of the kernel on the slot's example input produced."""

    slot_shape: tuple[int, ...]
    slot_dtype: str
    output_shape: tuple[int, ...]
    output_dtype: str
    output_finite: bool
    error: str = ""  # the probe forward raised (or returned a non-tensor)


def gate_g3_interface(probe: InterfaceProbe, *, required_layers: Collection[str] = (),
                      host_layers: Collection[str] = (), blend_mode: str = "CONVEX",
                      allowed_blend_modes: Collection[str] = ("CONVEX",)) -> GateResult:
    if probe.error:
        return _fail(G3, "probe_failed", probe.error)
    if probe.output_shape != probe.slot_shape:
        return _fail(G3, "shape_mismatch", f"output {probe.output_shape} != slot {probe.slot_shape}")
    if probe.output_dtype != probe.slot_dtype:
        return _fail(G3, "dtype_mismatch", f"output {probe.output_dtype} != slot {probe.slot_dtype}")
    if not probe.output_finite:
        return _fail(G3, "non_finite_output")
    missing = sorted(set(required_layers) - set(host_layers))
    if missing:
        return _fail(G3, "mesh_coverage_missing", ", ".join(missing))
    if blend_mode not in allowed_blend_modes:
        return _fail(G3, "blend_mode_not_allowed", f"{blend_mode} not in {sorted(allowed_blend_modes)}")
    return _ok(G3)


# -- G4 ----------------------------------------------------------------------------------------------


def gate_g4_system_impact(*, performance_status: str, baseline_loss: float | None = None,
                          observed_loss: float | None = None, regression_tolerance: float = 0.1,
                          isolation_violations: int = 0, check_regression: bool = True) -> GateResult:
    """A fallback status fails at once (terminal). With ``check_regression``, the mean training loss
    while the seed is fully blended must not exceed the host-only baseline by more than the tolerance."""
    if performance_status.strip().lower() == FALLBACK_STATUS:
        return _fail(G4, "fallback_status_rejected", "a degraded (fallback) seed may not progress")
    if isolation_violations > 0:
        return _fail(G4, "isolation_violations", f"{isolation_violations} violation(s)")
    if not check_regression:
        return _ok(G4)
    if baseline_loss is None or observed_loss is None:
        return _fail(G4, "missing_loss_signal", "no training loss was reported to Kasmina.advance()")
    if not math.isfinite(observed_loss) or not math.isfinite(baseline_loss):
        return _fail(G4, "loss_regression", f"non-finite loss ({baseline_loss} → {observed_loss})")
    limit = baseline_loss + abs(baseline_loss) * regression_tolerance
    if observed_loss > limit:
        return _fail(G4, "loss_regression", f"loss {observed_loss:.4g} > baseline {baseline_loss:.4g} "
                                            f"+ {regression_tolerance:.0%}")
    return _ok(G4)


# -- G5 ----------------------------------------------------------------------------------------------


def gate_g5_reset(*, kernel_attached: bool, optimizer_params_left: int, hooks_left: int) -> GateResult:
    if kernel_attached:
        return _fail(G5, "kernel_still_attached")
    if optimizer_params_left:
        return _fail(G5, "optimizer_state_left", f"{optimizer_params_left} seed parameter(s) still in the optimizer")
    if hooks_left:
        return _fail(G5, "hooks_left", f"{hooks_left} hook(s) still registered")
    return _ok(G5)
