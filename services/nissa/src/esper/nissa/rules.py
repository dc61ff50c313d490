"""The fleet's alert rules and SLOs (REFERENCE_PROTOTYPE §9, adapted to today's telemetry).

Samples a rule watches are either telemetry metric points (by name), per-decision signals derived
in :mod:`esper.nissa.mapping`, or ``nissa.*`` signals the ingestor computes every evaluation
interval (counts since the last interval, open breakers, SLO burn).
"""

from __future__ import annotations

from typing import Final

from esper.nissa.alerts import AlertRule
from esper.nissa.mapping import SIGNAL_BSDS_CRITICAL, SIGNAL_BSDS_HIGH, SIGNAL_ELEVATED_RISK
from esper.nissa.settings import NissaSettings
from esper.nissa.slo import SloSpec

__all__ = [
    "SIGNAL_BREAKERS_OPEN",
    "SIGNAL_DEAD_LETTERS",
    "SIGNAL_EMERGENCIES_PER_MIN",
    "SIGNAL_TAMIYO_TIMEOUTS",
    "SLO_DECISIONS",
    "SLO_TRAINING",
    "default_rules",
    "default_slos",
    "slo_signal",
]

SIGNAL_TAMIYO_TIMEOUTS: Final = "nissa.tamiyo_timeouts.interval"  # tamiyo_timeout events in the last interval
SIGNAL_DEAD_LETTERS: Final = "nissa.dead_letters.interval"  # dead-letter events in the last interval
SIGNAL_EMERGENCIES_PER_MIN: Final = "nissa.emergencies.last_minute"  # emergency occurrences in the last 60 s
SIGNAL_BREAKERS_OPEN: Final = "nissa.breakers.open"  # breakers whose last known state is OPEN

SLO_DECISIONS: Final = "decision_deadline"
SLO_TRAINING: Final = "training_stability"

_PAGE: Final = ("pagerduty", "slack")


def slo_signal(slo: str) -> str:
    """Sample name of an SLO's multiwindow burn (min of the long and short window burn rates)."""
    return f"nissa.slo.{slo}.burn"


def default_rules(s: NissaSettings) -> tuple[AlertRule, ...]:
    return (
        # The prototype's table (routes and counts as there).
        AlertRule("tamiyo_coverage_low", "tamiyo.gnn.feature_coverage", "<", s.alert_coverage_min, 3, ("slack",),
                  description="Tamiyo decides on mostly missing graph features"),
        AlertRule("training_latency_high", "tolaria.training.latency_ms", ">", 18.0, 3, _PAGE, "critical",
                  description="training step latency over budget (needs Tolaria to send the metric)"),
        AlertRule("kasmina_isolation_violation", "kasmina.isolation.violations", ">", 3.0, 1, ("pagerduty",),
                  "critical", description="seed gradients leak into the host"),
        AlertRule("oona_queue_depth", "oona.queue.depth", ">", 4000.0, 2, ("slack",),
                  description="bus backlog (needs the metric in telemetry; oona_stream_length covers it today)"),
        AlertRule("tezzeret_compile_retry_high", "tezzeret.compile.retry_count", ">", 1.0, 1, ("email",),
                  description="kernel compiles retried (needs the metric in telemetry)"),
        AlertRule("tamiyo_bsds_critical", SIGNAL_BSDS_CRITICAL, ">", 0.5, 1, ("pagerduty",), "critical",
                  description="a decision hit a CRITICAL-hazard or quarantine-handled blueprint"),
        AlertRule("tamiyo_bsds_high", SIGNAL_BSDS_HIGH, ">", 0.5, 3, ("slack",),
                  description="decisions keep hitting HIGH-hazard blueprints"),
        AlertRule("tamiyo_bsds_elevated_risk", SIGNAL_ELEVATED_RISK, ">", 0.5, 1, ("pagerduty",), "critical",
                  description="a decision chose a blueprint with risk >= 0.8"),
        # Fleet rules.
        AlertRule("decision_deadline_miss", SIGNAL_TAMIYO_TIMEOUTS, ">", 0.0, 2, _PAGE,
                  description="the trainer keeps missing Tamiyo's replies (two intervals in a row)"),
        AlertRule("dead_letters_growing", SIGNAL_DEAD_LETTERS, ">", 0.0, 2, ("slack",),
                  description="entries keep going to oona.deadletter (two intervals in a row)"),
        AlertRule("breaker_open", SIGNAL_BREAKERS_OPEN, ">", 0.0, 1, _PAGE, "critical",
                  description="a circuit breaker is open"),
        AlertRule("emergency_rate_high", SIGNAL_EMERGENCIES_PER_MIN, ">", s.alert_emergency_per_min, 1, _PAGE,
                  "critical", description="emergency-lane telemetry and escalations arrive fast"),
        AlertRule(f"slo_burn_{SLO_DECISIONS}", slo_signal(SLO_DECISIONS), ">", s.slo_burn_threshold, 1, _PAGE,
                  "critical", description="decisions miss their deadline faster than the SLO allows"),
        AlertRule(f"slo_burn_{SLO_TRAINING}", slo_signal(SLO_TRAINING), ">", s.slo_burn_threshold, 1, _PAGE,
                  "critical", description="training steps raise emergencies faster than the SLO allows"),
    )


def default_slos(s: NissaSettings) -> tuple[SloSpec, ...]:
    windows = (s.slo_window_s, s.slo_long_window_s, s.slo_short_window_s)
    return (
        SloSpec(SLO_DECISIONS, s.decision_slo_objective, *windows,
                description="good: Tamiyo commands; bad: tamiyo_timeout (trainer) + timeout_inference (Tamiyo)",
                min_events=s.slo_min_events),
        SloSpec(SLO_TRAINING, s.training_slo_objective, *windows,
                description="good: training steps without an emergency; bad: step_failure + loss_spike",
                min_events=s.slo_min_events),
    )
