"""`python -m esper.urabrask`: the crucible process.

Every `URABRASK_PRODUCER_INTERVAL_S` (and once at start) it probes the kernels whose blueprint has no
BSDS for its current artifact, stores each sheet in Urza's catalogue and announces it on `bsds`
(`BSDSIssued`; `BSDSFailed` when an artifact cannot even be loaded). Probing runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch
from prometheus_client import CollectorRegistry, Counter

from esper.core.clock import sleep_or_stop
from esper.core.logging import get_logger
from esper.leyline import pb
from esper.oona import OonaClient, OonaMetrics, PublishError
from esper.oona.runner import run_bus_service
from esper.urabrask.producer import ProducerReport, produce_once
from esper.urabrask.settings import UrabraskSettings
from esper.urza.library import UrzaLibrary

log = get_logger("esper.urabrask.service")


class UrabraskService:
    def __init__(self, settings: UrabraskSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.client = OonaClient.from_settings(settings, sender="urabrask", metrics=OonaMetrics(self.registry))
        use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.library = UrzaLibrary(settings.db_path, settings.artifact_dir, busy_timeout_ms=settings.busy_timeout_ms)
        self.issued = Counter("urabrask_bsds_issued", "Safety sheets issued", ["hazard_band"], registry=self.registry)
        self.failed = Counter("urabrask_bsds_failed", "Kernels that could not be probed", ["reason"],
                              registry=self.registry)
        self.last: ProducerReport | None = None

    def produce(self) -> ProducerReport:
        s = self.settings
        return produce_once(self.library, device=self.device, seed=s.seed, only_safe_tier=s.only_safe_tier,
                            limit=s.topn_per_cycle)

    async def announce(self, report: ProducerReport) -> None:
        for sheet in report.issued:
            self.issued.labels(pb.HazardBand.Name(sheet.hazard_band)).inc()
        for reason in report.failed.values():
            self.failed.labels(reason).inc()
        if not self.settings.oona_publish_enabled:
            return
        messages = [pb.BSDSIssued(bsds=s) for s in report.issued]
        failures = [pb.BSDSFailed(blueprint_id=b, reason=r) for b, r in report.failed.items()]
        try:
            if messages:
                await self.client.publish_many("bsds", messages)
            if failures:
                await self.client.publish_many("bsds", failures)
        except PublishError as e:  # the sheets are in the catalogue already; only the announcement is lost
            log.warning("bsds announcement not sent", error=str(e))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            report = await asyncio.to_thread(self.produce)
            self.last = report
            log.info("crucible pass", issued=len(report.issued), failed=len(report.failed), skipped=report.skipped)
            await self.announce(report)
            await sleep_or_stop(stop, self.settings.producer_interval_s)

    def health(self) -> tuple[bool, Mapping[str, object]]:
        last = self.last
        return True, {"device": str(self.device), "issued_last_pass": None if last is None else len(last.issued),
                      "failed_last_pass": None if last is None else dict(last.failed)}


async def serve(settings: UrabraskSettings) -> int:
    service = UrabraskService(settings)
    return await run_bus_service("urabrask", settings, client=service.client, registry=service.registry,
                                 health=service.health, loops=lambda stop: [service.run(stop)],
                                 close=service.library.close, ready={"device": str(service.device)})
