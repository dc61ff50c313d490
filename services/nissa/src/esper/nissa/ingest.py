"""The stateful core: applies mapped telemetry to the metrics, the SLO windows and the alert engine.

The service's handlers call :meth:`Ingestor.ingest_telemetry` / :meth:`Ingestor.ingest_field_report`
per message and :meth:`Ingestor.tick` every evaluation interval; time is passed in, so tests drive
it with known clocks. Alert transitions are logged here and returned for the service to announce.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from esper.core.logging import get_logger
from esper.leyline import pb
from esper.nissa.alerts import AlertEngine, AlertRule, AlertTransition
from esper.nissa.labels import BoundedKeys
from esper.nissa.mapping import TelemetryUpdate
from esper.nissa.metrics import NissaMetrics
from esper.nissa.rules import (
    SIGNAL_BREAKERS_OPEN,
    SIGNAL_DEAD_LETTERS,
    SIGNAL_EMERGENCIES_PER_MIN,
    SIGNAL_TAMIYO_TIMEOUTS,
    SLO_DECISIONS,
    SLO_TRAINING,
    default_rules,
    default_slos,
    slo_signal,
)
from esper.nissa.settings import NissaSettings
from esper.nissa.slo import Slo, SloSpec, SloStatus, WindowCounts
from esper.nissa.steps import StepTracker

log = get_logger("esper.nissa.ingest")


@dataclass(slots=True)
class _Interval:
    """Counts since the last evaluation tick (the rate alerts' inputs)."""

    tamiyo_timeouts: int = 0
    dead_letters: int = 0


class Ingestor:
    @classmethod
    def from_settings(cls, settings: NissaSettings, registry: CollectorRegistry) -> Ingestor:
        """The fleet's rules and SLOs with their metrics on ``registry``."""
        rules, slos = default_rules(settings), default_slos(settings)
        metrics = NissaMetrics(registry, rules, tuple(s.name for s in slos))
        return cls(metrics, rules=rules, slos=slos, max_seed_series=settings.max_seed_series,
                   max_breaker_series=settings.max_breaker_series)

    def __init__(self, metrics: NissaMetrics, *, rules: tuple[AlertRule, ...], slos: tuple[SloSpec, ...],
                 max_seed_series: int = 64, max_breaker_series: int = 32) -> None:
        self.metrics = metrics
        self.engine = AlertEngine(rules)
        self.slos = {spec.name: Slo(spec) for spec in slos}
        self.steps = StepTracker()
        self.breakers: dict[str, int] = {}
        self._breaker_keys = BoundedKeys(max_breaker_series)
        self._seed_keys = BoundedKeys(max_seed_series)
        self._stages_seen = set(metrics.stages)
        self._interval = _Interval()
        self._emergencies = WindowCounts(60.0, buckets=12)  # the emergency rate is per minute, whatever the tick
        self._unmatched_bad_steps = 0
        self.packets = 0
        self.last_packet_ms: int | None = None

    # -- per message -------------------------------------------------------------------------------

    def ingest_telemetry(self, u: TelemetryUpdate, now_ms: int) -> list[AlertTransition]:
        m = self.metrics
        self.packets += 1
        self.last_packet_ms = now_ms
        m.packets.labels(u.source).inc()
        for event, level in u.events:
            m.events.labels(u.source, event, level).inc()
        if u.dead_letters:
            m.dead_letters.labels(u.source).inc(u.dead_letters)
            self._interval.dead_letters += u.dead_letters
        if u.own:  # Nissa's own alert events: counted, never fed back into gauges or alerts
            return []
        for key, value in u.gauges.items():
            m.gauges[key].set(value)
        if u.seeds_by_stage is not None:
            self._census(u.seeds_by_stage, u.seed_alpha)
        self._counters(u)
        if u.emergencies:
            self._emergencies.add(now_ms / 1000.0, bad=len(u.emergencies))
        self._slo_samples(u, now_ms)
        transitions = self.engine.observe_many(u.samples, now_ms)
        if u.breakers:
            transitions += self._breakers(u.breakers, now_ms)
        self._apply(transitions)
        return transitions

    def ingest_field_report(self, outcome: str) -> None:
        self.metrics.field_reports.labels(outcome).inc()

    def record_error(self, reason: str) -> None:
        self.metrics.ingest_errors.labels(reason).inc()

    def _counters(self, u: TelemetryUpdate) -> None:
        m = self.metrics
        if u.decision is not None:
            m.decisions.labels(u.decision.action).inc()
            if u.decision.inference_latency_s is not None:
                m.decision_latency.observe(u.decision.inference_latency_s)
        if u.tamiyo_timeouts:
            m.tamiyo_timeouts.inc(u.tamiyo_timeouts)
            self._interval.tamiyo_timeouts += u.tamiyo_timeouts
        for level in u.emergencies:
            m.emergencies.labels(level).inc()
        if u.isolation_violations:
            m.isolation_violations.inc(u.isolation_violations)
        if u.seeds_fossilized:
            m.seeds_fossilized.inc(u.seeds_fossilized)
        if u.seeds_culled:
            m.seeds_culled.inc(u.seeds_culled)

    def _census(self, by_stage: Mapping[str, int], alpha: Mapping[str, float]) -> None:
        self._stages_seen.update(by_stage)  # e.g. `unknown`: reset to 0 once no seed is in it
        for stage in self._stages_seen:
            self.metrics.seeds.labels(stage).set(by_stage.get(stage, 0))
        for seed_id in list(self._seed_keys):
            if seed_id not in alpha:  # slot gone from the census: drop its series
                self._seed_keys.discard(seed_id)
                self.metrics.seed_alpha.remove(seed_id)
        for seed_id, value in alpha.items():
            for evicted in self._seed_keys.admit(seed_id):
                self.metrics.seed_alpha.remove(evicted)
            self.metrics.seed_alpha.labels(seed_id).set(value)

    def _slo_samples(self, u: TelemetryUpdate, now_ms: int) -> None:
        now_s = now_ms / 1000.0
        decisions = self.slos.get(SLO_DECISIONS)
        if decisions is not None:
            good = 1 if u.decision is not None and u.decision.action != "failure" else 0
            decisions.record(now_s, good=good, bad=u.tamiyo_timeouts + u.inference_timeouts)
        training = self.slos.get(SLO_TRAINING)
        if training is not None:
            # Bad steps (Tolaria's events) and step progress (Tamiyo's packets) arrive separately:
            # a bad step is counted at once and later deducted from the progress that includes it.
            steps = self.steps.advance(*u.step) if u.step is not None else 0
            self._unmatched_bad_steps += u.step_emergencies
            matched = min(steps, self._unmatched_bad_steps)
            self._unmatched_bad_steps -= matched
            training.record(now_s, good=steps - matched, bad=u.step_emergencies)

    def _breakers(self, states: Mapping[str, int], now_ms: int) -> list[AlertTransition]:
        for key, state in states.items():
            for evicted in self._breaker_keys.admit(key):
                self.breakers.pop(evicted, None)
                self.metrics.breaker_state.remove(evicted)
            self.breakers[key] = state
            self.metrics.breaker_state.labels(key).set(state)
        return self.engine.observe(SIGNAL_BREAKERS_OPEN, float(self.open_breakers()), now_ms)

    def open_breakers(self) -> int:
        return sum(1 for s in self.breakers.values() if s == pb.CIRCUIT_STATE_OPEN)

    # -- per evaluation interval -------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[AlertTransition]:
        """Counts since the last tick, emergencies in the last minute, SLO gauges and burn alerts."""
        iv, self._interval = self._interval, _Interval()
        samples = [
            (SIGNAL_TAMIYO_TIMEOUTS, float(iv.tamiyo_timeouts)),
            (SIGNAL_DEAD_LETTERS, float(iv.dead_letters)),
            (SIGNAL_EMERGENCIES_PER_MIN, self._emergencies.totals(now_ms / 1000.0)[1]),
            (SIGNAL_BREAKERS_OPEN, float(self.open_breakers())),
        ]
        for status in self.slo_statuses(now_ms):
            self.metrics.slo_burn.labels(status.name).set(status.burn_rate)
            self.metrics.slo_budget.labels(status.name).set(status.budget_remaining)
            samples.append((slo_signal(status.name), status.alert_burn))
        transitions = self.engine.observe_many(samples, now_ms)
        self._apply(transitions)
        return transitions

    def slo_statuses(self, now_ms: int) -> list[SloStatus]:
        return [slo.status(now_ms / 1000.0) for slo in self.slos.values()]

    # -- alert bookkeeping -------------------------------------------------------------------------

    def _apply(self, transitions: list[AlertTransition]) -> None:
        for t in transitions:
            rule = t.alert.rule
            self.metrics.alert_firing.labels(rule.name, rule.severity).set(1 if t.fired else 0)
            if t.fired:
                self.metrics.alerts_fired.labels(rule.name).inc()
                log.warning("alert firing", alert=rule.name, severity=rule.severity, routes=list(rule.routes),
                            condition=rule.condition, value=t.value, samples=t.alert.samples)
            else:
                log.info("alert cleared", alert=rule.name, severity=rule.severity, value=t.value,
                         fired_at_ms=t.alert.fired_at_ms)
