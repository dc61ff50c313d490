"""Blend modes and alpha schedules: how a seed's output enters the host at its slot.

With ``h`` the host activations at the slot and ``s = seed(h)``:

- CONVEX:     ``y = alpha·s + (1 - alpha)·h``
- RESIDUAL:   ``y = h + alpha·s``
- CHANNEL:    ``y = a⊙s + (1 - a)⊙h`` with ``a_c = clamp(alpha·alpha_vec[c], 0, 1)`` on the channel dim (1)
- CONFIDENCE: ``y = a·s + (1 - a)·h`` with ``a = clamp(alpha·g, lo, hi)`` and
  ``g = sigmoid(k·(top1 - top2 - τ))`` over logits (Tamiyo's, sent with the command; k = 4, τ = 0.2
  unless the command says otherwise). A per-sample logits batch gives a per-sample gate.

Where the scalar alpha leaves the seed a weight of 0 (alpha 0; CONFIDENCE with ``alpha_lo`` 0 or a
float gate of 0) the output is exactly ``h``: a non-finite seed output that is not mixed in never
reaches the host (``0·inf`` would be NaN). Per-channel and per-sample weights are not masked: that
would cost two full-size ops on every step for a case (an ``alpha_vec`` entry or a sigmoid gate of
exactly 0) that a live seed's other channels or samples make non-finite anyway, which the trainer
refuses and Kasmina culls.

alpha itself follows a schedule over the blend window (``AlphaSchedule``). The functions here are plain
math: which branch is detached (isolation) is the slot's business, not theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "BLEND_MODES",
    "DEFAULT_GATE_K",
    "DEFAULT_GATE_TAU",
    "SCHEDULE_KINDS",
    "AlphaSchedule",
    "BlendMode",
    "BlendSpec",
    "ScheduleKind",
    "apply_blend",
    "blend_channel",
    "blend_confidence",
    "blend_convex",
    "blend_residual",
    "confidence_gate",
    "confidence_gate_value",
]

BlendMode = Literal["CONVEX", "RESIDUAL", "CHANNEL", "CONFIDENCE"]
BLEND_MODES: Final[tuple[BlendMode, ...]] = get_args(BlendMode)

ScheduleKind = Literal["tanh", "linear", "cosine", "warmup_hold"]
"""``tanh`` is the prototype's curve; ``linear``/``cosine``/``warmup_hold`` are Tamiyo's blending methods."""
SCHEDULE_KINDS: Final[tuple[ScheduleKind, ...]] = get_args(ScheduleKind)

DEFAULT_GATE_K: Final[float] = 4.0
DEFAULT_GATE_TAU: Final[float] = 0.2
DEFAULT_BLEND_STEPS: Final[int] = 20


def _clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


# -- the blends ----------------------------------------------------------------------------------


def _host_if_zero(zero: bool, host: Tensor, seed: Tensor, blended: Tensor) -> Tensor:
    """``blended``, or exactly ``host`` when the seed weighs 0 (decided from Python scalars: no tensor
    op on the common path). ``0·inf`` is NaN, and a seed that is not mixed in must not poison the host.
    The seed stays in the graph (a zero gradient, not none), so G1 still sees gradients arrive at 0."""
    if not zero:
        return blended
    return torch.where(torch.zeros((), dtype=torch.bool, device=host.device), seed, host)


def blend_convex(host: Tensor, seed: Tensor, alpha: float | Tensor) -> Tensor:
    """``alpha·seed + (1 - alpha)·host`` (a float alpha is clamped to [0, 1]); the host where alpha is 0."""
    a = _clamp01(alpha) if isinstance(alpha, float | int) else alpha
    return _host_if_zero(isinstance(a, float) and a == 0.0, host, seed, a * seed + (1.0 - a) * host)


def blend_residual(host: Tensor, seed: Tensor, alpha: float) -> Tensor:
    """``host + alpha·seed``; the host where alpha is 0."""
    a = _clamp01(alpha)
    return _host_if_zero(a == 0.0, host, seed, host + a * seed)


def _channel_view(vec: Tensor, ref: Tensor) -> Tensor:
    """``[C]`` → ``[1, C, 1, ...]`` so it broadcasts over a ``(N, C, ...)`` tensor."""
    shape = [1] * ref.dim()
    shape[1] = vec.numel()
    return vec.reshape(shape)


def blend_channel(host: Tensor, seed: Tensor, alpha: float, alpha_vec: Tensor) -> Tensor:
    """Per-channel convex blend: ``a_c = clamp(alpha·alpha_vec[c], 0, 1)`` on dim 1."""
    if host.dim() < 2 or alpha_vec.numel() != host.shape[1]:
        raise ValueError(f"alpha_vec has {alpha_vec.numel()} entries for {tuple(host.shape)} activations")
    a = _channel_view((_clamp01(alpha) * alpha_vec.to(device=seed.device, dtype=seed.dtype)).clamp(0.0, 1.0), seed)
    return _host_if_zero(_clamp01(alpha) == 0.0, host, seed, a * seed + (1.0 - a) * host)


def confidence_gate(logits: Tensor, k: float = DEFAULT_GATE_K, tau: float = DEFAULT_GATE_TAU) -> Tensor:
    """``sigmoid(k·(top1 - top2 - τ))`` over the last dim: ``[K]`` → scalar, ``[N, K]`` → ``[N]``."""
    if logits.dim() == 0 or logits.shape[-1] < 2:
        raise ValueError("the confidence gate needs at least two logits")
    top2 = torch.topk(logits.detach(), k=2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    return torch.sigmoid(k * (margin - tau))


def confidence_gate_value(logits: list[float], k: float = DEFAULT_GATE_K, tau: float = DEFAULT_GATE_TAU) -> float:
    """The gate of one logits vector as a float (what a command's ``confidence_logits`` yields)."""
    if len(logits) < 2:
        raise ValueError("the confidence gate needs at least two logits")
    top1, top2 = sorted(logits, reverse=True)[:2]
    x = k * (top1 - top2 - tau)
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def blend_confidence(host: Tensor, seed: Tensor, alpha: float, gate: float | Tensor, *, alpha_lo: float = 0.0,
                     alpha_hi: float = 1.0) -> Tensor:
    """Convex blend with ``a = clamp(alpha·gate, lo, hi)``; a ``[N]`` gate is applied per sample (dim 0)."""
    if isinstance(gate, Tensor):
        a = (_clamp01(alpha) * gate.detach().to(device=seed.device, dtype=seed.dtype)).clamp(alpha_lo, alpha_hi)
        if a.dim() > 0:
            a = a.reshape(a.shape + (1,) * (seed.dim() - a.dim()))
        zero = _clamp01(alpha) == 0.0 and alpha_lo <= 0.0
        return _host_if_zero(zero, host, seed, a * seed + (1.0 - a) * host)
    return blend_convex(host, seed, min(alpha_hi, max(alpha_lo, _clamp01(alpha) * gate)))


# -- schedules -----------------------------------------------------------------------------------


def _shape(kind: ScheduleKind, u: float) -> float:
    if kind == "linear":
        return u
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * u))
    if kind == "warmup_hold":
        return min(1.0, 2.0 * u)  # ramp over the first half of the window, then hold
    # tanh: the prototype's 0.5·(1 + tanh(0.5·(step - 10)/2)) over 20 steps, i.e. 0.5·(1 + tanh(5·(u - ½))).
    return 0.5 * (1.0 + math.tanh(5.0 * (u - 0.5)))


@dataclass(frozen=True, slots=True)
class AlphaSchedule:
    """alpha over a blend window of ``total_steps`` steps.

    ``start``/``end`` are the fractions of the window the ramp occupies (Tamiyo's
    ``blending_schedule_start/end``); alpha goes from ``alpha_start`` (Tamiyo's ``alpha`` parameter) to
    ``alpha_end`` along the ``kind`` curve: ``alpha(step) = alpha0 + (alpha1 - alpha0)·shape(u)`` with
    ``u = clamp((step - start·T) / ((end - start)·T), 0, 1)``. With the defaults (tanh, 20 steps, the
    whole window, 0 → 1) this is exactly the prototype's ``0.5·(1 + tanh(0.5·(step - 10)/2))``.
    """

    kind: ScheduleKind = "tanh"
    total_steps: int = DEFAULT_BLEND_STEPS
    start: float = 0.0
    end: float = 1.0
    alpha_start: float = 0.0
    alpha_end: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got {self.start}, {self.end}")
        if not (0.0 <= self.alpha_start <= 1.0 and 0.0 <= self.alpha_end <= 1.0):
            raise ValueError("alpha_start and alpha_end must lie in [0, 1]")

    def progress(self, step: int) -> float:
        t0, t1 = self.start * self.total_steps, self.end * self.total_steps
        if t1 <= t0:
            return 1.0 if step >= t0 else 0.0
        return min(1.0, max(0.0, (step - t0) / (t1 - t0)))

    def value(self, step: int) -> float:
        return self.alpha_start + (self.alpha_end - self.alpha_start) * _shape(self.kind, self.progress(step))

    def done(self, step: int) -> bool:
        return step >= self.total_steps


# -- the blend a command asked for ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlendSpec:
    """Everything a GERMINATE command says about blending (parsed and checked by ``validation``)."""

    mode: BlendMode = "CONVEX"
    schedule: ScheduleKind = "tanh"
    schedule_start: float = 0.0
    schedule_end: float = 1.0
    alpha_start: float = 0.0
    alpha_vec: tuple[float, ...] | None = None  # CHANNEL
    gate_k: float = DEFAULT_GATE_K  # CONFIDENCE
    gate_tau: float = DEFAULT_GATE_TAU
    alpha_lo: float = 0.0
    alpha_hi: float = 1.0
    gate: float | None = None  # CONFIDENCE: sigmoid(k·(top1 - top2 - τ)) of Tamiyo's logits

    def alpha_schedule(self, total_steps: int = DEFAULT_BLEND_STEPS) -> AlphaSchedule:
        return AlphaSchedule(self.schedule, total_steps, self.schedule_start, self.schedule_end, self.alpha_start)

    def effective_alpha(self, alpha: float) -> float:
        """The seed's weight in a blend at ``alpha`` as one number: CONFIDENCE gates and clamps it,
        CHANNEL gives the mean of its clamped per-channel weights."""
        if self.mode == "CONFIDENCE" and self.gate is not None:
            return min(self.alpha_hi, max(self.alpha_lo, _clamp01(alpha) * self.gate))
        if self.mode == "CHANNEL" and self.alpha_vec:
            return sum(_clamp01(_clamp01(alpha) * v) for v in self.alpha_vec) / len(self.alpha_vec)
        return _clamp01(alpha)


def apply_blend(host: Tensor, seed: Tensor, alpha: float, spec: BlendSpec, *,
                alpha_vec: Tensor | None = None) -> Tensor:
    """Blend per ``spec`` at ``alpha`` (``alpha_vec`` is the CHANNEL vector as a tensor, if cached)."""
    if spec.mode == "RESIDUAL":
        return blend_residual(host, seed, alpha)
    if spec.mode == "CHANNEL":
        if alpha_vec is None:
            if spec.alpha_vec is None:
                raise ValueError("CHANNEL blend without alpha_vec")
            alpha_vec = torch.tensor(spec.alpha_vec, dtype=seed.dtype, device=seed.device)
        return blend_channel(host, seed, alpha, alpha_vec)
    if spec.mode == "CONFIDENCE":
        if spec.gate is None:
            raise ValueError("CONFIDENCE blend without a gate")
        return blend_confidence(host, seed, alpha, spec.gate, alpha_lo=spec.alpha_lo, alpha_hi=spec.alpha_hi)
    return blend_convex(host, seed, alpha)
