"""The Ingestor on real packets: Prometheus values, SLO gauges and alerts, driven with a known clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from esper.core.telemetry import build_event, build_metric, build_telemetry_packet
from esper.leyline import Lane, pb
from esper.nissa.alerts import AlertTransition
from esper.nissa.ingest import Ingestor
from esper.nissa.mapping import map_telemetry
from esper.nissa.settings import NissaSettings

from ._packets import decision, decision_failure, escalation, kasmina_census, seed_event, tolaria_epoch, tolaria_event

S = 1000  # ms per second


class Harness:
    def __init__(self, **overrides: Any) -> None:
        self.registry = CollectorRegistry()
        self.settings = NissaSettings(_env_file=None, **overrides)
        self.ingestor = Ingestor.from_settings(self.settings, self.registry)

    def feed(self, packet: pb.TelemetryPacket, now_ms: int, lane: Lane = "normal") -> list[AlertTransition]:
        return self.ingestor.ingest_telemetry(map_telemetry(packet, lane=lane), now_ms)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def firing(self, alert: str) -> bool:
        return self.ingestor.engine.is_firing(alert)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_series_exist_before_any_telemetry(h: Harness) -> None:
    assert h.value("esper_seeds", stage="training") == 0
    assert h.value("esper_field_reports_total", outcome="success") == 0
    assert h.value("esper_decisions_total", action="failure") == 0
    assert h.value("esper_alert_firing", alert="breaker_open", severity="critical") == 0
    assert h.value("esper_slo_error_budget_remaining", slo="decision_deadline") == 1
    accuracy = h.value("esper_training_accuracy")
    assert accuracy is not None and math.isnan(accuracy)  # "not reported yet", not 0


def test_decisions_latency_and_timeouts(h: Harness) -> None:
    h.feed(decision(1, inference_ms=0.7), 0)
    h.feed(decision(2, inference_ms=4.0, command=pb.COMMAND_OPTIMIZER), 0)
    h.feed(decision_failure(3), 0)
    h.feed(tolaria_event("tamiyo_timeout", step_index=4), 0)
    assert h.value("esper_decisions_total", action="seed") == 1
    assert h.value("esper_decisions_total", action="optimizer") == 1
    assert h.value("esper_decisions_total", action="failure") == 1
    assert h.value("esper_decision_latency_seconds_count") == 2
    assert h.value("esper_decision_latency_seconds_bucket", le="0.001") == 1
    assert h.value("esper_decision_latency_seconds_bucket", le="0.005") == 2
    assert h.value("esper_tamiyo_timeouts_total") == 1
    assert h.value("esper_telemetry_packets_total", source="tamiyo") == 3
    assert h.value("esper_telemetry_events_total", source="tolaria", event="tamiyo_timeout", level="warning") == 1
    assert h.value("esper_feature_coverage") == pytest.approx(0.9)


def test_training_gauges_seeds_and_counters(h: Harness) -> None:
    events = (seed_event("seed_fossilized"), seed_event("seed_culled", "s1"),
              seed_event("isolation_violation", level=pb.TELEMETRY_LEVEL_WARNING))
    h.feed(tolaria_epoch(2, accuracy=0.75, val_loss=0.6, events=events), 0)
    h.feed(kasmina_census({"s0": (pb.SEED_STAGE_FOSSILIZED, 1.0), "s1": (pb.SEED_STAGE_BLENDING, 0.25)}), 0)
    assert h.value("esper_training_epoch") == 2
    assert h.value("esper_training_accuracy") == pytest.approx(0.75)
    assert h.value("esper_training_validation_loss") == pytest.approx(0.6)
    assert (h.value("esper_seeds_fossilized_total"), h.value("esper_seeds_culled_total")) == (1, 1)
    assert h.value("esper_isolation_violations_total") == 1
    assert h.value("esper_seeds", stage="fossilized") == 1
    assert h.value("esper_seeds", stage="blending") == 1
    assert h.value("esper_seed_alpha", seed_id="s1") == pytest.approx(0.25)
    # s1 is gone from the next census: its stage count and alpha series go with it.
    h.feed(kasmina_census({"s0": (pb.SEED_STAGE_FOSSILIZED, 1.0), "s9": (99, 0.0)}), 0)
    assert h.value("esper_seeds", stage="blending") == 0
    assert h.value("esper_seeds", stage="unknown") == 1
    h.feed(kasmina_census({"s0": (pb.SEED_STAGE_FOSSILIZED, 1.0)}), 0)
    assert h.value("esper_seeds", stage="unknown") == 0
    assert h.value("esper_seed_alpha", seed_id="s1") is None
    assert h.value("esper_seed_alpha", seed_id="s0") == 1.0


def test_seed_alpha_series_are_capped() -> None:
    h = Harness(max_seed_series=2)
    h.feed(kasmina_census({f"s{i}": (pb.SEED_STAGE_TRAINING, 0.1 * i) for i in range(4)}), 0)
    present = [s for s in ("s0", "s1", "s2", "s3") if h.value("esper_seed_alpha", seed_id=s) is not None]
    assert present == ["s2", "s3"]


def test_coverage_alert_fires_after_three_and_clears(h: Harness) -> None:
    assert h.feed(decision(1, coverage=0.5), 1 * S) == []
    assert h.feed(decision(2, coverage=0.5), 2 * S) == []
    (t,) = h.feed(decision(3, coverage=0.5), 3 * S)
    assert t.fired and t.alert.rule.name == "tamiyo_coverage_low"
    assert h.value("esper_alert_firing", alert="tamiyo_coverage_low", severity="warning") == 1
    assert h.value("esper_alerts_fired_total", alert="tamiyo_coverage_low") == 1
    (t,) = h.feed(decision(4, coverage=0.95), 4 * S)
    assert not t.fired
    assert h.value("esper_alert_firing", alert="tamiyo_coverage_low", severity="warning") == 0
    assert h.value("esper_alerts_fired_total", alert="tamiyo_coverage_low") == 1


def test_bsds_critical_decision_pages(h: Harness) -> None:
    from ._packets import finding

    transitions = h.feed(decision(1, command=pb.COMMAND_PAUSE, findings=(finding("bsds_hazard_critical"),)), S)
    assert {t.alert.rule.name for t in transitions} == {"tamiyo_bsds_critical"}
    assert h.firing("tamiyo_bsds_critical")
    h.feed(decision(2), 2 * S)
    assert not h.firing("tamiyo_bsds_critical")


def test_breaker_open_fires_and_clears(h: Harness) -> None:
    (t,) = h.feed(kasmina_census({}, breaker=pb.CIRCUIT_STATE_OPEN), S)
    assert t.fired and t.alert.rule.name == "breaker_open"
    assert h.value("esper_breaker_state", breaker="kasmina") == pb.CIRCUIT_STATE_OPEN
    h.feed(decision_failure(5, "inference_breaker_open"), 2 * S)  # a second open breaker: still one alert
    assert h.ingestor.open_breakers() == 2
    h.feed(kasmina_census({}, breaker=pb.CIRCUIT_STATE_CLOSED), 3 * S)
    assert h.firing("breaker_open")  # Tamiyo's is still open
    (t,) = h.feed(decision(6, breaker=pb.CIRCUIT_STATE_CLOSED), 4 * S)
    assert not t.fired
    assert h.value("esper_alert_firing", alert="breaker_open", severity="critical") == 0


def _named(transitions: list[AlertTransition], name: str) -> list[AlertTransition]:
    return [t for t in transitions if t.alert.rule.name == name]


def test_deadline_misses_fire_after_two_intervals_and_clear(h: Harness) -> None:
    h.ingestor.tick(0)
    h.feed(tolaria_event("tamiyo_timeout", step_index=1), 1 * S)
    assert _named(h.ingestor.tick(10 * S), "decision_deadline_miss") == []
    h.feed(tolaria_event("tamiyo_timeout", step_index=2), 11 * S)
    (t,) = _named(h.ingestor.tick(20 * S), "decision_deadline_miss")
    assert t.fired and t.value == 1
    (t,) = _named(h.ingestor.tick(30 * S), "decision_deadline_miss")  # an interval without misses
    assert not t.fired


def test_dead_letters_growing_fires_on_the_second_interval(h: Harness) -> None:
    dead = build_telemetry_packet("tamiyo", events=[build_event("oona.dead_letter", level=pb.TELEMETRY_LEVEL_WARNING)])
    h.ingestor.tick(0)
    h.feed(dead, 1 * S)
    assert _named(h.ingestor.tick(10 * S), "dead_letters_growing") == []
    h.feed(dead, 11 * S)
    (t,) = _named(h.ingestor.tick(20 * S), "dead_letters_growing")
    assert t.fired
    assert h.value("esper_dead_letters_total", source="tamiyo") == 2
    assert not _named(h.ingestor.tick(30 * S), "dead_letters_growing")[0].fired


def test_emergency_rate_counts_the_last_minute(h: Harness) -> None:
    halt = tolaria_epoch(1, events=(escalation(pb.EMERGENCY_LEVEL_HALT, halt=True),))
    for _ in range(5):  # each: a CRITICAL emergency-lane packet and a HALT escalation = 2 occurrences
        h.feed(halt, 1 * S, lane="emergency")
    assert _named(h.ingestor.tick(10 * S), "emergency_rate_high") == []  # 10 in the last minute: not > 10
    h.feed(halt, 30 * S, lane="emergency")
    (t,) = _named(h.ingestor.tick(40 * S), "emergency_rate_high")
    assert t.fired and t.value == 12
    assert h.value("esper_emergency_events_total", level="critical") == 6
    assert h.value("esper_emergency_events_total", level="halt") == 6
    (t,) = _named(h.ingestor.tick(65 * S), "emergency_rate_high")  # the first burst left the minute
    assert not t.fired and t.value == 2


def test_own_packets_are_counted_but_never_alert(h: Harness) -> None:
    own = build_telemetry_packet("nissa", events=[build_event("nissa.alert_fired", level=pb.TELEMETRY_LEVEL_WARNING)],
                                 metrics=[build_metric("kasmina.isolation.violations", 100.0)])
    assert h.feed(own, S) == []
    assert h.value("esper_telemetry_packets_total", source="nissa") == 1
    assert h.value("esper_telemetry_events_total", source="nissa", event="nissa.alert_fired", level="warning") == 1
    assert not h.firing("kasmina_isolation_violation")


def test_burn_alert_waits_for_enough_events(h: Harness) -> None:
    h.feed(tolaria_event("tamiyo_timeout", step_index=1), S)  # 1 of 1 bad: burn 100, but one event proves little
    assert _named(h.ingestor.tick(2 * S), "slo_burn_decision_deadline") == []
    assert h.value("esper_slo_burn_rate", slo="decision_deadline") == pytest.approx(100.0)


def test_decision_slo_burn_from_known_counts() -> None:
    h = Harness(decision_slo_objective=0.9)
    for step in range(1, 9):
        h.feed(decision(step), 1 * S)
    h.feed(decision_failure(9), 1 * S)  # timeout_inference: bad
    h.feed(tolaria_event("tamiyo_timeout", step_index=10), 1 * S)  # bad
    h.feed(decision_failure(11, "dependency_violation"), 1 * S)  # a failure, but not a deadline miss
    transitions = h.ingestor.tick(2 * S)
    # 2 bad of 10 = 20% errors against an allowed 10%: burn 2.0 in both windows → page.
    assert h.value("esper_slo_burn_rate", slo="decision_deadline") == pytest.approx(2.0)
    assert h.value("esper_slo_error_budget_remaining", slo="decision_deadline") == pytest.approx(-1.0)
    assert "slo_burn_decision_deadline" in {t.alert.rule.name for t in transitions if t.fired}


def test_training_slo_counts_steps_minus_bad_steps() -> None:
    h = Harness(training_slo_objective=0.9)
    h.feed(decision(100), 1 * S)  # first sighting: 1 step
    h.feed(tolaria_event("loss_spike", reason="loss_spike"), 1 * S)  # a bad step, reported before progress
    h.feed(decision(119), 1 * S)  # 19 more steps, one of which was the bad one
    h.ingestor.tick(2 * S)
    (status,) = [s for s in h.ingestor.slo_statuses(2 * S) if s.name == "training_stability"]
    assert (status.good, status.bad) == (19, 1)
    assert h.value("esper_slo_burn_rate", slo="training_stability") == pytest.approx((1 / 20) / 0.1)
