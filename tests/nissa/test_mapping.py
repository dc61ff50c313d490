"""Telemetry → TelemetryUpdate on real packets (plain functions, no registry, no bus)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from esper.core.telemetry import build_event, build_metric, build_telemetry_packet
from esper.leyline import pb
from esper.nissa.errors import MalformedTelemetryError
from esper.nissa.labels import EVENTS
from esper.nissa.mapping import (
    SIGNAL_BSDS_CRITICAL,
    SIGNAL_BSDS_HIGH,
    SIGNAL_ELEVATED_RISK,
    breaker_key,
    field_report_outcome,
    map_telemetry,
)

from ._packets import (
    RUN,
    decision,
    decision_failure,
    escalation,
    field_report,
    finding,
    kasmina_census,
    seed_event,
    tolaria_epoch,
    tolaria_event,
)


def test_tamiyo_command_decision() -> None:
    u = map_telemetry(decision(42, coverage=0.9, inference_ms=2.5))
    assert u.source == "tamiyo" and not u.own
    assert u.decision is not None
    assert u.decision.action == "seed"
    assert u.decision.inference_latency_s == pytest.approx(0.0025)
    assert u.gauges == {"feature_coverage": pytest.approx(0.9)}
    assert u.step == (RUN, 42)
    assert u.breakers == {"tamiyo.inference": pb.CIRCUIT_STATE_CLOSED}
    samples = dict(u.samples)
    assert samples["tamiyo.gnn.feature_coverage"] == pytest.approx(0.9)
    assert (samples[SIGNAL_BSDS_CRITICAL], samples[SIGNAL_BSDS_HIGH], samples[SIGNAL_ELEVATED_RISK]) == (0, 0, 0)
    assert u.emergencies == () and u.tamiyo_timeouts == 0 and u.inference_timeouts == 0


def test_pause_with_critical_bsds_finding_on_emergency_lane() -> None:
    packet = decision(7, command=pb.COMMAND_PAUSE, findings=(finding("bsds_hazard_critical"),), blueprint_risk=0.9)
    u = map_telemetry(packet, lane="emergency")
    assert u.decision is not None and u.decision.action == "pause"
    samples = dict(u.samples)
    assert samples[SIGNAL_BSDS_CRITICAL] == 1.0 and samples[SIGNAL_ELEVATED_RISK] == 1.0
    assert samples[SIGNAL_BSDS_HIGH] == 0.0
    assert u.emergencies == ("critical",)  # a CRITICAL finding makes the packet CRITICAL
    assert ("bsds_hazard_critical", "critical") in u.events


def test_same_critical_packet_on_normal_lane_is_no_emergency() -> None:
    packet = decision(7, command=pb.COMMAND_PAUSE, findings=(finding("bsds_hazard_critical"),))
    assert map_telemetry(packet, lane="normal").emergencies == ()


def test_decision_failure() -> None:
    u = map_telemetry(decision_failure(9))
    assert u.decision is not None
    assert (u.decision.action, u.decision.inference_latency_s) == ("failure", None)
    assert u.inference_timeouts == 1
    assert u.step == (RUN, 9)
    assert u.events == (("timeout_inference", "warning"),)


def test_non_decision_tamiyo_packet_is_not_a_decision() -> None:
    packet = build_telemetry_packet("tamiyo", events=[build_event("policy_update_applied")])
    u = map_telemetry(packet)
    assert u.decision is None and u.step is None
    assert u.events == (("policy_update_applied", "info"),)


def test_tolaria_epoch_with_kasmina_events() -> None:
    events = (seed_event("seed_fossilized"), seed_event("seed_culled", "s1"), seed_event("seed_culled", "s2"),
              seed_event("isolation_violation", level=pb.TELEMETRY_LEVEL_WARNING),
              escalation(pb.EMERGENCY_LEVEL_ELEVATED), build_event("brand_new_event"))
    u = map_telemetry(tolaria_epoch(3, accuracy=0.91, val_loss=0.33, events=events))
    assert u.gauges == {"training_epoch": 3.0, "training_accuracy": pytest.approx(0.91),
                        "training_validation_loss": pytest.approx(0.33)}
    assert (u.seeds_fossilized, u.seeds_culled, u.isolation_violations) == (1, 2, 1)
    assert u.emergencies == ("elevated",)
    assert ("other", "info") in u.events  # unlisted event names are bounded to `other`
    assert ("tolaria.emergency.escalated", "warning") in u.events
    assert u.decision is None and u.seeds_by_stage is None


def _event_names(*packages: str) -> set[str]:
    """Every event name passed to Tolaria's `_event` / Kasmina's `_emit` in their source (a literal, or
    either branch of `a if cond else b`)."""
    root = Path(__file__).resolve().parents[2] / "services"
    names: set[str] = set()
    for package in packages:
        for path in (root / package / "src" / "esper" / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("_event", "_emit") and node.args):
                    first = node.args[0]
                    options = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
                    names |= {o.value for o in options if isinstance(o, ast.Constant) and isinstance(o.value, str)}
    return names


def test_every_event_tolaria_and_kasmina_emit_has_its_own_label() -> None:
    """Tolaria's `command_unsupported` was counted as `other`, on the dashboards too."""
    names = _event_names("tolaria", "kasmina")
    assert {"command_unsupported", "seed_paused", "step_failure", "gate_event"} <= names  # the scan sees them
    assert names - EVENTS == set()


def test_halt_escalation_counts_the_lane_and_the_level() -> None:
    packet = tolaria_epoch(5, events=(escalation(pb.EMERGENCY_LEVEL_HALT, halt=True),))
    assert map_telemetry(packet, lane="emergency").emergencies == ("critical", "halt")


def test_trainer_timeout_and_step_failure_events() -> None:
    assert map_telemetry(tolaria_event("tamiyo_timeout", step_index=4)).tamiyo_timeouts == 1
    assert map_telemetry(tolaria_event("loss_spike", reason="loss_spike")).step_emergencies == 1
    assert map_telemetry(tolaria_event("step_failure", reason="non_finite")).step_emergencies == 1


def test_kasmina_census() -> None:
    u = map_telemetry(kasmina_census({"s0": (pb.SEED_STAGE_TRAINING, 0.0), "s1": (pb.SEED_STAGE_BLENDING, 0.4),
                                      "s2": (pb.SEED_STAGE_BLENDING, 0.7), "s3": (99, 0.0)},
                                     breaker=pb.CIRCUIT_STATE_OPEN))
    assert u.seeds_by_stage == {"training": 1, "blending": 2, "unknown": 1}
    assert u.seed_alpha == {"s0": 0.0, "s1": pytest.approx(0.4), "s2": pytest.approx(0.7), "s3": 0.0}
    assert u.breakers == {"kasmina": pb.CIRCUIT_STATE_OPEN}


def test_empty_census_is_still_a_census() -> None:
    u = map_telemetry(kasmina_census({}))
    assert u.seeds_by_stage == {} and u.seed_alpha == {}


def test_inference_breaker_open_event_opens_the_tamiyo_breaker() -> None:
    u = map_telemetry(decision_failure(3, "inference_breaker_open"))
    assert u.breakers == {"tamiyo.inference": pb.CIRCUIT_STATE_OPEN}
    assert u.inference_timeouts == 0


def test_dead_letter_events_and_unknown_source() -> None:
    packet = build_telemetry_packet("mystery", events=[
        build_event("oona.dead_letter", level=pb.TELEMETRY_LEVEL_WARNING, reason="stale"),
        build_event("oona.dead_letter.bad_signature", level=pb.TELEMETRY_LEVEL_ERROR, reason="bad_signature")])
    u = map_telemetry(packet)
    assert u.source == "other"
    assert u.dead_letters == 2


def test_own_packets_feed_counters_only() -> None:
    fired = build_event("nissa.alert_fired", level=pb.TELEMETRY_LEVEL_WARNING)
    packet = build_telemetry_packet("nissa", events=[fired], metrics=[build_metric("tamiyo.gnn.feature_coverage", 0.0)])
    u = map_telemetry(packet, own_source="nissa")
    assert u.own
    assert u.events == (("nissa.alert_fired", "warning"),)
    assert u.samples == () and u.gauges == {}


def test_packet_without_source_is_malformed() -> None:
    packet = build_telemetry_packet("", metrics=[build_metric("tolaria.training.accuracy", 0.5)])
    with pytest.raises(MalformedTelemetryError) as info:
        map_telemetry(packet)
    assert info.value.reason == "missing_source"


@pytest.mark.parametrize(("name", "key"), [
    ("kasmina.breaker.state", "kasmina"),
    ("tamiyo.breaker.inference_state", "tamiyo.inference"),
    ("tamiyo.breaker.metadata_state", "tamiyo.metadata"),
    ("tamiyo.breaker.inference_failures", None),
    ("kasmina.seed.stage", None),
])
def test_breaker_key(name: str, key: str | None) -> None:
    assert breaker_key(name) == key


def test_field_report_outcome() -> None:
    assert field_report_outcome(field_report("r1", pb.FIELD_REPORT_OUTCOME_SUCCESS)) == "success"
    assert field_report_outcome(field_report("r2", pb.FIELD_REPORT_OUTCOME_REGRESSION)) == "regression"
    assert field_report_outcome(field_report("r3", 42)) == "unknown"
