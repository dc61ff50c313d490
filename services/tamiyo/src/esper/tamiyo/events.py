"""Tamiyo's decision telemetry: event → priority table, degraded-inputs rule, health, per-decision packet.

Priority is core's rule (:func:`esper.core.telemetry.event_priority`): a CRITICAL event → CRITICAL; a
WARNING/ERROR event on the HIGH list (REFERENCE_PROTOTYPE §6.4) → HIGH; anything else NORMAL. HIGH and
CRITICAL packets ride the emergency lane. :data:`DECISION_EVENT_PRIORITIES` spells the table out for
every event Tamiyo emits per decision so that a change to either side shows up in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from esper.core.telemetry import (
    build_event,
    build_metric,
    build_telemetry_packet,
    event_name,
    event_priority,
)
from esper.leyline import pb
from esper.tamiyo.conservative import EVENT_CONSERVATIVE_ENTERED, EVENT_CONSERVATIVE_EXITED, ConservativeTransition
from esper.tamiyo.risk import RiskFinding, RiskVerdict

__all__ = [
    "DECISION_EVENT_PRIORITIES",
    "DEFAULT_REASON",
    "DEGRADED_INPUTS_CRITICAL_COVERAGE",
    "DEGRADED_INPUTS_INFO_COVERAGE",
    "EVENT_DEGRADED_INPUTS",
    "EVENT_TIMEOUT_INFERENCE",
    "EVENT_TIMEOUT_URZA",
    "SOURCE",
    "DecisionSnapshot",
    "average_coverage",
    "decision_event_priority",
    "decision_health",
    "decision_priority",
    "decision_telemetry",
    "degraded_inputs_event",
    "degraded_inputs_level",
    "finding_event",
]

SOURCE: Final = "tamiyo"
DEFAULT_REASON: Final = "policy"
"""``reason`` indicator when nothing overrode the policy's own choice (prototype ``risk_reason``)."""

EVENT_TIMEOUT_INFERENCE: Final = "timeout_inference"
EVENT_TIMEOUT_URZA: Final = "timeout_urza"
EVENT_DEGRADED_INPUTS: Final = "degraded_inputs"

DEGRADED_INPUTS_CRITICAL_COVERAGE: Final[float] = 0.10  # average coverage <= → CRITICAL degraded_inputs
DEGRADED_INPUTS_INFO_COVERAGE: Final[float] = 0.30  # average coverage < → INFO degraded_inputs

_INFO: Final[int] = pb.TELEMETRY_LEVEL_INFO
_WARNING: Final[int] = pb.TELEMETRY_LEVEL_WARNING
_CRITICAL: Final[int] = pb.TELEMETRY_LEVEL_CRITICAL
_P_NORMAL: Final[int] = pb.MESSAGE_PRIORITY_NORMAL
_P_HIGH: Final[int] = pb.MESSAGE_PRIORITY_HIGH
_P_CRITICAL: Final[int] = pb.MESSAGE_PRIORITY_CRITICAL

DECISION_EVENT_PRIORITIES: Final[Mapping[tuple[str, int], int]] = {
    # CRITICAL events → CRITICAL.
    ("policy_risk_critical", _CRITICAL): _P_CRITICAL,
    ("bp_quarantine", _CRITICAL): _P_CRITICAL,
    ("bsds_handling_quarantine", _CRITICAL): _P_CRITICAL,
    ("bsds_hazard_critical", _CRITICAL): _P_CRITICAL,
    (EVENT_DEGRADED_INPUTS, _CRITICAL): _P_CRITICAL,
    # WARNING events on the HIGH list → HIGH.
    (EVENT_TIMEOUT_INFERENCE, _WARNING): _P_HIGH,
    (EVENT_TIMEOUT_URZA, _WARNING): _P_HIGH,
    ("loss_spike", _WARNING): _P_HIGH,
    ("hook_budget", _WARNING): _P_HIGH,
    ("step_latency_high", _WARNING): _P_HIGH,
    ("isolation_violations", _WARNING): _P_HIGH,
    ("device_pressure_high", _WARNING): _P_HIGH,
    ("cpu_pressure_high", _WARNING): _P_HIGH,
    # Other WARNING events → NORMAL.
    ("policy_risk_elevated", _WARNING): _P_NORMAL,
    ("pause_triggered", _WARNING): _P_NORMAL,
    ("blueprint_risk", _WARNING): _P_NORMAL,
    ("bsds_hazard_high", _WARNING): _P_NORMAL,
    ("loss_warning", _WARNING): _P_NORMAL,
    ("kasmina_apply_slow", _WARNING): _P_NORMAL,
    ("kasmina_finalize_slow", _WARNING): _P_NORMAL,
    ("loss_volatility_high", _WARNING): _P_NORMAL,
    ("grad_variance_high", _WARNING): _P_NORMAL,
    ("grad_conflict_high", _WARNING): _P_NORMAL,
    (EVENT_CONSERVATIVE_ENTERED, _WARNING): _P_NORMAL,
    # INFO events → NORMAL.
    (EVENT_DEGRADED_INPUTS, _INFO): _P_NORMAL,
    (EVENT_CONSERVATIVE_EXITED, _INFO): _P_NORMAL,
    ("germinate_too_late", _INFO): _P_NORMAL,
}
"""(event name, ``TelemetryLevel``) → ``MessagePriority`` for every event a decision can carry."""


def decision_event_priority(name: str, level: int) -> int:
    """``MessagePriority`` of one decision event: core's :func:`event_priority`, nothing Tamiyo-local."""
    return event_priority(level, name)


def decision_priority(events: Iterable[pb.TelemetryEvent]) -> int:
    """The packet priority: the highest event priority, NORMAL when there are no events."""
    return max((event_priority(e.level, event_name(e)) for e in events), default=_P_NORMAL)


# --- Degraded inputs -------------------------------------------------------------------------------


def average_coverage(coverage: Mapping[str, float]) -> float:
    """Mean feature coverage over every key, missing ones (0.0) included; 0.0 when there are none.

    The prototype averaged only the non-zero entries, which hides exactly the missing features the
    rule is meant to catch.
    """
    if not coverage:
        return 0.0
    values = [float(v) if math.isfinite(v) else 0.0 for v in coverage.values()]
    return sum(values) / len(values)


def degraded_inputs_level(avg_coverage: float) -> int | None:
    """CRITICAL at average coverage <= 0.10, INFO below 0.30, else no event."""
    if not math.isfinite(avg_coverage) or avg_coverage <= DEGRADED_INPUTS_CRITICAL_COVERAGE:
        return _CRITICAL
    if avg_coverage < DEGRADED_INPUTS_INFO_COVERAGE:
        return _INFO
    return None


def degraded_inputs_event(coverage: Mapping[str, float]) -> pb.TelemetryEvent | None:
    """The ``degraded_inputs`` event for a decision's coverage map, or ``None`` when inputs are fine."""
    avg = average_coverage(coverage)
    level = degraded_inputs_level(avg)
    if level is None:
        return None
    missing = sum(1 for v in coverage.values() if not v)
    return build_event(
        EVENT_DEGRADED_INPUTS,
        level=level,
        description=f"average feature coverage {avg:.3f}",
        coverage_avg=f"{avg:.3f}",
        missing_features=missing,
    )


# --- Events, health and the packet ----------------------------------------------------------------


def finding_event(finding: RiskFinding) -> pb.TelemetryEvent:
    """A risk finding as a telemetry event: its code as the name, its detail as the description."""
    return build_event(finding.code, level=finding.level, description=finding.detail, **finding.attributes())


def decision_health(command_type: int, events: Iterable[pb.TelemetryEvent]) -> int:
    """``HealthStatus``: CRITICAL on a CRITICAL event; DEGRADED on PAUSE or a WARNING/ERROR event."""
    levels = {e.level for e in events}
    if _CRITICAL in levels:
        return pb.HEALTH_STATUS_CRITICAL
    if command_type == pb.COMMAND_PAUSE or levels & {_WARNING, pb.TELEMETRY_LEVEL_ERROR}:
        return pb.HEALTH_STATUS_DEGRADED
    return pb.HEALTH_STATUS_HEALTHY


@dataclass(frozen=True, slots=True)
class DecisionSnapshot:
    """The per-decision facts that go into telemetry besides the risk verdict."""

    step_index: int
    policy_version: str
    validation_loss: float
    loss_delta: float
    conservative_mode: bool
    inference_latency_ms: float
    timeout_budget_ms: float
    metadata_timeout_budget_ms: float
    feature_coverage: Mapping[str, float]
    coverage_types: Mapping[str, float] = field(default_factory=dict)
    value_estimate: float | None = None
    risk_score: float | None = None
    risk_index: int | None = None
    compile_enabled: bool = False
    compile_warm_ms: float | None = None
    compile_fallbacks: int = 0
    blueprint_risk: float | None = None
    breaker_states: Mapping[str, int] = field(default_factory=dict)
    breaker_failures: Mapping[str, int] = field(default_factory=dict)
    selection: Mapping[str, float] = field(default_factory=dict)
    training_run_id: str = ""


def _metrics(snapshot: DecisionSnapshot, avg_coverage: float) -> list[pb.MetricPoint]:
    s = snapshot
    metrics = [
        build_metric("tamiyo.validation_loss", s.validation_loss, unit="loss"),
        build_metric("tamiyo.loss_delta", s.loss_delta, unit="loss"),
        build_metric("tamiyo.conservative_mode", 1.0 if s.conservative_mode else 0.0, unit="bool"),
        build_metric("tamiyo.inference.latency_ms", s.inference_latency_ms, unit="ms"),
        build_metric("tamiyo.gnn.compile_enabled", 1.0 if s.compile_enabled else 0.0, unit="bool"),
        build_metric("tamiyo.gnn.compile_fallback_total", float(s.compile_fallbacks), unit="count"),
        build_metric("tamiyo.gnn.feature_coverage", avg_coverage, unit="ratio"),
    ]
    if s.compile_warm_ms is not None:
        metrics.append(build_metric("tamiyo.gnn.compile_warm_ms", s.compile_warm_ms, unit="ms"))
    metrics += [build_metric(f"tamiyo.gnn.feature_coverage.{g}", r, unit="ratio") for g, r in s.coverage_types.items()]
    if s.value_estimate is not None:
        metrics.append(build_metric("tamiyo.policy.value_estimate", s.value_estimate, unit="score"))
    if s.risk_score is not None:
        metrics.append(build_metric("tamiyo.policy.risk_score", s.risk_score, unit="score"))
    if s.risk_index is not None:
        metrics.append(build_metric("tamiyo.policy.risk_index", float(s.risk_index), unit="index"))
    metrics += [build_metric(f"tamiyo.selection.{k}", v) for k, v in s.selection.items()]
    metrics += [build_metric(f"tamiyo.breaker.{n}_state", float(v), unit="state") for n, v in s.breaker_states.items()]
    metrics += [
        build_metric(f"tamiyo.breaker.{n}_failures", float(v), unit="count") for n, v in s.breaker_failures.items()
    ]
    if s.blueprint_risk is not None:
        metrics.append(build_metric("tamiyo.blueprint.risk", s.blueprint_risk, unit="score"))
    return metrics


def _indicators(snapshot: DecisionSnapshot, verdict: RiskVerdict, reason: str, avg: float) -> dict[str, str]:
    s = snapshot
    indicators = {
        "reason": reason,
        "command": pb.CommandType.Name(pb.CommandType.ValueType(verdict.command_type)),
        "step_index": str(s.step_index),
        "policy_version": s.policy_version,
        "timeout_budget_ms": f"{s.timeout_budget_ms:.1f}",
        "metadata_timeout_budget_ms": f"{s.metadata_timeout_budget_ms:.1f}",
        "compile_enabled": "1" if s.compile_enabled else "0",
        "compile_fallbacks": str(s.compile_fallbacks),
        "feature_coverage": f"{avg:.3f}",
        "conservative_mode": "1" if s.conservative_mode else "0",
    }
    if s.training_run_id:
        indicators["training_run_id"] = s.training_run_id
    return indicators


def decision_telemetry(
    snapshot: DecisionSnapshot,
    verdict: RiskVerdict,
    *,
    transitions: Iterable[ConservativeTransition] = (),
    extra_events: Iterable[pb.TelemetryEvent] = (),
) -> pb.TelemetryPacket:
    """One packet per decision: metrics, events (extras, findings, degraded inputs, mode changes),
    health and indicators; ``priority`` is derived from the events by core's rule.

    ``reason`` is the verdict's reason, else ``degraded_inputs`` when coverage is critical, else
    ``policy``.
    """
    avg = average_coverage(snapshot.feature_coverage)
    events = list(extra_events)
    events += [finding_event(f) for f in verdict.findings]
    degraded = degraded_inputs_event(snapshot.feature_coverage)
    if degraded is not None:
        events.append(degraded)
    events += [t.to_event() for t in transitions]

    reason = verdict.reason or DEFAULT_REASON
    if verdict.reason is None and degraded is not None and degraded.level == _CRITICAL:
        reason = EVENT_DEGRADED_INPUTS
    return build_telemetry_packet(
        SOURCE,
        events=events,
        metrics=_metrics(snapshot, avg),
        health_status=decision_health(verdict.command_type, events),
        summary="stable" if reason == DEFAULT_REASON else reason,
        indicators=_indicators(snapshot, verdict, reason, avg),
    )
