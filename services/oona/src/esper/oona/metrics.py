"""Prometheus metrics of the Oona client, built on an injected registry (a fresh one per test).

Names follow Prometheus conventions (ARCHITECTURE §8): `_total` counters, `_seconds` histograms
with buckets around the sub-millisecond budgets, bounded label values (channel, lane, reason).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esper.leyline import CHANNELS, Lane

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class OonaMetrics:
    """Container of the client's metrics with intent-named methods (faststream's manager style)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.published = Counter("oona_publish_total", "Envelopes written", ["channel", "lane"], registry=r)
        self.publish_errors = Counter(
            "oona_publish_errors_total", "Publishes that failed", ["channel", "reason"], registry=r
        )
        self.publish_latency = Histogram(
            "oona_publish_seconds", "XADD round trip", ["lane"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.consumed = Counter(
            "oona_consume_total", "Entries handled", ["channel", "lane", "outcome"], registry=r
        )
        self.handler_latency = Histogram(
            "oona_handler_seconds", "Handler run time", ["channel"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.dead_letters = Counter(
            "oona_dead_letter_total", "Entries moved to oona.deadletter", ["channel", "reason"], registry=r
        )
        self.reclaimed = Counter("oona_reclaimed_total", "Entries taken over with XAUTOCLAIM", ["channel"], registry=r)
        self.trimmed_pending = Counter(
            "oona_pending_trimmed_total", "Pending entries deleted by trimming before processing", ["channel"],
            registry=r,
        )
        self.duplicates = Counter(
            "oona_duplicates_total", "Redeliveries of already-processed message ids (skipped)", ["channel"],
            registry=r,
        )
        self.request_latency = Histogram(
            "oona_request_seconds", "Request/reply round trip", ["channel"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.request_timeouts = Counter(
            "oona_request_timeouts_total", "Requests with no reply before the deadline", ["channel"], registry=r
        )
        self.late_replies = Counter(
            "oona_late_replies_total", "Replies that arrived after their request gave up (discarded)", registry=r
        )
        self.emergency_rate_limited = Counter(
            "oona_emergency_rate_limited_total", "Emergency publishes refused by the token bucket", ["channel"],
            registry=r,
        )
        self.telemetry_dropped = Counter(
            "oona_telemetry_dropped_total", "Bus telemetry events that could not be sent", ["reason"], registry=r
        )
        self.breaker_state = Gauge(
            "oona_breaker_state", "Leyline CircuitBreakerState (1 closed, 2 open, 3 half-open)", ["breaker"],
            registry=r,
        )
        self._publish_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.reconnects = Counter("oona_reconnects_total", "Consume loop recoveries after a Redis error", registry=r)
        # Series for rare events exist from the start at 0, so rate()/increase() see their first event.
        for name in CHANNELS:
            self.request_timeouts.labels(name)
            self.emergency_rate_limited.labels(name)

    def record_publish(self, channel: str, lane: Lane, seconds: float, count: int = 1) -> None:
        key = (channel, lane)
        children = self._publish_children.get(key)
        if children is None:  # label lookups cost ~1.5 µs each: bind once per (channel, lane)
            children = self._publish_children[key] = (self.published.labels(channel, lane),
                                                      self.publish_latency.labels(lane))
        children[0].inc(count)
        children[1].observe(seconds)

    def record_publish_error(self, channel: str, reason: str) -> None:
        self.publish_errors.labels(channel, reason).inc()

    def record_dead_letter(self, channel: str, reason: str) -> None:
        self.dead_letters.labels(channel, reason).inc()

    def record_breaker(self, name: str, state: int) -> None:
        self.breaker_state.labels(name).set(state)
