"""The commands Kasmina hands back to the trainer (OPTIMIZER above all). Pure: tests call them directly.

An OPTIMIZER command really changes the optimizer, but never by much at once and never far from
where the run started: Tamiyo's `lr_delta` (or an explicit `learning_rate`) becomes a multiplicative
step clamped to [1/MAX_STEP, MAX_STEP], and the result is clamped to [base/FLOOR, base*CEILING].
Under a schedule (`TOLARIA_LR_POLICY` not `off`) the same bounds apply to the scale the schedule is
multiplied by (base 1), which is what persists: bounding the rate of the moment instead let warm-up
commands build a scale past the ceiling, and a decrease at a rate below the floor jump 10-10,000x.

`weight_decay` and `momentum` (SGD's momentum, Adam's beta1) are set as given, clamped to
[0, WEIGHT_DECAY_MAX] and [0, MOMENTUM_MAX]. Any other name, a non-finite value, a rate <= 0, a
momentum outside [0, 1) or no hyperparameter at all refuses the whole command
(`OptimizerCommandRefused`): it was counted as applied and changed nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch.optim import Optimizer

MAX_STEP = 2.0  # one command changes the learning rate by at most 2x either way
FLOOR = 100.0  # never below base / 100
CEILING = 10.0  # never above base * 10
WEIGHT_DECAY_MAX = 0.1
MOMENTUM_MAX = 0.99
LR_KEYS = ("learning_rate", "lr_delta")
SET_KEYS = ("weight_decay", "momentum")  # set as given, within their bounds


class OptimizerCommandRefused(ValueError):
    """An OPTIMIZER command the trainer will not carry out; `reason` is the counted code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HyperChange:
    name: str
    old: float
    new: float
    clamped: bool


def check_hyperparameters(hyperparameters: Mapping[str, float]) -> None:
    """Refuse (OptimizerCommandRefused) what would change nothing or something unmeant, before any of it applies."""
    if not hyperparameters:
        raise OptimizerCommandRefused("no_hyperparameters", "the command names no hyperparameter")
    unknown = sorted(set(hyperparameters) - {*LR_KEYS, *SET_KEYS})
    if unknown:
        raise OptimizerCommandRefused("unsupported_hyperparameter", f"not carried out: {', '.join(unknown)}"[:200])
    bad = sorted(k for k, v in hyperparameters.items() if not math.isfinite(v))
    if bad:
        raise OptimizerCommandRefused("invalid_hyperparameter", f"non-finite {', '.join(bad)}")
    if hyperparameters.get("learning_rate", 1.0) <= 0:
        raise OptimizerCommandRefused("invalid_hyperparameter", "learning_rate must be > 0")
    if hyperparameters.get("weight_decay", 0.0) < 0:
        raise OptimizerCommandRefused("invalid_hyperparameter", "weight_decay must be >= 0")
    if not 0.0 <= hyperparameters.get("momentum", 0.0) < 1.0:
        raise OptimizerCommandRefused("invalid_hyperparameter", "momentum must be in [0, 1)")


def set_hyperparameter(optimizer: Optimizer, name: str, value: float) -> HyperChange:
    """`weight_decay` or `momentum` on every group (seeds' too), clamped to its bound. SGD keeps a
    momentum buffer it stops updating at momentum 0: turning momentum back on drops it, or the first
    steps would follow a gradient history from before the pause."""
    new = min(value, WEIGHT_DECAY_MAX if name == "weight_decay" else MOMENTUM_MAX)
    old = _read(optimizer.param_groups[0], name)
    for group in optimizer.param_groups:
        if name == "momentum" and "betas" in group:
            group["betas"] = (new, group["betas"][1])
            continue
        if name == "momentum" and group.get(name, 0.0) == 0.0 and new > 0.0:
            for p in group["params"]:
                optimizer.state.get(p, {}).pop("momentum_buffer", None)
        group[name] = new
    # the command's values are float32: 0.1 arrives as 0.10000000149, which is not a clamp
    return HyperChange(name, old, new, clamped=not math.isclose(new, value, rel_tol=1e-6))


def _read(group: Mapping[str, object], name: str) -> float:
    value = group["betas"][0] if name == "momentum" and "betas" in group else group.get(name, 0.0)  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LrChange:
    old: float
    new: float
    requested: float  # what the command asked for, before the bounds
    clamped: bool


def adjust_lr(current: float, base: float, hyperparameters: Mapping[str, float]) -> LrChange:
    """The bounded new learning rate for an OPTIMIZER command's hyperparameters."""
    if "learning_rate" in hyperparameters and math.isfinite(hyperparameters["learning_rate"]):
        requested = float(hyperparameters["learning_rate"])
    else:
        delta = float(hyperparameters.get("lr_delta", 0.0))
        try:
            requested = current * math.exp(delta) if math.isfinite(delta) else current
        except OverflowError:  # a finite delta past ~709.78: the step bound below still applies
            requested = math.inf
    stepped = min(max(requested, current / MAX_STEP), current * MAX_STEP)
    new = min(max(stepped, base / FLOOR), base * CEILING)
    return LrChange(current, new, requested, clamped=not math.isclose(new, requested, rel_tol=1e-9))


def as_scale_request(hyperparameters: Mapping[str, float], current: float) -> dict[str, float]:
    """An OPTIMIZER command as a step of the scale on a learning-rate schedule (`lr_delta`): an explicit
    `learning_rate` asks for the factor that would reach it from the current rate (none from a rate of 0)."""
    lr = hyperparameters.get("learning_rate")
    if lr is not None and math.isfinite(lr):
        return {"lr_delta": math.log(lr / current)} if lr > 0 and current > 0 else {}
    return {"lr_delta": float(hyperparameters.get("lr_delta", 0.0))}


def current_lr(optimizer: Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Every group, seeds included (Kasmina's seed groups copy the host's hyperparameters)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def scheduled_lr(policy: str, base: float, *, step: int, epoch: int, total_steps: int, warmup_steps: int = 0,
                 step_epochs: int = 10, gamma: float = 0.5) -> float | None:
    """`TOLARIA_LR_POLICY`'s learning rate before OPTIMIZER commands scale it; None for `off` (the
    optimizer keeps whatever rate commands set). Warm-up ramps linearly over the first steps."""
    if policy == "off":
        return None
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if policy == "cosine":
        progress = min(1.0, max(0.0, step / max(1, total_steps)))
        return base * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    if policy == "step":
        return base * warm * gamma ** ((max(1, epoch) - 1) // step_epochs)
    return base * warm  # constant
