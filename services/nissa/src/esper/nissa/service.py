"""`python -m esper.nissa`: consumes both lanes of `telemetry` and `field_report` (group `nissa`),
exports `esper_*` metrics, evaluates alert rules and SLO burn, serves /metrics, /healthz and /alerts.

A message that cannot be decoded or attributed is dead-lettered (the Consumer does it on `Reject` /
`EnvelopeError`) and counted in `esper_nissa_ingest_errors_total{reason}`; the service keeps going.
Alert transitions are logged and, with `NISSA_PUBLISH_ALERT_EVENTS`, announced as `nissa` telemetry
events, which Nissa counts but never feeds back into its gauges or rules (no loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from esper.core.clock import now_ms, sleep_or_stop
from esper.core.health_server import Route
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.leyline import Lane, pb
from esper.nissa.alerts import AlertTransition
from esper.nissa.errors import MalformedTelemetryError
from esper.nissa.ingest import Ingestor
from esper.nissa.mapping import field_report_outcome, map_telemetry
from esper.nissa.routes import alerts_route
from esper.nissa.settings import NissaSettings
from esper.oona import Consumer, Delivery, OonaClient, OonaMetrics, PublishError, Reject
from esper.oona.runner import run_bus_service

log = get_logger("esper.nissa.service")

EVENT_ALERT_FIRED = "nissa.alert_fired"
EVENT_ALERT_CLEARED = "nissa.alert_cleared"
_HANDLER_REJECTED = "handler_rejected"  # counted by the handler with its own, more precise reason


class NissaService:
    def __init__(self, settings: NissaSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.client = OonaClient.from_settings(settings, sender=settings.service_name,
                                               metrics=OonaMetrics(self.registry))
        self.ingestor = Ingestor.from_settings(settings, self.registry)
        self.metrics = self.ingestor.metrics
        name = f"nissa-{settings.instance_id}"
        # Telemetry is a throughput consumer: ack once per batch (a crash repeats at most one batch).
        self.telemetry = Consumer(self.client, "telemetry", group=settings.group, handler=self.handle_telemetry,
                                  name=name, ack_mode="batch", freshness_window_ms=settings.telemetry_freshness_ms,
                                  on_dead_letter=self._dead_lettered)
        self.field_reports = Consumer(self.client, "field_report", group=settings.group,
                                      handler=self.handle_field_report, name=name,
                                      freshness_window_ms=settings.field_report_freshness_ms,
                                      on_dead_letter=self._dead_lettered)

    # -- handlers ----------------------------------------------------------------------------------

    async def handle_telemetry(self, delivery: Delivery) -> None:
        t0 = time.perf_counter()
        try:
            packet = delivery.message_as(pb.TelemetryPacket)
            update = map_telemetry(packet, lane=delivery.lane, own_source=self.settings.service_name)
        except MalformedTelemetryError as e:
            self.ingestor.record_error(e.reason)
            log.warning("telemetry refused", reason=e.reason, detail=e.detail, entry_id=delivery.entry_id)
            raise Reject(str(e)) from e
        transitions = self.ingestor.ingest_telemetry(update, now_ms())
        self.metrics.ingest_seconds.observe(time.perf_counter() - t0)
        await self._announce(transitions)

    async def handle_field_report(self, delivery: Delivery) -> None:
        t0 = time.perf_counter()
        report = delivery.message_as(pb.FieldReport)  # EnvelopeError: dead-lettered and counted by the hook
        self.ingestor.ingest_field_report(field_report_outcome(report))
        self.metrics.ingest_seconds.observe(time.perf_counter() - t0)

    def _dead_lettered(self, reason: str, detail: str, lane: Lane) -> None:
        """Bus-level refusals (bad signature, stale, undecodable payload …) of Nissa's own consumers."""
        if reason != _HANDLER_REJECTED:
            self.ingestor.record_error(reason)

    # -- evaluation --------------------------------------------------------------------------------

    async def evaluate(self, stop: asyncio.Event) -> None:
        """Every `eval_interval_s`: rate alerts, SLO gauges and burn alerts."""
        while not stop.is_set():
            await sleep_or_stop(stop, self.settings.eval_interval_s)
            await self._announce(self.ingestor.tick(now_ms()))

    async def _announce(self, transitions: list[AlertTransition]) -> None:
        if not transitions or not self.settings.publish_alert_events:
            return
        events = [_transition_event(t) for t in transitions]
        try:
            await self.client.publish("telemetry", build_telemetry_packet(self.settings.service_name, events=events))
        except PublishError as e:
            log.warning("alert events not published", error=str(e), alerts=[t.alert.rule.name for t in transitions])

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self) -> Mapping[str, Route]:
        return {"/alerts": alerts_route(self.ingestor.engine)}

    def health(self) -> tuple[bool, Mapping[str, object]]:
        last = self.ingestor.last_packet_ms
        return True, {"group": self.settings.group, "packets": self.ingestor.packets,
                      "last_packet_age_s": None if last is None else round((now_ms() - last) / 1000.0, 3),
                      "alerts_firing": [a.rule.name for a in self.ingestor.engine.active()],
                      "dead_lettered": self.telemetry.stats.dead_lettered + self.field_reports.stats.dead_lettered}


def _transition_event(t: AlertTransition) -> pb.TelemetryEvent:
    rule = t.alert.rule
    return build_event(EVENT_ALERT_FIRED if t.fired else EVENT_ALERT_CLEARED,
                       level=pb.TELEMETRY_LEVEL_WARNING if t.fired else pb.TELEMETRY_LEVEL_INFO,
                       description=f"{rule.name}: {rule.condition} (value {t.value:g})"[:200],
                       alert=rule.name, severity=rule.severity, routes=",".join(rule.routes), value=f"{t.value:g}",
                       since_ms=t.alert.since_ms)


async def serve(settings: NissaSettings) -> int:
    service = NissaService(settings)
    return await run_bus_service(
        "nissa", settings, client=service.client, registry=service.registry, health=service.health,
        loops=lambda stop: [service.telemetry.run(stop), service.field_reports.run(stop), service.evaluate(stop)],
        routes=service.routes(), ready={"group": settings.group, "metrics_port": settings.metrics_port})
