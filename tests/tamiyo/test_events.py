"""Decision telemetry: event → priority table, degraded inputs, health, and the per-decision packet."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from esper.core.telemetry import HIGH_PRIORITY_EVENTS, build_event, event_name, packet_priority
from esper.leyline import pb
from esper.tamiyo.conservative import ConservativeTransition
from esper.tamiyo.events import (
    DECISION_EVENT_PRIORITIES,
    DecisionSnapshot,
    average_coverage,
    decision_event_priority,
    decision_health,
    decision_priority,
    decision_telemetry,
    degraded_inputs_event,
    degraded_inputs_level,
    finding_event,
)
from esper.tamiyo.risk import REASON_CODES, RiskInputs, RiskVerdict, evaluate

INFO, WARNING, ERROR, CRITICAL = (
    pb.TELEMETRY_LEVEL_INFO,
    pb.TELEMETRY_LEVEL_WARNING,
    pb.TELEMETRY_LEVEL_ERROR,
    pb.TELEMETRY_LEVEL_CRITICAL,
)
P_NORMAL, P_HIGH, P_CRITICAL = pb.MESSAGE_PRIORITY_NORMAL, pb.MESSAGE_PRIORITY_HIGH, pb.MESSAGE_PRIORITY_CRITICAL

# The prototype's HIGH list (REFERENCE_PROTOTYPE §6.4), written out here as the test oracle that core's
# HIGH_PRIORITY_EVENTS is checked against.
REFERENCE_HIGH_EVENTS = frozenset({
    "timeout_inference", "timeout_urza", "step_latency_high", "loss_spike", "isolation_violations", "hook_budget",
    "policy_risk_critical", "bp_quarantine", "device_pressure_high", "cpu_pressure_high",
})

FULL_COVERAGE = {"global.loss": 1.0, "seed.lr": 1.0}


# --- priority table --------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "expected"), sorted(DECISION_EVENT_PRIORITIES.items()))
def test_table_row_matches_core_rule(row: tuple[str, int], expected: int) -> None:
    name, level = row
    assert decision_event_priority(name, level) == expected


@pytest.mark.parametrize(("code", "effect_level"), sorted(REASON_CODES.items()))
def test_every_reason_code_has_a_row_at_its_level(code: str, effect_level: tuple[str, int]) -> None:
    assert (code, effect_level[1]) in DECISION_EVENT_PRIORITIES


def test_table_follows_reference_rule() -> None:
    for (name, level), priority in DECISION_EVENT_PRIORITIES.items():
        if level == CRITICAL:
            assert priority == P_CRITICAL
        elif level in (WARNING, ERROR) and name in REFERENCE_HIGH_EVENTS:
            assert priority == P_HIGH
        else:
            assert priority == P_NORMAL, name


def test_core_has_every_reference_high_event() -> None:
    assert frozenset() == REFERENCE_HIGH_EVENTS - HIGH_PRIORITY_EVENTS
    assert REFERENCE_HIGH_EVENTS <= HIGH_PRIORITY_EVENTS


@pytest.mark.parametrize("name", sorted(REFERENCE_HIGH_EVENTS))
@pytest.mark.parametrize(("level", "expected"), [(INFO, P_NORMAL), (WARNING, P_HIGH), (ERROR, P_HIGH)])
def test_reference_high_events_by_level(name: str, level: int, expected: int) -> None:
    assert decision_event_priority(name, level) == expected
    assert decision_event_priority(name, CRITICAL) == P_CRITICAL


def test_decision_priority_is_the_max() -> None:
    assert decision_priority([]) == P_NORMAL
    events = [build_event("loss_warning", level=WARNING), build_event("hook_budget", level=WARNING)]
    assert decision_priority(events) == P_HIGH
    assert decision_priority([*events, build_event("degraded_inputs", level=CRITICAL)]) == P_CRITICAL


# --- degraded inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("avg", "level"),
    [
        (0.0, CRITICAL),
        (0.0999, CRITICAL),
        (0.10, CRITICAL),
        (0.1001, INFO),
        (0.2999, INFO),
        (0.30, None),
        (0.3001, None),
        (1.0, None),
        (float("nan"), CRITICAL),
    ],
)
def test_degraded_inputs_levels(avg: float, level: int | None) -> None:
    assert degraded_inputs_level(avg) == level


def test_average_coverage_counts_missing_features() -> None:
    assert average_coverage({}) == 0.0
    assert average_coverage({"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}) == 0.25  # prototype said 1.0
    assert average_coverage({"a": float("nan"), "b": 1.0}) == 0.5


@pytest.mark.parametrize(
    ("coverage", "level"),
    [
        ({}, CRITICAL),
        ({"a": 0.1, "b": 0.1}, CRITICAL),
        ({"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}, INFO),
        ({"a": 0.3}, None),
    ],
)
def test_degraded_inputs_event(coverage: Mapping[str, float], level: int | None) -> None:
    event = degraded_inputs_event(coverage)
    if level is None:
        assert event is None
        return
    assert event is not None
    assert (event_name(event), event.level) == ("degraded_inputs", level)
    assert event.attributes["missing_features"] == str(sum(1 for v in coverage.values() if not v))
    assert float(event.attributes["coverage_avg"]) == pytest.approx(average_coverage(coverage), abs=1e-3)


# --- health ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "levels", "health"),
    [
        (pb.COMMAND_SEED, [], pb.HEALTH_STATUS_HEALTHY),
        (pb.COMMAND_SEED, [INFO], pb.HEALTH_STATUS_HEALTHY),
        (pb.COMMAND_OPTIMIZER, [WARNING], pb.HEALTH_STATUS_DEGRADED),
        (pb.COMMAND_SEED, [ERROR], pb.HEALTH_STATUS_DEGRADED),
        (pb.COMMAND_PAUSE, [], pb.HEALTH_STATUS_DEGRADED),
        (pb.COMMAND_PAUSE, [INFO, WARNING], pb.HEALTH_STATUS_DEGRADED),
        (pb.COMMAND_SEED, [INFO, CRITICAL], pb.HEALTH_STATUS_CRITICAL),
        (pb.COMMAND_PAUSE, [WARNING, CRITICAL], pb.HEALTH_STATUS_CRITICAL),
    ],
)
def test_decision_health(command: int, levels: list[int], health: int) -> None:
    assert decision_health(command, [build_event("e", level=lvl) for lvl in levels]) == health


# --- packet ----------------------------------------------------------------------------------------


def _snapshot(**overrides: object) -> DecisionSnapshot:
    fields: dict[str, object] = {
        "step_index": 42,
        "policy_version": "tamiyo_gnn_v1",
        "validation_loss": 0.8,
        "loss_delta": -0.01,
        "conservative_mode": False,
        "inference_latency_ms": 1.25,
        "timeout_budget_ms": 5.0,
        "metadata_timeout_budget_ms": 25.0,
        "feature_coverage": FULL_COVERAGE,
    }
    fields.update(overrides)
    return DecisionSnapshot(**fields)  # type: ignore[arg-type]


def _verdict(**fields: object) -> RiskVerdict:
    return evaluate(RiskInputs(**{"command_type": pb.COMMAND_SEED, **fields}))  # type: ignore[arg-type]


def _metrics(packet: pb.TelemetryPacket) -> dict[str, float]:
    return {m.name: m.value for m in packet.metrics}


def test_clean_decision_packet() -> None:
    packet = decision_telemetry(_snapshot(), _verdict())
    assert packet.source_subsystem == "tamiyo"
    assert list(packet.events) == []
    assert packet.level == INFO
    health = packet.system_health
    assert (health.status, health.summary) == (pb.HEALTH_STATUS_HEALTHY, "stable")
    assert dict(health.indicators) == {
        "reason": "policy",
        "priority": "MESSAGE_PRIORITY_NORMAL",
        "command": "COMMAND_SEED",
        "step_index": "42",
        "policy_version": "tamiyo_gnn_v1",
        "timeout_budget_ms": "5.0",
        "metadata_timeout_budget_ms": "25.0",
        "compile_enabled": "0",
        "compile_fallbacks": "0",
        "feature_coverage": "1.000",
        "conservative_mode": "0",
    }
    assert _metrics(packet) == {
        "tamiyo.validation_loss": pytest.approx(0.8),
        "tamiyo.loss_delta": pytest.approx(-0.01),
        "tamiyo.conservative_mode": 0.0,
        "tamiyo.inference.latency_ms": 1.25,
        "tamiyo.gnn.compile_enabled": 0.0,
        "tamiyo.gnn.compile_fallback_total": 0.0,
        "tamiyo.gnn.feature_coverage": 1.0,
    }
    assert packet_priority(packet) == P_NORMAL


def test_all_optional_metrics_and_indicators() -> None:
    snapshot = _snapshot(
        coverage_types={"node.seed": 0.5, "edges.layer_connects": 0.0},
        value_estimate=0.3,
        risk_score=0.2,
        risk_index=1,
        compile_enabled=True,
        compile_warm_ms=812.0,
        compile_fallbacks=2,
        blueprint_risk=0.4,
        breaker_states={"inference": pb.CIRCUIT_STATE_CLOSED, "metadata": pb.CIRCUIT_STATE_OPEN},
        breaker_failures={"inference": 0, "metadata": 3},
        selection={"seed_index": 1.0, "seed_score": 0.7},
        training_run_id="run-1",
        conservative_mode=True,
    )
    packet = decision_telemetry(snapshot, _verdict())
    metrics = _metrics(packet)
    assert {
        "tamiyo.gnn.feature_coverage.node.seed": 0.5,
        "tamiyo.gnn.feature_coverage.edges.layer_connects": 0.0,
        "tamiyo.policy.value_estimate": pytest.approx(0.3),
        "tamiyo.policy.risk_score": pytest.approx(0.2),
        "tamiyo.policy.risk_index": 1.0,
        "tamiyo.gnn.compile_enabled": 1.0,
        "tamiyo.gnn.compile_warm_ms": 812.0,
        "tamiyo.gnn.compile_fallback_total": 2.0,
        "tamiyo.blueprint.risk": pytest.approx(0.4),
        "tamiyo.breaker.inference_state": float(pb.CIRCUIT_STATE_CLOSED),
        "tamiyo.breaker.metadata_state": float(pb.CIRCUIT_STATE_OPEN),
        "tamiyo.breaker.metadata_failures": 3.0,
        "tamiyo.selection.seed_index": 1.0,
        "tamiyo.selection.seed_score": pytest.approx(0.7),
        "tamiyo.conservative_mode": 1.0,
    }.items() <= metrics.items()
    indicators = packet.system_health.indicators
    assert (indicators["compile_enabled"], indicators["compile_fallbacks"]) == ("1", "2")
    assert (indicators["training_run_id"], indicators["conservative_mode"]) == ("run-1", "1")


def test_warning_findings_route_high_and_degrade_health() -> None:
    verdict = _verdict(training_metrics={"hook_latency_ms": 61.0, "cpu_util_percent": 97.0})
    packet = decision_telemetry(_snapshot(), verdict)
    assert [event_name(e) for e in packet.events] == ["hook_budget", "cpu_pressure_high"]
    assert packet.events[0].description == "hook latency ms 61 > 50"
    assert packet.events[0].attributes["threshold"] == "50"
    assert packet.level == WARNING
    health = packet.system_health
    assert (health.status, health.summary) == (pb.HEALTH_STATUS_DEGRADED, "hook_budget")
    assert (health.indicators["reason"], health.indicators["command"]) == ("hook_budget", "COMMAND_PAUSE")
    assert health.indicators["priority"] == "MESSAGE_PRIORITY_HIGH"
    assert packet_priority(packet) == decision_priority(packet.events) == P_HIGH


def test_downgrade_only_is_normal_priority() -> None:
    packet = decision_telemetry(_snapshot(), _verdict(training_metrics={"grad_var": 3.0}))
    health = packet.system_health
    assert (health.indicators["reason"], health.indicators["command"]) == ("grad_variance_high", "COMMAND_OPTIMIZER")
    assert (health.indicators["priority"], health.status) == ("MESSAGE_PRIORITY_NORMAL", pb.HEALTH_STATUS_DEGRADED)


def test_critical_finding_with_mode_transition() -> None:
    verdict = _verdict(policy_risk_score=0.99)
    entered = ConservativeTransition("entered", "policy_risk_critical", 0.0)
    packet = decision_telemetry(_snapshot(conservative_mode=True), verdict, transitions=[entered])
    assert [(event_name(e), e.level) for e in packet.events] == [
        ("policy_risk_critical", CRITICAL),
        ("conservative_mode_entered", WARNING),
    ]
    assert packet.level == CRITICAL
    health = packet.system_health
    assert (health.status, health.indicators["priority"]) == (pb.HEALTH_STATUS_CRITICAL, "MESSAGE_PRIORITY_CRITICAL")
    assert health.indicators["reason"] == "policy_risk_critical"


def test_critical_coverage_names_the_reason_when_nothing_else_did() -> None:
    packet = decision_telemetry(_snapshot(feature_coverage={"a": 0.05}), _verdict())
    health = packet.system_health
    assert [event_name(e) for e in packet.events] == ["degraded_inputs"]
    assert (health.indicators["reason"], health.status) == ("degraded_inputs", pb.HEALTH_STATUS_CRITICAL)
    assert health.indicators["feature_coverage"] == "0.050"


def test_info_coverage_event_keeps_normal_priority() -> None:
    packet = decision_telemetry(_snapshot(feature_coverage={"a": 0.2}), _verdict())
    health = packet.system_health
    assert [(event_name(e), e.level) for e in packet.events] == [("degraded_inputs", INFO)]
    assert (health.indicators["reason"], health.indicators["priority"]) == ("policy", "MESSAGE_PRIORITY_NORMAL")
    assert health.status == pb.HEALTH_STATUS_HEALTHY


def test_extra_events_come_first_and_count_for_priority() -> None:
    timeout = build_event("timeout_urza", level=WARNING, budget_ms=25.0)
    packet = decision_telemetry(_snapshot(), _verdict(training_metrics={"grad_var": 3.0}), extra_events=[timeout])
    assert [event_name(e) for e in packet.events] == ["timeout_urza", "grad_variance_high"]
    assert packet.system_health.indicators["priority"] == "MESSAGE_PRIORITY_HIGH"


def test_policy_pause_is_degraded_with_policy_reason() -> None:
    verdict = evaluate(RiskInputs(command_type=pb.COMMAND_PAUSE))
    packet = decision_telemetry(_snapshot(), verdict)
    health = packet.system_health
    assert (health.status, health.indicators["reason"], health.summary) == (
        pb.HEALTH_STATUS_DEGRADED,
        "policy",
        "stable",
    )


def test_finding_event_fields() -> None:
    finding = evaluate(RiskInputs(command_type=pb.COMMAND_SEED, blueprint_risk=0.9)).findings[0]
    event = finding_event(finding)
    assert (event_name(event), event.level, event.description) == (
        "bp_quarantine",
        CRITICAL,
        "blueprint risk 0.9 >= 0.8",
    )
    assert {k: event.attributes[k] for k in ("signal", "value", "threshold", "effect")} == {
        "signal": "blueprint.risk",
        "value": "0.9",
        "threshold": "0.8",
        "effect": "pause_conservative",
    }
