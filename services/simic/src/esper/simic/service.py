"""`python -m esper.simic`: stores every field report from both lanes of `field_report` (group `simic`).

A report that cannot be stored (no id, no `issued_at`) is dead-lettered with a `field_report_rejected`
event; a repeat is acknowledged and counted (`simic_reports_total{result="duplicate"}`). SQLite work runs
in a worker thread. Training rounds run on their own schedule (rounds.py: every
`SIMIC_TRAIN_INTERVAL_S`, given enough new reports; an accepted candidate is published) or by hand
(`python -m esper.simic train --publish`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from esper.core.clock import now_ms, sleep_or_stop
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaClient, OonaMetrics, PublishError, Reject
from esper.oona.runner import run_bus_service
from esper.simic.replay import MissingIssuedAtError, ReplayStore
from esper.simic.rounds import RoundLoop
from esper.simic.settings import SimicSettings

log = get_logger("esper.simic.service")


class SimicService:
    def __init__(self, settings: SimicSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.client = OonaClient.from_settings(settings, sender="simic", metrics=OonaMetrics(self.registry))
        self.store = ReplayStore(settings.replay_path)
        self.consumer = Consumer(self.client, "field_report", group=settings.group, handler=self.handle,
                                 name=f"simic-{settings.instance_id}",
                                 freshness_window_ms=settings.field_report_freshness_ms)
        self.reports = Counter("simic_reports", "Field reports received", ["result"], registry=self.registry)
        self.stored = Gauge("simic_replay_reports", "Reports in the replay store", registry=self.registry)
        self.rounds = RoundLoop(settings, self.client, self.store, self.registry)

    async def handle(self, delivery: Delivery) -> None:
        report = delivery.message_as(pb.FieldReport)
        try:
            added = await asyncio.to_thread(self.store.add, report)
        except MissingIssuedAtError as e:
            self.reports.labels("rejected").inc()
            event = build_event("field_report_rejected", level=pb.TELEMETRY_LEVEL_WARNING, description=str(e)[:200],
                                report_id=report.report_id)
            try:
                await self.client.publish("telemetry", build_telemetry_packet("simic", events=[event]))
            except PublishError as pe:
                log.warning("simic telemetry not sent", error=str(pe))
            raise Reject(str(e)) from e
        self.reports.labels("stored" if added else "duplicate").inc()
        return None

    async def housekeeping(self, stop: asyncio.Event, *, interval_s: float = 60.0) -> None:
        """Retention by `issued_at`, and the store gauge."""
        while not stop.is_set():
            pruned = await asyncio.to_thread(self.store.prune, now_ms=now_ms(),
                                             retention_hours=self.settings.retention_hours)
            if pruned:
                log.info("replay store pruned", reports=pruned)
            self.stored.set(await asyncio.to_thread(self.store.count))
            await sleep_or_stop(stop, interval_s)

    def health(self) -> tuple[bool, Mapping[str, object]]:
        return True, {"replay_path": str(self.settings.replay_path)}


async def serve(settings: SimicSettings) -> int:
    service = SimicService(settings)
    return await run_bus_service(
        "simic", settings, client=service.client, registry=service.registry, health=service.health,
        loops=lambda stop: [service.consumer.run(stop), service.housekeeping(stop), service.rounds.run(stop)],
        close=service.store.close,
        ready={"replay": str(settings.replay_path), "group": settings.group})
