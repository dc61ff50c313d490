"""Risk engine: every evaluator at, just below and just above its thresholds; order and combination."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from esper.leyline import pb
from esper.tamiyo import risk
from esper.tamiyo.risk import (
    EVALUATORS,
    REASON_CODES,
    Evaluator,
    RiskFinding,
    RiskInputs,
    evaluate,
)

SEED, OPTIMIZER, PAUSE = pb.COMMAND_SEED, pb.COMMAND_OPTIMIZER, pb.COMMAND_PAUSE
NAN = math.nan


def _m(**metrics: float) -> RiskInputs:
    """SEED inputs carrying the given step training metrics (dots spelled as double underscores)."""
    return RiskInputs(command_type=SEED, training_metrics={k.replace("__", "."): v for k, v in metrics.items()})


def _r(**fields: object) -> RiskInputs:
    return RiskInputs(command_type=SEED, **fields)  # type: ignore[arg-type]


def _late(*, step: int | None, need: int = 75, total: float | None = 368.0, command: int = SEED) -> RiskInputs:
    metrics = {} if total is None else {"steps_total": total}
    return RiskInputs(command_type=command, training_metrics=metrics, global_step=step,
                      germinate_min_remaining_steps=need)


# (evaluator, inputs, expected reason code or None)
CASES: list[tuple[Evaluator, RiskInputs, str | None]] = [
    # policy risk: >= 0.85 downgrade, >= 0.98 pause + conservative
    (risk.evaluate_policy_risk, _r(), None),
    (risk.evaluate_policy_risk, _r(policy_risk_score=0.8499), None),
    (risk.evaluate_policy_risk, _r(policy_risk_score=0.85), "policy_risk_elevated"),
    (risk.evaluate_policy_risk, _r(policy_risk_score=0.8501), "policy_risk_elevated"),
    (risk.evaluate_policy_risk, _r(policy_risk_score=0.9799), "policy_risk_elevated"),
    (risk.evaluate_policy_risk, _r(policy_risk_score=0.98), "policy_risk_critical"),
    (risk.evaluate_policy_risk, _r(policy_risk_score=0.9801), "policy_risk_critical"),
    (risk.evaluate_policy_risk, _r(policy_risk_score=NAN), "policy_risk_critical"),
    # conservative mode
    (risk.evaluate_conservative_mode, _r(conservative_mode=False), None),
    (risk.evaluate_conservative_mode, _r(conservative_mode=True), "pause_triggered"),
    # blueprint: >= 0.5 downgrade, >= 0.8 or quarantine_only → quarantine
    (risk.evaluate_blueprint_risk, _r(), None),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.4999), None),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.5), "blueprint_risk"),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.5001), "blueprint_risk"),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.7999), "blueprint_risk"),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.8), "bp_quarantine"),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.8001), "bp_quarantine"),
    (risk.evaluate_blueprint_risk, _r(blueprint_risk=0.0, blueprint_quarantine_only=True), "bp_quarantine"),
    (risk.evaluate_blueprint_risk, _r(blueprint_quarantine_only=True), "bp_quarantine"),
    # BSDS handling class
    (risk.evaluate_bsds_handling, _r(), None),
    (risk.evaluate_bsds_handling, _r(bsds_handling_class=pb.HANDLING_CLASS_STANDARD), None),
    (risk.evaluate_bsds_handling, _r(bsds_handling_class=pb.HANDLING_CLASS_RESTRICTED), None),
    (risk.evaluate_bsds_handling, _r(bsds_handling_class=pb.HANDLING_CLASS_QUARANTINE), "bsds_handling_quarantine"),
    # BSDS hazard band
    (risk.evaluate_bsds_hazard, _r(), None),
    (risk.evaluate_bsds_hazard, _r(bsds_hazard_band=pb.HAZARD_BAND_LOW), None),
    (risk.evaluate_bsds_hazard, _r(bsds_hazard_band=pb.HAZARD_BAND_MEDIUM), None),
    (risk.evaluate_bsds_hazard, _r(bsds_hazard_band=pb.HAZARD_BAND_HIGH), "bsds_hazard_high"),
    (risk.evaluate_bsds_hazard, _r(bsds_hazard_band=pb.HAZARD_BAND_CRITICAL), "bsds_hazard_critical"),
    # loss delta: > 0.075 downgrade, > 0.15 pause + conservative
    (risk.evaluate_loss_delta, _m(), None),
    (risk.evaluate_loss_delta, _m(loss_delta=-0.5), None),
    (risk.evaluate_loss_delta, _m(loss_delta=0.0749), None),
    (risk.evaluate_loss_delta, _m(loss_delta=0.075), None),
    (risk.evaluate_loss_delta, _m(loss_delta=0.0751), "loss_warning"),
    (risk.evaluate_loss_delta, _m(loss_delta=0.15), "loss_warning"),
    (risk.evaluate_loss_delta, _m(loss_delta=0.1501), "loss_spike"),
    (risk.evaluate_loss_delta, _m(loss_delta=NAN), "loss_spike"),
    (risk.evaluate_loss_delta, _m(loss_delta=math.inf), "loss_spike"),
    (risk.evaluate_loss_delta, _r(loss_delta=0.2, training_metrics={"loss_delta": 0.0}), "loss_spike"),
    (risk.evaluate_loss_delta, _r(loss_delta=0.0, training_metrics={"loss_delta": 0.2}), None),
    # hook latency > 50 ms pause
    (risk.evaluate_hook_latency, _m(), None),
    (risk.evaluate_hook_latency, _m(hook_latency_ms=49.99), None),
    (risk.evaluate_hook_latency, _m(hook_latency_ms=50.0), None),
    (risk.evaluate_hook_latency, _m(hook_latency_ms=50.01), "hook_budget"),
    # step latency > 120 ms pause
    (risk.evaluate_step_latency, _m(step_latency_ms=119.99), None),
    (risk.evaluate_step_latency, _m(step_latency_ms=120.0), None),
    (risk.evaluate_step_latency, _m(step_latency_ms=120.01), "step_latency_high"),
    # Kasmina apply / finalize > 30 ms downgrade
    (risk.evaluate_kasmina_apply, _m(kasmina__apply_ms=29.99), None),
    (risk.evaluate_kasmina_apply, _m(kasmina__apply_ms=30.0), None),
    (risk.evaluate_kasmina_apply, _m(kasmina__apply_ms=30.01), "kasmina_apply_slow"),
    (risk.evaluate_kasmina_finalize, _m(kasmina__finalize_ms=29.99), None),
    (risk.evaluate_kasmina_finalize, _m(kasmina__finalize_ms=30.0), None),
    (risk.evaluate_kasmina_finalize, _m(kasmina__finalize_ms=30.01), "kasmina_finalize_slow"),
    # isolation violations > 0 pause
    (risk.evaluate_isolation, _m(), None),
    (risk.evaluate_isolation, _m(kasmina__isolation__violations=0.0), None),
    (risk.evaluate_isolation, _m(kasmina__isolation__violations=1.0), "isolation_violations"),
    (risk.evaluate_isolation, _m(kasmina__isolation__violations=7.0), "isolation_violations"),
    # drift: loss_volatility > 0.1125, grad_var > 1, grad_conflict_rate > 0.5 → downgrade
    (risk.evaluate_loss_volatility, _m(loss_volatility=0.1124), None),
    (risk.evaluate_loss_volatility, _m(loss_volatility=0.1125), None),
    (risk.evaluate_loss_volatility, _m(loss_volatility=0.1126), "loss_volatility_high"),
    (risk.evaluate_grad_variance, _m(grad_var=0.99), None),
    (risk.evaluate_grad_variance, _m(grad_var=1.0), None),
    (risk.evaluate_grad_variance, _m(grad_var=1.01), "grad_variance_high"),
    (risk.evaluate_grad_conflict, _m(grad_conflict_rate=0.49), None),
    (risk.evaluate_grad_conflict, _m(grad_conflict_rate=0.5), None),
    (risk.evaluate_grad_conflict, _m(grad_conflict_rate=0.51), "grad_conflict_high"),
    # GPU: util >= 95 % with free memory <= 0.2 GB → pause (both needed)
    (risk.evaluate_device_pressure, _m(gpu_util_percent=99.0), None),
    (risk.evaluate_device_pressure, _m(gpu_mem_free_gb=0.0), None),
    (risk.evaluate_device_pressure, _m(gpu_util_percent=94.99, gpu_mem_free_gb=0.1), None),
    (risk.evaluate_device_pressure, _m(gpu_util_percent=95.0, gpu_mem_free_gb=0.2), "device_pressure_high"),
    (risk.evaluate_device_pressure, _m(gpu_util_percent=95.01, gpu_mem_free_gb=0.19), "device_pressure_high"),
    (risk.evaluate_device_pressure, _m(gpu_util_percent=99.0, gpu_mem_free_gb=0.21), None),
    (risk.evaluate_device_pressure, _m(gpu_util_percent=NAN, gpu_mem_free_gb=0.1), "device_pressure_high"),
    # CPU util >= 95 % → downgrade
    (risk.evaluate_cpu_pressure, _m(), None),
    (risk.evaluate_cpu_pressure, _m(cpu_util_percent=94.99), None),
    (risk.evaluate_cpu_pressure, _m(cpu_util_percent=95.0), "cpu_pressure_high"),
    (risk.evaluate_cpu_pressure, _m(cpu_util_percent=95.01), "cpu_pressure_high"),
    # a SEED with fewer than germinate_min_remaining_steps left in the run → pause (INFO)
    (risk.evaluate_run_ending, _late(step=293), None),  # exactly 75 left
    (risk.evaluate_run_ending, _late(step=294), "germinate_too_late"),
    (risk.evaluate_run_ending, _late(step=368), "germinate_too_late"),
    (risk.evaluate_run_ending, _late(step=294, need=0), None),  # turned off
    (risk.evaluate_run_ending, _late(step=294, command=OPTIMIZER), None),  # only growing waits on the run
    (risk.evaluate_run_ending, _late(step=294, total=None), None),  # a trainer that does not say
    (risk.evaluate_run_ending, _late(step=None), None),
]


@pytest.mark.parametrize(
    ("evaluator", "inputs", "expected"),
    CASES,
    ids=[f"{e.__name__}-{i}-{x}" for i, (e, _, x) in enumerate(CASES)],
)
def test_evaluator_thresholds(evaluator: Evaluator, inputs: RiskInputs, expected: str | None) -> None:
    finding = evaluator(inputs)
    if expected is None:
        assert finding is None
        return
    assert finding is not None
    assert finding.code == expected
    effect, level = REASON_CODES[expected]
    assert (finding.effect, finding.level) == (effect, level)
    assert finding.detail  # human text with the measurement


def test_every_reason_code_is_reachable() -> None:
    assert {code for _, _, code in CASES if code} == set(REASON_CODES)


def test_thresholds_are_the_prototypes() -> None:
    assert (risk.POLICY_RISK_CRITICAL, risk.POLICY_RISK_ELEVATED) == (0.98, 0.85)
    assert (risk.BLUEPRINT_RISK_QUARANTINE, risk.BLUEPRINT_RISK_ELEVATED) == (0.8, 0.5)
    assert (risk.LOSS_SPIKE_DELTA, risk.LOSS_WARNING_DELTA) == (0.15, 0.075)
    assert (risk.HOOK_BUDGET_MS, risk.STEP_LATENCY_HIGH_MS) == (50.0, 120.0)
    assert (risk.KASMINA_APPLY_SLOW_MS, risk.KASMINA_FINALIZE_SLOW_MS, risk.ISOLATION_VIOLATIONS_MAX) == (30, 30, 0)
    assert (risk.LOSS_VOLATILITY_HIGH, risk.GRAD_VAR_HIGH, risk.GRAD_CONFLICT_RATE_HIGH) == (0.1125, 1.0, 0.5)
    assert (risk.GPU_UTIL_PRESSURE_PERCENT, risk.GPU_MEM_FREE_PRESSURE_GB, risk.CPU_UTIL_PRESSURE_PERCENT) == (
        95.0,
        0.2,
        95.0,
    )


def test_levels_critical_for_conservative_findings_except_loss_spike() -> None:
    critical = {c for c, (_, lvl) in REASON_CODES.items() if lvl == pb.TELEMETRY_LEVEL_CRITICAL}
    conservative = {c for c, (eff, _) in REASON_CODES.items() if eff == "pause_conservative"}
    assert critical == conservative - {"loss_spike"}
    assert REASON_CODES["loss_spike"] == ("pause_conservative", pb.TELEMETRY_LEVEL_WARNING)


def test_finding_detail_and_attributes_carry_value_and_threshold() -> None:
    finding = risk.evaluate_hook_latency(_m(hook_latency_ms=61.5))
    assert finding == RiskFinding(
        code="hook_budget",
        effect="pause",
        level=pb.TELEMETRY_LEVEL_WARNING,
        signal="hook_latency_ms",
        value=61.5,
        threshold=50.0,
        detail="hook latency ms 61.5 > 50",
    )
    assert finding.attributes() == {"signal": "hook_latency_ms", "value": "61.5", "threshold": "50", "effect": "pause"}
    assert finding.pauses and not finding.enters_conservative


def test_evaluators_run_in_the_prototypes_order_then_ours() -> None:
    assert [e.__name__.removeprefix("evaluate_") for e in EVALUATORS] == [
        "policy_risk",
        "conservative_mode",
        "blueprint_risk",
        "bsds_handling",
        "bsds_hazard",
        "loss_delta",
        "hook_latency",
        "step_latency",
        "kasmina_apply",
        "kasmina_finalize",
        "isolation",
        "loss_volatility",
        "grad_variance",
        "grad_conflict",
        "device_pressure",
        "cpu_pressure",
        "run_ending",  # not the prototype's
    ]


# --- combination -----------------------------------------------------------------------------------


def test_no_findings_leaves_the_command_alone() -> None:
    verdict = evaluate(_m(loss_delta=0.01, hook_latency_ms=3.0))
    assert (verdict.command_type, verdict.reason, verdict.findings) == (SEED, None, ())
    assert not (verdict.paused or verdict.downgraded or verdict.enter_conservative)


def test_downgrade_turns_seed_into_optimizer_with_first_reason() -> None:
    verdict = evaluate(_m(cpu_util_percent=99.0, grad_var=2.0))
    assert verdict.command_type == OPTIMIZER
    assert verdict.codes == ("grad_variance_high", "cpu_pressure_high")
    assert verdict.reason == "grad_variance_high"
    assert verdict.downgraded and not verdict.paused and not verdict.enter_conservative


@pytest.mark.parametrize("proposed", [OPTIMIZER, PAUSE, pb.COMMAND_CIRCUIT_BREAKER])
def test_downgrade_only_applies_to_seed(proposed: int) -> None:
    verdict = evaluate(RiskInputs(command_type=proposed, training_metrics={"cpu_util_percent": 99.0}))
    assert verdict.command_type == proposed
    assert verdict.reason is None
    assert verdict.codes == ("cpu_pressure_high",)  # still reported


def test_pause_beats_downgrade_and_all_findings_are_kept() -> None:
    verdict = evaluate(_m(cpu_util_percent=99.0, kasmina__apply_ms=40.0, hook_latency_ms=60.0, step_latency_ms=200.0))
    assert verdict.command_type == PAUSE
    assert verdict.codes == ("hook_budget", "step_latency_high", "kasmina_apply_slow", "cpu_pressure_high")
    assert verdict.reason == "hook_budget"
    assert verdict.paused and not verdict.downgraded and not verdict.enter_conservative


@pytest.mark.parametrize("proposed", [SEED, OPTIMIZER, pb.COMMAND_CIRCUIT_BREAKER, PAUSE])
def test_pause_applies_to_any_policy_command(proposed: int) -> None:
    verdict = evaluate(RiskInputs(command_type=proposed, training_metrics={"kasmina.isolation.violations": 1.0}))
    assert verdict.command_type == PAUSE
    assert verdict.reason == "isolation_violations"


@pytest.mark.parametrize("proposed", [pb.COMMAND_ROLLBACK, pb.COMMAND_EMERGENCY])
def test_safety_commands_are_never_replaced(proposed: int) -> None:
    verdict = evaluate(RiskInputs(command_type=proposed, policy_risk_score=0.99, training_metrics={"grad_var": 5.0}))
    assert verdict.command_type == proposed
    assert verdict.reason is None
    assert verdict.codes == ("policy_risk_critical", "grad_variance_high")
    assert verdict.enter_conservative


def test_conservative_pause_outranks_an_earlier_plain_pause() -> None:
    verdict = evaluate(_r(conservative_mode=True, training_metrics={"loss_delta": 0.3, "hook_latency_ms": 70.0}))
    assert verdict.codes == ("pause_triggered", "loss_spike", "hook_budget")
    assert verdict.reason == "loss_spike"
    assert verdict.enter_conservative and verdict.conservative_reason == "loss_spike"


def test_first_conservative_finding_names_the_reason() -> None:
    verdict = evaluate(_r(policy_risk_score=0.99, blueprint_risk=0.9, bsds_hazard_band=pb.HAZARD_BAND_CRITICAL))
    assert verdict.codes == ("policy_risk_critical", "bp_quarantine", "bsds_hazard_critical")
    assert (verdict.reason, verdict.conservative_reason) == ("policy_risk_critical", "policy_risk_critical")


def test_conservative_mode_alone_pauses_without_reentering() -> None:
    verdict = evaluate(_r(conservative_mode=True))
    assert (verdict.command_type, verdict.reason, verdict.enter_conservative) == (PAUSE, "pause_triggered", False)


def test_custom_evaluator_tuple() -> None:
    verdict = evaluate(_m(hook_latency_ms=99.0, cpu_util_percent=99.0), (risk.evaluate_cpu_pressure,))
    assert (verdict.command_type, verdict.codes) == (OPTIMIZER, ("cpu_pressure_high",))


# --- inputs from blueprint metadata -----------------------------------------------------------------


@dataclass(frozen=True)
class _Blueprint:
    descriptor: pb.BlueprintDescriptor
    bsds: pb.BSDS | None = None


def test_from_blueprint_uses_descriptor() -> None:
    bp = _Blueprint(pb.BlueprintDescriptor(blueprint_id="bp-1", risk=0.6, quarantine_only=True))
    inputs = RiskInputs.from_blueprint(bp, command_type=SEED, policy_risk_score=0.1, training_metrics={"grad_var": 2})
    assert inputs.blueprint_risk == pytest.approx(0.6)
    assert inputs.blueprint_quarantine_only
    assert (inputs.bsds_hazard_band, inputs.bsds_handling_class) == (None, None)
    assert inputs.metric("grad_var") == 2.0 and inputs.metric("absent") is None


def test_from_blueprint_bsds_risk_supersedes_descriptor() -> None:
    bsds = pb.BSDS(risk_score=0.85, hazard_band=pb.HAZARD_BAND_HIGH, handling_class=pb.HANDLING_CLASS_QUARANTINE)
    bp = _Blueprint(pb.BlueprintDescriptor(risk=0.1), bsds)
    inputs = RiskInputs.from_blueprint(bp, command_type=SEED)
    assert inputs.blueprint_risk == pytest.approx(0.85)
    assert (inputs.bsds_hazard_band, inputs.bsds_handling_class) == (
        pb.HAZARD_BAND_HIGH,
        pb.HANDLING_CLASS_QUARANTINE,
    )
    assert evaluate(inputs).codes == ("bp_quarantine", "bsds_handling_quarantine", "bsds_hazard_high")


def test_from_blueprint_unspecified_bsds_fields_are_absent() -> None:
    inputs = RiskInputs.from_blueprint(_Blueprint(pb.BlueprintDescriptor(), pb.BSDS()), command_type=SEED)
    assert (inputs.bsds_hazard_band, inputs.bsds_handling_class) == (None, None)


def test_from_no_blueprint() -> None:
    inputs = RiskInputs.from_blueprint(None, command_type=OPTIMIZER, conservative_mode=True, loss_delta=0.2)
    assert (inputs.blueprint_risk, inputs.blueprint_quarantine_only, inputs.effective_loss_delta()) == (
        None,
        False,
        0.2,
    )
    assert inputs.conservative_mode
