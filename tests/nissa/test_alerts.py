"""The alert engine's consecutive-sample rule, and the fleet's rule table."""

from __future__ import annotations

import math

import pytest

from esper.nissa.alerts import AlertEngine, AlertRule
from esper.nissa.rules import default_rules
from esper.nissa.settings import NissaSettings

COVERAGE = AlertRule("coverage_low", "tamiyo.gnn.feature_coverage", "<", 0.7, consecutive=3, routes=("slack",))
ISOLATION = AlertRule("isolation", "kasmina.isolation.violations", ">", 3.0, consecutive=1, routes=("pagerduty",),
                      severity="critical")


def engine() -> AlertEngine:
    return AlertEngine((COVERAGE, ISOLATION))


def test_fires_only_after_n_consecutive_breaches() -> None:
    e = engine()
    assert e.observe(COVERAGE.metric, 0.5, 1000) == []
    assert e.observe(COVERAGE.metric, 0.6, 2000) == []
    assert not e.is_firing("coverage_low")
    (t,) = e.observe(COVERAGE.metric, 0.4, 3000)
    assert t.fired and t.value == 0.4 and t.at_ms == 3000
    assert t.alert.since_ms == 1000  # the first of the breaching samples
    assert t.alert.fired_at_ms == 3000
    assert e.is_firing("coverage_low")
    assert e.observe(COVERAGE.metric, 0.3, 4000) == []  # still firing: no new transition
    (active,) = e.active()
    assert (active.value, active.samples, active.since_ms) == (0.3, 4, 1000)


def test_a_good_sample_resets_the_streak() -> None:
    e = engine()
    e.observe(COVERAGE.metric, 0.5, 1)
    e.observe(COVERAGE.metric, 0.5, 2)
    e.observe(COVERAGE.metric, 0.9, 3)  # breaks the streak
    e.observe(COVERAGE.metric, 0.5, 4)
    assert e.observe(COVERAGE.metric, 0.5, 5) == []
    assert not e.is_firing("coverage_low")
    assert e.observe(COVERAGE.metric, 0.5, 6)[0].fired


def test_clears_on_the_first_sample_that_does_not_breach() -> None:
    e = engine()
    (fired,) = e.observe(ISOLATION.metric, 4.0, 10)
    assert fired.fired
    (cleared,) = e.observe(ISOLATION.metric, 3.0, 20)  # not > 3
    assert not cleared.fired and cleared.at_ms == 20 and cleared.alert.rule is ISOLATION
    assert e.active() == []
    assert e.observe(ISOLATION.metric, 2.0, 30) == []  # nothing left to clear


def test_nan_never_breaches_and_clears() -> None:
    e = engine()
    e.observe(ISOLATION.metric, 5.0, 1)
    (t,) = e.observe(ISOLATION.metric, math.nan, 2)
    assert not t.fired
    assert e.observe(ISOLATION.metric, math.nan, 3) == []


def test_unwatched_metrics_are_ignored_and_active_is_oldest_first() -> None:
    e = engine()
    assert e.observe("something.else", 1e9, 1) == []
    e.observe(ISOLATION.metric, 9.0, 5)
    for ts in (6, 7, 8):
        e.observe(COVERAGE.metric, 0.1, ts)
    assert [a.rule.name for a in e.active()] == ["isolation", "coverage_low"]
    d = e.active()[0].as_dict()
    assert d["alert"] == "isolation" and d["severity"] == "critical" and d["routes"] == ["pagerduty"]
    assert d["since_ms"] == 5 and d["value"] == 9.0


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        AlertRule("x", "m", ">", 1.0, consecutive=0)
    with pytest.raises(ValueError, match="unique"):
        AlertEngine((COVERAGE, COVERAGE))


def test_default_rules_keep_the_prototype_table() -> None:
    rules = {r.name: r for r in default_rules(NissaSettings(_env_file=None))}
    prototype = {
        "tamiyo_coverage_low": ("tamiyo.gnn.feature_coverage", "<", 0.7, 3, ("slack",)),
        "training_latency_high": ("tolaria.training.latency_ms", ">", 18.0, 3, ("pagerduty", "slack")),
        "kasmina_isolation_violation": ("kasmina.isolation.violations", ">", 3.0, 1, ("pagerduty",)),
        "oona_queue_depth": ("oona.queue.depth", ">", 4000.0, 2, ("slack",)),
        "tezzeret_compile_retry_high": ("tezzeret.compile.retry_count", ">", 1.0, 1, ("email",)),
        "tamiyo_bsds_critical": ("tamiyo.bsds.hazard_critical_signal", ">", 0.5, 1, ("pagerduty",)),
        "tamiyo_bsds_high": ("tamiyo.bsds.hazard_high_signal", ">", 0.5, 3, ("slack",)),
        "tamiyo_bsds_elevated_risk": ("tamiyo.bsds.elevated_risk_flag", ">", 0.5, 1, ("pagerduty",)),
    }
    for name, (metric, op, threshold, consecutive, routes) in prototype.items():
        r = rules[name]
        assert (r.metric, r.op, r.threshold, r.consecutive, r.routes) == (metric, op, threshold, consecutive, routes)
    assert {"decision_deadline_miss", "dead_letters_growing", "breaker_open", "emergency_rate_high",
            "slo_burn_decision_deadline", "slo_burn_training_stability"} <= set(rules)
    assert rules["slo_burn_decision_deadline"].threshold == 0.4  # the prototype's burn threshold
