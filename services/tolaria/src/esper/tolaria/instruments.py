"""Tolaria's Prometheus metrics (rollback, checkpoints, conservative mode, emergencies), on an injected registry.

Names follow ARCHITECTURE §8: base units, `_total` counters, bounded label values (tier, reason,
level name). The step's *packet* metrics (loss EWMA, grad variance, ...) live in `esper.tolaria.metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esper.leyline import pb

__all__ = ["TolariaMetrics"]

_ROLLBACK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_CHECKPOINT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TolariaMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # rollback
        self.rollbacks = Counter("tolaria_rollback_total", "Rollbacks that restored state", ["tier"], registry=r)
        self.rollback_seconds = Histogram("tolaria_rollback_seconds", "Rollback duration, by serving tier", ["tier"],
                                          buckets=_ROLLBACK_BUCKETS_S, registry=r)
        self.rollback_deadline_misses = Counter("tolaria_rollback_deadline_miss_total",
                                                "Rollbacks past TOLARIA_ROLLBACK_DEADLINE_MS", registry=r)
        self.rollback_failures = Counter("tolaria_rollback_failures_total", "Rollbacks that restored nothing",
                                         ["reason"], registry=r)
        self.snapshots = Counter("tolaria_rollback_snapshots_total", "Fast-tier snapshots taken", registry=r)
        self.snapshot_evictions = Counter("tolaria_rollback_snapshot_evictions_total",
                                          "Fast-tier snapshots evicted to stay under the byte cap", registry=r)
        self.snapshot_rejected = Counter("tolaria_rollback_snapshot_rejected_total",
                                         "Snapshots larger than the whole fast-tier cap (not kept)", registry=r)
        self.snapshot_bytes = Gauge("tolaria_rollback_snapshot_bytes", "Bytes held by the fast tier", registry=r)
        self.snapshot_count = Gauge("tolaria_rollback_snapshot_count", "Snapshots held by the fast tier", registry=r)
        # checkpoints
        self.checkpoints = Counter("tolaria_checkpoint_total", "Checkpoints written", registry=r)
        self.checkpoint_seconds = Histogram("tolaria_checkpoint_seconds", "Checkpoint save duration",
                                            buckets=_CHECKPOINT_BUCKETS_S, registry=r)
        self.checkpoint_errors = Counter("tolaria_checkpoint_errors_total", "Checkpoints refused or not written",
                                         ["reason"], registry=r)
        # decisions: the decision breaker and conservative mode (conservative.py)
        self.conservative_mode = Gauge("tolaria_conservative_mode",
                                       "1 while in conservative mode (decision breaker not CLOSED)", registry=r)
        self.decision_breaker_state = Gauge("tolaria_decision_breaker_state",
                                            "Decision breaker state (CircuitBreakerState: 1 closed, 2 open, "
                                            "3 half-open)", registry=r)
        self.decision_breaker_state.set(pb.CIRCUIT_STATE_CLOSED)
        self.conservative_entries = Counter("tolaria_conservative_entries_total",
                                            "Times the decision breaker opened (conservative mode entered)",
                                            registry=r)
        self.decisions_skipped_conservative = Counter("tolaria_decisions_skipped_conservative_total",
                                                      "Steps that did not ask Tamiyo (conservative mode)",
                                                      registry=r)
        # emergencies
        self.emergency_level = Gauge("tolaria_emergency_level", "Current EmergencyLevel (0 none .. 4 HALT)",
                                     registry=r)
        self.emergency_halt = Gauge("tolaria_emergency_halt", "1 once HALT was reached", registry=r)
        self.emergency_escalations = Counter("tolaria_emergency_escalations_total", "Level increases", ["level"],
                                             registry=r)
        self.emergency_ignored = Counter("tolaria_emergency_ignored_total",
                                         "Requests at or below the current level (levels only go up)", registry=r)
        self.emergency_published = Counter("tolaria_emergency_broadcasts_total",
                                           "EmergencySignals written to the emergency lane", registry=r)
        self.emergency_rate_limited = Counter("tolaria_emergency_rate_limited_total",
                                              "Signals held back by TOLARIA_EMERGENCY_BYPASS_MAX_PER_MIN", registry=r)
        self.emergency_publish_failures = Counter("tolaria_emergency_publish_failures_total",
                                                  "Publish attempts that failed (Redis unreachable)", registry=r)
        self.emergency_spilled = Counter("tolaria_emergency_spilled_total", "Signals spilled to the disk queue",
                                         registry=r)
        self.emergency_dropped = Counter("tolaria_emergency_dropped_total", "Signals lost, by reason", ["reason"],
                                         registry=r)
        self.emergency_pending = Gauge("tolaria_emergency_pending", "Signals waiting (memory and disk)", ["where"],
                                       registry=r)

    def record_level(self, level: int) -> None:
        self.emergency_level.set(level)
        self.emergency_escalations.labels(pb.EmergencyLevel.Name(pb.EmergencyLevel.ValueType(level))).inc()
        if level >= pb.EMERGENCY_LEVEL_HALT:
            self.emergency_halt.set(1)
