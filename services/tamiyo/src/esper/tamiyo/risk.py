"""Tamiyo's risk engine: small, pure, per-signal evaluators run in the prototype's order.

Each evaluator looks at one signal of a :class:`RiskInputs` and returns a :class:`RiskFinding` (what
it saw, against which threshold, and what it demands) or ``None``. :func:`evaluate` runs all of them,
keeps every finding for telemetry and combines their effects into a :class:`RiskVerdict`:

- any ``pause`` / ``pause_conservative`` finding turns the command into PAUSE (PAUSE beats downgrade);
- otherwise any ``downgrade_to_optimizer`` finding turns a SEED command into OPTIMIZER;
- any ``pause_conservative`` finding asks the caller to enter conservative mode.

Thresholds, order and reason codes follow the prototype (REFERENCE_PROTOTYPE §6.4; esper-lite
``TamiyoService._risk_evaluator_*``). Differences on purpose: evaluators see the inputs only (never
each other's output), so every breached signal is reported even once the command is already PAUSE;
and a non-finite measurement (NaN, ±inf) counts as a breach instead of silently passing every ``>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from esper.leyline import pb

__all__ = [
    "BLUEPRINT_RISK_ELEVATED",
    "BLUEPRINT_RISK_QUARANTINE",
    "CODE_BLUEPRINT_RISK",
    "CODE_BP_QUARANTINE",
    "CODE_BSDS_HANDLING_QUARANTINE",
    "CODE_BSDS_HAZARD_CRITICAL",
    "CODE_BSDS_HAZARD_HIGH",
    "CODE_CPU_PRESSURE_HIGH",
    "CODE_DEVICE_PRESSURE_HIGH",
    "CODE_GERMINATE_TOO_LATE",
    "CODE_GRAD_CONFLICT_HIGH",
    "CODE_GRAD_VARIANCE_HIGH",
    "CODE_HOOK_BUDGET",
    "CODE_ISOLATION_VIOLATIONS",
    "CODE_KASMINA_APPLY_SLOW",
    "CODE_KASMINA_FINALIZE_SLOW",
    "CODE_LOSS_SPIKE",
    "CODE_LOSS_VOLATILITY_HIGH",
    "CODE_LOSS_WARNING",
    "CODE_PAUSE_TRIGGERED",
    "CODE_POLICY_RISK_CRITICAL",
    "CODE_POLICY_RISK_ELEVATED",
    "CODE_STEP_LATENCY_HIGH",
    "CPU_UTIL_PRESSURE_PERCENT",
    "EVALUATORS",
    "GPU_MEM_FREE_PRESSURE_GB",
    "GPU_UTIL_PRESSURE_PERCENT",
    "GRAD_CONFLICT_RATE_HIGH",
    "GRAD_VAR_HIGH",
    "HOOK_BUDGET_MS",
    "ISOLATION_VIOLATIONS_MAX",
    "KASMINA_APPLY_SLOW_MS",
    "KASMINA_FINALIZE_SLOW_MS",
    "LOSS_SPIKE_DELTA",
    "LOSS_VOLATILITY_HIGH",
    "LOSS_WARNING_DELTA",
    "METRIC_CPU_UTIL_PERCENT",
    "METRIC_GPU_MEM_FREE_GB",
    "METRIC_GPU_UTIL_PERCENT",
    "METRIC_GRAD_CONFLICT_RATE",
    "METRIC_GRAD_VAR",
    "METRIC_HOOK_LATENCY_MS",
    "METRIC_ISOLATION_VIOLATIONS",
    "METRIC_KASMINA_APPLY_MS",
    "METRIC_KASMINA_FINALIZE_MS",
    "METRIC_LOSS_DELTA",
    "METRIC_LOSS_VOLATILITY",
    "METRIC_STEPS_TOTAL",
    "METRIC_STEP_LATENCY_MS",
    "POLICY_RISK_CRITICAL",
    "POLICY_RISK_ELEVATED",
    "REASON_CODES",
    "STEP_LATENCY_HIGH_MS",
    "BlueprintMetadata",
    "Evaluator",
    "RiskEffect",
    "RiskFinding",
    "RiskInputs",
    "RiskVerdict",
    "evaluate",
    "evaluate_blueprint_risk",
    "evaluate_bsds_handling",
    "evaluate_bsds_hazard",
    "evaluate_conservative_mode",
    "evaluate_cpu_pressure",
    "evaluate_device_pressure",
    "evaluate_grad_conflict",
    "evaluate_grad_variance",
    "evaluate_hook_latency",
    "evaluate_isolation",
    "evaluate_kasmina_apply",
    "evaluate_kasmina_finalize",
    "evaluate_loss_delta",
    "evaluate_loss_volatility",
    "evaluate_policy_risk",
    "evaluate_run_ending",
    "evaluate_step_latency",
]

RiskEffect = Literal["pause", "pause_conservative", "downgrade_to_optimizer"]
"""What a finding demands: PAUSE; PAUSE and enter conservative mode; SEED → OPTIMIZER."""

# --- Thresholds (prototype values; the comparison used is named in each comment) ------------------
POLICY_RISK_CRITICAL: Final[float] = 0.98  # policy risk score >= → pause + conservative
POLICY_RISK_ELEVATED: Final[float] = 0.85  # policy risk score >= → downgrade
BLUEPRINT_RISK_QUARANTINE: Final[float] = 0.8  # blueprint risk >= (or quarantine_only) → pause + conservative
BLUEPRINT_RISK_ELEVATED: Final[float] = 0.5  # blueprint risk >= → downgrade
LOSS_SPIKE_DELTA: Final[float] = 0.15  # loss_delta > → pause + conservative
LOSS_WARNING_DELTA: Final[float] = 0.075  # loss_delta > → downgrade (half the spike limit)
HOOK_BUDGET_MS: Final[float] = 50.0  # hook_latency_ms > → pause
STEP_LATENCY_HIGH_MS: Final[float] = 120.0  # step_latency_ms > → pause
KASMINA_APPLY_SLOW_MS: Final[float] = 30.0  # kasmina.apply_ms > → downgrade
KASMINA_FINALIZE_SLOW_MS: Final[float] = 30.0  # kasmina.finalize_ms > → downgrade
ISOLATION_VIOLATIONS_MAX: Final[float] = 0.0  # kasmina.isolation.violations > → pause
LOSS_VOLATILITY_HIGH: Final[float] = 0.1125  # loss_volatility > → downgrade (0.75 of the spike limit)
GRAD_VAR_HIGH: Final[float] = 1.0  # grad_var > → downgrade
GRAD_CONFLICT_RATE_HIGH: Final[float] = 0.5  # grad_conflict_rate > → downgrade
GPU_UTIL_PRESSURE_PERCENT: Final[float] = 95.0  # gpu_util_percent >= ...
GPU_MEM_FREE_PRESSURE_GB: Final[float] = 0.2  # ... and gpu_mem_free_gb <= → pause
CPU_UTIL_PRESSURE_PERCENT: Final[float] = 95.0  # cpu_util_percent >= → downgrade

# --- Step training_metrics keys (prototype docs/prototype-delta/tamiyo/metrics.md) ---------------
METRIC_LOSS_DELTA: Final = "loss_delta"
METRIC_HOOK_LATENCY_MS: Final = "hook_latency_ms"
METRIC_STEP_LATENCY_MS: Final = "step_latency_ms"
METRIC_KASMINA_APPLY_MS: Final = "kasmina.apply_ms"
METRIC_KASMINA_FINALIZE_MS: Final = "kasmina.finalize_ms"
METRIC_ISOLATION_VIOLATIONS: Final = "kasmina.isolation.violations"
METRIC_LOSS_VOLATILITY: Final = "loss_volatility"
METRIC_GRAD_VAR: Final = "grad_var"
METRIC_GRAD_CONFLICT_RATE: Final = "grad_conflict_rate"
METRIC_GPU_UTIL_PERCENT: Final = "gpu_util_percent"
METRIC_GPU_MEM_FREE_GB: Final = "gpu_mem_free_gb"
METRIC_CPU_UTIL_PERCENT: Final = "cpu_util_percent"
METRIC_STEPS_TOTAL: Final = "steps_total"  # the run's planned optimizer steps (Tolaria's packet)

# --- Reason codes (the prototype's event names) ---------------------------------------------------
CODE_POLICY_RISK_CRITICAL: Final = "policy_risk_critical"
CODE_POLICY_RISK_ELEVATED: Final = "policy_risk_elevated"
CODE_PAUSE_TRIGGERED: Final = "pause_triggered"
CODE_BP_QUARANTINE: Final = "bp_quarantine"
CODE_BLUEPRINT_RISK: Final = "blueprint_risk"
CODE_BSDS_HANDLING_QUARANTINE: Final = "bsds_handling_quarantine"
CODE_BSDS_HAZARD_CRITICAL: Final = "bsds_hazard_critical"
CODE_BSDS_HAZARD_HIGH: Final = "bsds_hazard_high"
CODE_LOSS_SPIKE: Final = "loss_spike"
CODE_LOSS_WARNING: Final = "loss_warning"
CODE_HOOK_BUDGET: Final = "hook_budget"
CODE_STEP_LATENCY_HIGH: Final = "step_latency_high"
CODE_KASMINA_APPLY_SLOW: Final = "kasmina_apply_slow"
CODE_KASMINA_FINALIZE_SLOW: Final = "kasmina_finalize_slow"
CODE_ISOLATION_VIOLATIONS: Final = "isolation_violations"
CODE_LOSS_VOLATILITY_HIGH: Final = "loss_volatility_high"
CODE_GRAD_VARIANCE_HIGH: Final = "grad_variance_high"
CODE_GRAD_CONFLICT_HIGH: Final = "grad_conflict_high"
CODE_DEVICE_PRESSURE_HIGH: Final = "device_pressure_high"
CODE_CPU_PRESSURE_HIGH: Final = "cpu_pressure_high"
CODE_GERMINATE_TOO_LATE: Final = "germinate_too_late"

_CRITICAL: Final[int] = pb.TELEMETRY_LEVEL_CRITICAL
_WARNING: Final[int] = pb.TELEMETRY_LEVEL_WARNING

REASON_CODES: Final[Mapping[str, tuple[RiskEffect, int]]] = {
    CODE_POLICY_RISK_CRITICAL: ("pause_conservative", _CRITICAL),
    CODE_POLICY_RISK_ELEVATED: ("downgrade_to_optimizer", _WARNING),
    CODE_PAUSE_TRIGGERED: ("pause", _WARNING),
    CODE_BP_QUARANTINE: ("pause_conservative", _CRITICAL),
    CODE_BLUEPRINT_RISK: ("downgrade_to_optimizer", _WARNING),
    CODE_BSDS_HANDLING_QUARANTINE: ("pause_conservative", _CRITICAL),
    CODE_BSDS_HAZARD_CRITICAL: ("pause_conservative", _CRITICAL),
    CODE_BSDS_HAZARD_HIGH: ("downgrade_to_optimizer", _WARNING),
    # The prototype emits loss_spike at WARNING although it enters conservative mode; it is on the
    # HIGH priority list, which only applies to WARNING/ERROR events.
    CODE_LOSS_SPIKE: ("pause_conservative", _WARNING),
    CODE_LOSS_WARNING: ("downgrade_to_optimizer", _WARNING),
    CODE_HOOK_BUDGET: ("pause", _WARNING),
    CODE_STEP_LATENCY_HIGH: ("pause", _WARNING),
    CODE_KASMINA_APPLY_SLOW: ("downgrade_to_optimizer", _WARNING),
    CODE_KASMINA_FINALIZE_SLOW: ("downgrade_to_optimizer", _WARNING),
    CODE_ISOLATION_VIOLATIONS: ("pause", _WARNING),
    CODE_LOSS_VOLATILITY_HIGH: ("downgrade_to_optimizer", _WARNING),
    CODE_GRAD_VARIANCE_HIGH: ("downgrade_to_optimizer", _WARNING),
    CODE_GRAD_CONFLICT_HIGH: ("downgrade_to_optimizer", _WARNING),
    CODE_DEVICE_PRESSURE_HIGH: ("pause", _WARNING),
    CODE_CPU_PRESSURE_HIGH: ("downgrade_to_optimizer", _WARNING),
    # Not the prototype's: a seed the run cannot finish (expected near the end of every run, so INFO).
    CODE_GERMINATE_TOO_LATE: ("pause", pb.TELEMETRY_LEVEL_INFO),
}
"""Every reason code the engine can emit → (effect, ``TelemetryLevel``)."""

_EFFECT_RANK: Final[Mapping[RiskEffect, int]] = {"pause_conservative": 2, "pause": 1, "downgrade_to_optimizer": 0}

# Safety commands the risk engine never replaces (it may still report findings alongside them).
_UNTOUCHABLE_COMMANDS: Final[frozenset[int]] = frozenset({pb.COMMAND_ROLLBACK, pb.COMMAND_EMERGENCY})


class BlueprintMetadata(Protocol):
    """What the risk engine reads from the graph builder's blueprint record."""

    @property
    def descriptor(self) -> pb.BlueprintDescriptor: ...

    @property
    def bsds(self) -> pb.BSDS | None: ...


@dataclass(frozen=True, slots=True)
class RiskInputs:
    """Everything the evaluators look at for one decision. Optional signals are ``None`` when absent.

    ``loss_delta`` is the service's own delta (validation-loss history); when ``None`` the step's
    ``training_metrics["loss_delta"]`` is used. ``bsds_hazard_band`` / ``bsds_handling_class`` are
    ``pb.HazardBand`` / ``pb.HandlingClass`` values.
    """

    command_type: int
    policy_risk_score: float | None = None
    conservative_mode: bool = False
    blueprint_risk: float | None = None
    blueprint_quarantine_only: bool = False
    bsds_hazard_band: int | None = None
    bsds_handling_class: int | None = None
    loss_delta: float | None = None
    training_metrics: Mapping[str, float] = field(default_factory=dict)
    global_step: int | None = None
    germinate_min_remaining_steps: int = 0  # 0: no end-of-run check (TAMIYO_GERMINATE_MIN_REMAINING_STEPS)

    @classmethod
    def from_blueprint(
        cls,
        blueprint: BlueprintMetadata | None,
        *,
        command_type: int,
        policy_risk_score: float | None = None,
        conservative_mode: bool = False,
        loss_delta: float | None = None,
        training_metrics: Mapping[str, float] | None = None,
        global_step: int | None = None,
        germinate_min_remaining_steps: int = 0,
    ) -> RiskInputs:
        """Inputs with the blueprint fields taken from its descriptor and BSDS.

        A BSDS ``risk_score`` supersedes the descriptor's ``risk`` (prototype: "when present, the BSDS
        risk score supersedes descriptor risk for decision gating"). UNSPECIFIED bands/classes → None.
        """
        risk: float | None = None
        quarantine_only = False
        hazard: int | None = None
        handling: int | None = None
        if blueprint is not None:
            descriptor = blueprint.descriptor
            risk = float(descriptor.risk)
            quarantine_only = bool(descriptor.quarantine_only)
            bsds = blueprint.bsds
            if bsds is not None:
                risk = float(bsds.risk_score)
                hazard = int(bsds.hazard_band) or None
                handling = int(bsds.handling_class) or None
        return cls(
            command_type=command_type,
            policy_risk_score=policy_risk_score,
            conservative_mode=conservative_mode,
            blueprint_risk=risk,
            blueprint_quarantine_only=quarantine_only,
            bsds_hazard_band=hazard,
            bsds_handling_class=handling,
            loss_delta=loss_delta,
            training_metrics=dict(training_metrics or {}),
            global_step=global_step,
            germinate_min_remaining_steps=germinate_min_remaining_steps,
        )

    def metric(self, name: str) -> float | None:
        """A step training metric, or ``None`` when the trainer did not send it."""
        value = self.training_metrics.get(name)
        return None if value is None else float(value)

    def effective_loss_delta(self) -> float | None:
        return self.loss_delta if self.loss_delta is not None else self.metric(METRIC_LOSS_DELTA)


@dataclass(frozen=True, slots=True)
class RiskFinding:
    """One breached signal: its reason code, what it demands, its telemetry level and the evidence."""

    code: str
    effect: RiskEffect
    level: int
    signal: str
    value: float
    threshold: float
    detail: str

    @property
    def pauses(self) -> bool:
        return self.effect != "downgrade_to_optimizer"

    @property
    def enters_conservative(self) -> bool:
        return self.effect == "pause_conservative"

    def attributes(self) -> dict[str, str]:
        """Event attributes: the signal, measured value, threshold and effect."""
        return {
            "signal": self.signal,
            "value": _fmt(self.value),
            "threshold": _fmt(self.threshold),
            "effect": self.effect,
        }


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _finding(code: str, signal: str, value: float, threshold: float, detail: str) -> RiskFinding:
    effect, level = REASON_CODES[code]
    return RiskFinding(
        code=code, effect=effect, level=level, signal=signal, value=value, threshold=threshold, detail=detail
    )


def _above(value: float, threshold: float) -> bool:
    """``value > threshold``, with a non-finite value counted as a breach."""
    return not math.isfinite(value) or value > threshold


def _at_least(value: float, threshold: float) -> bool:
    return not math.isfinite(value) or value >= threshold


def _at_most(value: float, threshold: float) -> bool:
    return not math.isfinite(value) or value <= threshold


def _metric_above(inputs: RiskInputs, name: str, threshold: float, code: str, what: str) -> RiskFinding | None:
    value = inputs.metric(name)
    if value is None or not _above(value, threshold):
        return None
    return _finding(code, name, value, threshold, f"{what} {_fmt(value)} > {_fmt(threshold)}")


# --- Evaluators, in the prototype's order -------------------------------------------------------


def evaluate_policy_risk(inputs: RiskInputs) -> RiskFinding | None:
    score = inputs.policy_risk_score
    if score is None:
        return None
    if _at_least(score, POLICY_RISK_CRITICAL):
        detail = f"policy risk score {_fmt(score)} >= {_fmt(POLICY_RISK_CRITICAL)}"
        return _finding(CODE_POLICY_RISK_CRITICAL, "policy_risk_score", score, POLICY_RISK_CRITICAL, detail)
    if score >= POLICY_RISK_ELEVATED:
        detail = f"policy risk score {_fmt(score)} >= {_fmt(POLICY_RISK_ELEVATED)}"
        return _finding(CODE_POLICY_RISK_ELEVATED, "policy_risk_score", score, POLICY_RISK_ELEVATED, detail)
    return None


def evaluate_conservative_mode(inputs: RiskInputs) -> RiskFinding | None:
    if not inputs.conservative_mode:
        return None
    return _finding(CODE_PAUSE_TRIGGERED, "conservative_mode", 1.0, 1.0, "conservative mode is active")


def evaluate_blueprint_risk(inputs: RiskInputs) -> RiskFinding | None:
    if inputs.blueprint_quarantine_only:
        return _finding(CODE_BP_QUARANTINE, "blueprint.quarantine_only", 1.0, 1.0, "blueprint is quarantine_only")
    risk = inputs.blueprint_risk
    if risk is None:
        return None
    if _at_least(risk, BLUEPRINT_RISK_QUARANTINE):
        detail = f"blueprint risk {_fmt(risk)} >= {_fmt(BLUEPRINT_RISK_QUARANTINE)}"
        return _finding(CODE_BP_QUARANTINE, "blueprint.risk", risk, BLUEPRINT_RISK_QUARANTINE, detail)
    if risk >= BLUEPRINT_RISK_ELEVATED:
        detail = f"blueprint risk {_fmt(risk)} >= {_fmt(BLUEPRINT_RISK_ELEVATED)}"
        return _finding(CODE_BLUEPRINT_RISK, "blueprint.risk", risk, BLUEPRINT_RISK_ELEVATED, detail)
    return None


def evaluate_bsds_handling(inputs: RiskInputs) -> RiskFinding | None:
    if inputs.bsds_handling_class != pb.HANDLING_CLASS_QUARANTINE:
        return None
    quarantine = float(pb.HANDLING_CLASS_QUARANTINE)
    return _finding(
        CODE_BSDS_HANDLING_QUARANTINE, "bsds.handling_class", quarantine, quarantine, "BSDS handling class QUARANTINE"
    )


def evaluate_bsds_hazard(inputs: RiskInputs) -> RiskFinding | None:
    band = inputs.bsds_hazard_band
    if band is None:
        return None
    if band >= pb.HAZARD_BAND_CRITICAL:
        critical = float(pb.HAZARD_BAND_CRITICAL)
        return _finding(CODE_BSDS_HAZARD_CRITICAL, "bsds.hazard_band", float(band), critical, "BSDS hazard CRITICAL")
    if band == pb.HAZARD_BAND_HIGH:
        high = float(pb.HAZARD_BAND_HIGH)
        return _finding(CODE_BSDS_HAZARD_HIGH, "bsds.hazard_band", float(band), high, "BSDS hazard HIGH")
    return None


def evaluate_loss_delta(inputs: RiskInputs) -> RiskFinding | None:
    delta = inputs.effective_loss_delta()
    if delta is None:
        return None
    if _above(delta, LOSS_SPIKE_DELTA):
        detail = f"loss delta {_fmt(delta)} > {_fmt(LOSS_SPIKE_DELTA)}"
        return _finding(CODE_LOSS_SPIKE, METRIC_LOSS_DELTA, delta, LOSS_SPIKE_DELTA, detail)
    if delta > LOSS_WARNING_DELTA:
        detail = f"loss delta {_fmt(delta)} > {_fmt(LOSS_WARNING_DELTA)}"
        return _finding(CODE_LOSS_WARNING, METRIC_LOSS_DELTA, delta, LOSS_WARNING_DELTA, detail)
    return None


def evaluate_hook_latency(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(inputs, METRIC_HOOK_LATENCY_MS, HOOK_BUDGET_MS, CODE_HOOK_BUDGET, "hook latency ms")


def evaluate_step_latency(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(
        inputs, METRIC_STEP_LATENCY_MS, STEP_LATENCY_HIGH_MS, CODE_STEP_LATENCY_HIGH, "step latency ms"
    )


def evaluate_kasmina_apply(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(
        inputs, METRIC_KASMINA_APPLY_MS, KASMINA_APPLY_SLOW_MS, CODE_KASMINA_APPLY_SLOW, "kasmina apply ms"
    )


def evaluate_kasmina_finalize(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(
        inputs, METRIC_KASMINA_FINALIZE_MS, KASMINA_FINALIZE_SLOW_MS, CODE_KASMINA_FINALIZE_SLOW, "kasmina finalize ms"
    )


def evaluate_isolation(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(
        inputs, METRIC_ISOLATION_VIOLATIONS, ISOLATION_VIOLATIONS_MAX, CODE_ISOLATION_VIOLATIONS, "isolation violations"
    )


def evaluate_loss_volatility(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(
        inputs, METRIC_LOSS_VOLATILITY, LOSS_VOLATILITY_HIGH, CODE_LOSS_VOLATILITY_HIGH, "loss volatility"
    )


def evaluate_grad_variance(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(inputs, METRIC_GRAD_VAR, GRAD_VAR_HIGH, CODE_GRAD_VARIANCE_HIGH, "gradient variance")


def evaluate_grad_conflict(inputs: RiskInputs) -> RiskFinding | None:
    return _metric_above(
        inputs, METRIC_GRAD_CONFLICT_RATE, GRAD_CONFLICT_RATE_HIGH, CODE_GRAD_CONFLICT_HIGH, "gradient conflict rate"
    )


def evaluate_device_pressure(inputs: RiskInputs) -> RiskFinding | None:
    util = inputs.metric(METRIC_GPU_UTIL_PERCENT)
    free_gb = inputs.metric(METRIC_GPU_MEM_FREE_GB)
    if util is None or free_gb is None:
        return None
    if not (_at_least(util, GPU_UTIL_PRESSURE_PERCENT) and _at_most(free_gb, GPU_MEM_FREE_PRESSURE_GB)):
        return None
    detail = (
        f"GPU util {_fmt(util)}% >= {_fmt(GPU_UTIL_PRESSURE_PERCENT)}% with "
        f"{_fmt(free_gb)} GB free <= {_fmt(GPU_MEM_FREE_PRESSURE_GB)} GB"
    )
    return _finding(CODE_DEVICE_PRESSURE_HIGH, METRIC_GPU_UTIL_PERCENT, util, GPU_UTIL_PRESSURE_PERCENT, detail)


def evaluate_cpu_pressure(inputs: RiskInputs) -> RiskFinding | None:
    util = inputs.metric(METRIC_CPU_UTIL_PERCENT)
    if util is None or not _at_least(util, CPU_UTIL_PRESSURE_PERCENT):
        return None
    detail = f"CPU util {_fmt(util)}% >= {_fmt(CPU_UTIL_PRESSURE_PERCENT)}%"
    return _finding(CODE_CPU_PRESSURE_HIGH, METRIC_CPU_UTIL_PERCENT, util, CPU_UTIL_PRESSURE_PERCENT, detail)


def evaluate_run_ending(inputs: RiskInputs) -> RiskFinding | None:
    """A SEED command (Tamiyo's policies only germinate) with fewer steps left in the run than a seed
    needs to get through its lifecycle: it would end the run mid-blend, its half-trained output mixed
    into the host's at the final validation. Measured over nine experiments' replay stores: runs whose
    last germination came 25-50 steps before the end lost 11 points of validation accuracy in the last
    epoch on average (8 of 25 lost more than 5); germinated earlier, +0.5 to +8."""
    if inputs.command_type != pb.COMMAND_SEED or inputs.germinate_min_remaining_steps <= 0:
        return None
    total = inputs.metric(METRIC_STEPS_TOTAL)
    if total is None or inputs.global_step is None:
        return None
    remaining = total - inputs.global_step
    need = float(inputs.germinate_min_remaining_steps)
    if remaining >= need:
        return None
    detail = f"{_fmt(remaining)} steps left in the run < {_fmt(need)} a seed needs to finish"
    return _finding(CODE_GERMINATE_TOO_LATE, "steps_remaining", remaining, need, detail)


Evaluator = Callable[[RiskInputs], RiskFinding | None]

EVALUATORS: Final[tuple[Evaluator, ...]] = (
    evaluate_policy_risk,
    evaluate_conservative_mode,
    evaluate_blueprint_risk,
    evaluate_bsds_handling,
    evaluate_bsds_hazard,
    evaluate_loss_delta,
    evaluate_hook_latency,
    evaluate_step_latency,
    evaluate_kasmina_apply,
    evaluate_kasmina_finalize,
    evaluate_isolation,
    evaluate_loss_volatility,
    evaluate_grad_variance,
    evaluate_grad_conflict,
    evaluate_device_pressure,
    evaluate_cpu_pressure,
    evaluate_run_ending,
)
"""The evaluators in the prototype's order (REFERENCE_PROTOTYPE §6.4), then ours."""


# --- Combination ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RiskVerdict:
    """The engine's answer: the command type to issue, every finding, and the conservative-mode ask.

    ``reason`` explains a changed or confirmed command: the most severe pausing finding when the
    result is PAUSE (pause_conservative before pause, then evaluator order), the first downgrade
    finding when a SEED was downgraded, else ``None`` (the policy's own choice stands).
    """

    proposed_command_type: int
    command_type: int
    findings: tuple[RiskFinding, ...]
    reason: str | None
    enter_conservative: bool
    conservative_reason: str | None

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(f.code for f in self.findings)

    @property
    def paused(self) -> bool:
        """The engine turned (or kept) the command PAUSE because of a finding."""
        return self.command_type == pb.COMMAND_PAUSE and any(f.pauses for f in self.findings)

    @property
    def downgraded(self) -> bool:
        return self.proposed_command_type == pb.COMMAND_SEED and self.command_type == pb.COMMAND_OPTIMIZER


def _combine(proposed: int, findings: tuple[RiskFinding, ...]) -> tuple[int, str | None]:
    pausing = [f for f in findings if f.pauses]
    downgrades = [f for f in findings if not f.pauses]
    if proposed in _UNTOUCHABLE_COMMANDS:
        return proposed, None
    if pausing:
        strongest = max(pausing, key=lambda f: _EFFECT_RANK[f.effect])  # max keeps the first of equals
        return pb.COMMAND_PAUSE, strongest.code
    if downgrades and proposed == pb.COMMAND_SEED:
        return pb.COMMAND_OPTIMIZER, downgrades[0].code
    return proposed, None


def evaluate(inputs: RiskInputs, evaluators: tuple[Evaluator, ...] = EVALUATORS) -> RiskVerdict:
    """Run every evaluator in order, keep all findings, and combine them into a verdict."""
    findings = tuple(f for f in (evaluator(inputs) for evaluator in evaluators) if f is not None)
    command_type, reason = _combine(inputs.command_type, findings)
    conservative = next((f.code for f in findings if f.enters_conservative), None)
    return RiskVerdict(
        proposed_command_type=inputs.command_type,
        command_type=command_type,
        findings=findings,
        reason=reason,
        enter_conservative=conservative is not None,
        conservative_reason=conservative,
    )
