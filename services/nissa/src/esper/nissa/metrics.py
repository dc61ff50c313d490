"""The ``esper_*`` Prometheus metrics Nissa exports (the contract dashboards and alert rules use).

Names follow Prometheus conventions (ARCHITECTURE §8): base units, ``_total`` counters, bounded label
values (:mod:`esper.nissa.labels`). Known label values are created at start-up so their series exist
at zero; training gauges start at NaN ("not reported yet") rather than a misleading 0.
"""

from __future__ import annotations

import math
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esper.leyline import pb
from esper.nissa.alerts import AlertRule
from esper.nissa.labels import enum_labels
from esper.nissa.mapping import ACTIONS, GAUGE_SOURCES

__all__ = ["DECISION_BUCKETS_S", "INGEST_BUCKETS_S", "NissaMetrics"]

DECISION_BUCKETS_S: Final = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Around the 5 ms step budget (0.5-10 ms), plus a few for the slow tail."""
INGEST_BUCKETS_S: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)

EMERGENCY_LEVELS: Final = ("high", "critical", "notice", "elevated", "conservative", "halt")


class NissaMetrics:
    """The metric objects, on an injected registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry, rules: tuple[AlertRule, ...] = (),
                 slos: tuple[str, ...] = ()) -> None:
        r = self.registry = registry
        self.stages: tuple[str, ...] = enum_labels(pb.SeedLifecycleStage.DESCRIPTOR, "SEED_STAGE_")
        self.packets = Counter("esper_telemetry_packets_total", "Telemetry packets ingested", ["source"], registry=r)
        self.events = Counter("esper_telemetry_events_total", "Telemetry events ingested (unlisted names: other)",
                              ["source", "event", "level"], registry=r)
        self.field_reports = Counter("esper_field_reports_total", "Field reports seen, by outcome", ["outcome"],
                                     registry=r)
        self.gauges = {
            "training_epoch": Gauge("esper_training_epoch", "Current epoch (tolaria.epochs.total)", registry=r),
            "training_accuracy": Gauge("esper_training_accuracy", "Validation accuracy (tolaria.training.accuracy)",
                                       registry=r),
            "training_validation_loss": Gauge("esper_training_validation_loss",
                                              "Validation loss (tolaria.training.validation_loss)", registry=r),
            "training_loss": Gauge("esper_training_loss", "Training loss (tolaria.training.loss)", registry=r),
            "feature_coverage": Gauge("esper_feature_coverage", "Tamiyo's average graph feature coverage",
                                      registry=r),
        }
        assert set(self.gauges) == set(GAUGE_SOURCES.values())
        for g in self.gauges.values():
            g.set(math.nan)
        self.seeds = Gauge("esper_seeds", "Seeds by lifecycle stage (Kasmina's last census)", ["stage"], registry=r)
        self.seed_alpha = Gauge("esper_seed_alpha", "Blending alpha per seed", ["seed_id"], registry=r)
        self.seeds_fossilized = Counter("esper_seeds_fossilized_total", "seed_fossilized events", registry=r)
        self.seeds_culled = Counter("esper_seeds_culled_total", "seed_culled events", registry=r)
        self.decision_latency = Histogram("esper_decision_latency_seconds",
                                          "Tamiyo inference time per decision (tamiyo.inference.latency_ms)",
                                          buckets=DECISION_BUCKETS_S, registry=r)
        self.decisions = Counter("esper_decisions_total", "Tamiyo decisions, by command type or failure", ["action"],
                                 registry=r)
        self.tamiyo_timeouts = Counter("esper_tamiyo_timeouts_total", "tamiyo_timeout events (trainer got no reply)",
                                       registry=r)
        self.dead_letters = Counter("esper_dead_letters_total", "Dead-letter events, by reporting process",
                                    ["source"], registry=r)
        self.emergencies = Counter("esper_emergency_events_total",
                                   "HIGH/CRITICAL emergency-lane telemetry, and emergency escalations by level",
                                   ["level"], registry=r)
        self.isolation_violations = Counter("esper_isolation_violations_total", "isolation_violation events",
                                            registry=r)
        self.breaker_state = Gauge("esper_breaker_state", "Last reported CircuitBreakerState (1 closed, 2 open, "
                                   "3 half-open)", ["breaker"], registry=r)
        self.alert_firing = Gauge("esper_alert_firing", "1 while the alert fires", ["alert", "severity"], registry=r)
        self.alerts_fired = Counter("esper_alerts_fired_total", "Times the alert fired", ["alert"], registry=r)
        self.slo_burn = Gauge("esper_slo_burn_rate", "Error rate over the allowed error rate (long window)", ["slo"],
                              registry=r)
        self.slo_budget = Gauge("esper_slo_error_budget_remaining", "Share of the SLO window's error budget left",
                                ["slo"], registry=r)
        self.ingest_seconds = Histogram("esper_nissa_ingest_seconds", "Decode + map + apply per message",
                                        buckets=INGEST_BUCKETS_S, registry=r)
        self.ingest_errors = Counter("esper_nissa_ingest_errors_total", "Messages refused, by reason", ["reason"],
                                     registry=r)
        self._zero_series(rules, slos)

    def _zero_series(self, rules: tuple[AlertRule, ...], slos: tuple[str, ...]) -> None:
        for stage in self.stages:
            self.seeds.labels(stage).set(0)
        for outcome in enum_labels(pb.FieldReportOutcome.DESCRIPTOR, "FIELD_REPORT_OUTCOME_"):
            self.field_reports.labels(outcome)
        for action in ACTIONS:
            self.decisions.labels(action)
        for level in EMERGENCY_LEVELS:
            self.emergencies.labels(level)
        for rule in rules:
            self.alert_firing.labels(rule.name, rule.severity).set(0)
            self.alerts_fired.labels(rule.name)
        for slo in slos:
            self.slo_burn.labels(slo).set(0)
            self.slo_budget.labels(slo).set(1)
