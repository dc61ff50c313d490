"""Where each crucible probe draws the line between a measurement and a hazard.

Every gradient and latency threshold is a ratio against a reference measured in the same run (a plain
`nn.Linear(C, C)`, or a 1x1 `nn.Conv2d` for a conv slot, with torch's default init), so the verdicts
do not depend on how fast or how loaded the machine is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Probe sizes and flagging thresholds (defaults probe the whole Karn catalogue in a few seconds)."""

    batch: int = 8
    """Rows of unit-normal input per call (memory uses `memory_batch`)."""

    nan_calls: int = 3
    """Forward+backward passes checked for non-finite outputs, losses and gradients."""

    grad_explode_ratio: float = 1e3
    """Input- or parameter-gradient norm above this multiple of the reference's: `gradient_explode`."""
    grad_vanish_ratio: float = 1e-4
    """Input-gradient norm below this fraction of the reference's (and still below it after
    `grad_recovery_steps` SGD steps, when the module has parameters): `gradient_vanish`."""
    grad_recovery_steps: int = 3
    """SGD steps that let a zero-initialised branch wake up before a small input gradient counts."""
    grad_recovery_lr: float = 0.1

    precision_rel_error: float = 1e-3
    """Relative L2 error of float32 outputs against a float64 copy; float32 rounding is ~1e-7."""

    determinism_calls: int = 5
    """Identical eval-mode calls compared with the first one."""
    determinism_rel_diff: float = 1e-4
    """Largest relative L2 difference between identical calls tolerated (eval mode, no dropout)."""

    memory_calls: int = 20
    memory_batch: int = 16
    memory_slack_bytes: int = 16 * 1024
    """Growth of reachable tensor bytes tolerated after the warm-up call, whatever the module's size.
    A module that keeps every output grows by `memory_calls` outputs: 80 KiB on a v64 slot, 320 KiB
    on a c16x8x8 one. A well-behaved module does not grow at all once its warm-up call is done."""
    memory_slack_param_fraction: float = 0.10
    """...or this fraction of the module's own parameter bytes, whichever is larger."""
    memory_walk_items: int = 200_000
    """Bound on objects visited when collecting the tensors reachable from the module."""

    latency_warmup_calls: int = 3
    latency_calls: int = 20
    latency_budget_s: float = 0.5
    """The latency probe stops sampling past this much wall time (keeping at least 5 samples)."""
    latency_p95_ratio: float = 40.0
    """p95 latency above this multiple of the reference linear's p50 (its typical cost)..."""
    latency_floor_ms: float = 1.0
    """...and above this absolute p95, so CPU noise on a microsecond-scale module never flags it..."""
    latency_stall_share: float = 0.5
    """...and at least this share of the median call is *stall*: time not spent in the ops the output
    depends on (waiting, spinning, computing results that are thrown away). A module that is slow
    because it computes a lot is a cost for the BSDS latency numbers, not a hazard."""
    latency_trace_calls: int = 3
    """Op-traced calls whose median live-op time is subtracted from the median call to get the stall."""

    heavy_param_bytes: int = 64 * 1024 * 1024
    """Parameter bytes from which a BSDS resource profile is MEMORY_HEAVY even without a leak."""

    def __post_init__(self) -> None:
        counts = (self.batch, self.nan_calls, self.determinism_calls, self.memory_calls, self.memory_batch,
                  self.latency_calls, self.memory_walk_items, self.latency_trace_calls)
        if min(counts) < 1 or self.determinism_calls < 2 or self.grad_recovery_steps < 0:
            raise ValueError("crucible call counts must be positive (determinism needs at least 2 calls)")
        if not 0.0 < self.grad_vanish_ratio < 1.0 < self.grad_explode_ratio:
            raise ValueError("gradient thresholds must satisfy 0 < vanish < 1 < explode")


DEFAULT_THRESHOLDS = Thresholds()
