"""Step statistics for `SystemStatePacket.training_metrics` (REFERENCE_PROTOTYPE §6.5 names). Pure.

`TrainingSignals.update(loss, grad_norm)` folds one step into exponentially weighted statistics and
returns `loss_delta` (the step's change of the loss EWMA: see `update`), `loss_ewma`, `loss_volatility` (EW standard
deviation of the loss), `grad_norm_ewma` and `grad_var` (EW variance of the gradient norm). The EW
mean/variance is Finch's incremental form: first sample → mean x, variance 0.

Non-finite inputs are refused (`NonFiniteMetricError`) rather than folded in: a NaN loss is a step
failure for the loop to handle, and one NaN would poison every later EWMA. `training_metrics` builds
the map for the packet and refuses non-finite values too (Tamiyo's normaliser must never see NaN).
Prometheus counters are in `esper.tolaria.instruments`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from esper.core.errors import EsperError

__all__ = [
    "EwmStats",
    "NonFiniteMetricError",
    "StepSignals",
    "TrainingSignals",
    "batch_accuracy",
    "gradient_norm",
    "step_readings",
    "training_metrics",
]


class NonFiniteMetricError(EsperError, ValueError):
    """A NaN or infinite value where a packet metric was expected."""


def _finite(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise NonFiniteMetricError(f"{name} is not finite: {value!r}")
    return v


class EwmStats:
    """Exponentially weighted mean and variance with weight `alpha` on the newest sample."""

    __slots__ = ("alpha", "count", "mean", "var")

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def update(self, x: float) -> None:
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            diff = x - self.mean
            incr = self.alpha * diff
            self.mean += incr
            self.var = (1.0 - self.alpha) * (self.var + diff * incr)
        self.count += 1

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))


@dataclass(frozen=True, slots=True)
class StepSignals:
    loss_delta: float
    loss_ewma: float
    loss_volatility: float
    grad_norm_ewma: float
    grad_var: float

    def as_dict(self) -> dict[str, float]:
        return {"loss_delta": self.loss_delta, "loss_ewma": self.loss_ewma, "loss_volatility": self.loss_volatility,
                "grad_norm_ewma": self.grad_norm_ewma, "grad_var": self.grad_var}


class TrainingSignals:
    """Running loss / gradient-norm statistics of one run (reset after a rollback if wanted: `reset()`)."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.loss = EwmStats(alpha)
        self.grad = EwmStats(alpha)
        self.last_loss: float | None = None

    def reset(self) -> None:
        self.loss = EwmStats(self.alpha)
        self.grad = EwmStats(self.alpha)
        self.last_loss = None

    def update(self, loss: float, grad_norm: float) -> StepSignals:
        """`loss_delta` is the step's change of the *smoothed* loss (EWMA), not of the raw batch loss:
        batch-to-batch differences are mostly sampling noise (±0.3 at batch 64 on digits), and Tamiyo's
        risk engine reads `loss_delta` > 0.15 as a loss spike that enters conservative mode; on raw
        differences that paused 93-95 % of all commands (measured). A real jump of Δ still moves it by alpha·Δ,
        and the trainer refuses a spiking step itself (`TOLARIA_LOSS_SPIKE_*`)."""
        loss_v, grad_v = _finite("loss", loss), _finite("gradient_norm", grad_norm)
        before = self.loss.mean if self.loss.count else None
        self.last_loss = loss_v
        self.loss.update(loss_v)
        delta = 0.0 if before is None else self.loss.mean - before
        self.grad.update(grad_v)
        return StepSignals(loss_delta=delta, loss_ewma=self.loss.mean, loss_volatility=self.loss.std,
                           grad_norm_ewma=self.grad.mean, grad_var=self.grad.var)


def _gradient_norms(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each gradient present (one fused kernel), each in its gradient's dtype and on its
    device: the global norm is their hypotenuse, taken on the host after the one read."""
    grads = [p.grad for p in parameters if p.grad is not None]  # leaves outside autograd: no detach needed
    return list(torch._foreach_norm(grads, 2.0)) if grads else []


def _read(parts: list[torch.Tensor], device: torch.device) -> list[float]:
    """0-d tensors read in one copy. `torch.stack` promotes mixed dtypes itself; tensors on another
    device (gradients elsewhere than the loss: rare) are gathered onto `device` only when it refuses
    them, so the usual step pays no per-tensor check."""
    try:
        return torch.stack(parts).tolist()
    except RuntimeError:
        return torch.stack([t.to(device) for t in parts]).tolist()


def gradient_norm(parameters: Iterable[torch.Tensor]) -> float:
    """Global L2 norm of the gradients present (0.0 when none); one device sync."""
    norms = _gradient_norms(parameters)
    return math.hypot(*_read(norms, norms[0].device)) if norms else 0.0


def _correct_count(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty batch")
    return (logits.argmax(dim=1) == labels).sum(dtype=torch.float32)


def batch_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of one batch, in [0, 1]."""
    return float(_correct_count(logits, labels).item()) / len(labels)


def step_readings(loss: torch.Tensor, parameters: Iterable[torch.Tensor], logits: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> tuple[float, float, float | None]:
    """(loss, global gradient norm, batch accuracy or None without logits) of one step, in one read.

    Why one: every `.item()` waits for the device. The trainer must read the loss and the norm before
    `optimizer.step()` (a non-finite step is never applied); reading the accuracy apart, after the
    step, made the CPU wait for the optimizer's kernels too, and the GPU then idled while the CPU built
    the packet. Here the loss, the per-gradient norms and the correct count are stacked on the device
    and copied once; the sums (global norm, accuracy) are a few floats, cheaper on the host than as
    more tensor ops, each of which costs a dispatch on every step."""
    norms = _gradient_norms(parameters)
    head = loss.detach()
    parts = [head if head.dim() == 0 else head.reshape(()), *norms]
    batch = None
    if logits is not None and labels is not None:
        parts.append(_correct_count(logits.detach(), labels))
        batch = len(labels)
    values = _read(parts, loss.device)
    accuracy = None if batch is None else values[-1] / batch
    return values[0], math.hypot(*values[1:1 + len(norms)]), accuracy


def training_metrics(*, loss: float, accuracy: float, gradient_norm: float, samples_per_s: float,
                     hook_latency_ms: float, signals: StepSignals, step_latency_ms: float | None = None,
                     optimizer_family_index: int | None = None,
                     extra: Mapping[str, float] | None = None) -> dict[str, float]:
    """The `training_metrics` map of one SystemStatePacket; every value finite (NonFiniteMetricError)."""
    out: dict[str, float] = {
        "loss": loss, "accuracy": accuracy, "gradient_norm": gradient_norm, "samples_per_s": samples_per_s,
        "hook_latency_ms": hook_latency_ms, **signals.as_dict(),
    }
    if step_latency_ms is not None:
        out["step_latency_ms"] = step_latency_ms
    if optimizer_family_index is not None:
        out["optimizer_family_index"] = float(optimizer_family_index)
    out.update(extra or {})
    return {k: _finite(k, v) for k, v in out.items()}
