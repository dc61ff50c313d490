"""`python -m esper.tezzeret`: the forge process.

Every `TEZZERET_INTERVAL_S` (and once at start) it compiles whatever Karn template and slot has no
current kernel in Urza, registers the artifacts, and announces each on `kernel.ready` as a
`KernelCatalogUpdate`; a blueprint that cannot be compiled is a `compile_failed` telemetry event
(and a metric), never a silent gap. torch and SQLite work runs in a worker thread, off the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch
from prometheus_client import CollectorRegistry

from esper.core.clock import sleep_or_stop
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.karn.template import SlotShape
from esper.leyline import pb
from esper.oona import OonaClient, OonaMetrics, PublishError
from esper.oona.runner import run_bus_service
from esper.tezzeret.forge import ForgeReport, forge_once
from esper.tezzeret.metrics import TezzeretMetrics
from esper.tezzeret.settings import TezzeretSettings
from esper.urza.library import UrzaLibrary
from esper.urza.records import catalog_update

log = get_logger("esper.tezzeret.service")


def pick_device(setting: str) -> torch.device:
    return torch.device("cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu")


class TezzeretService:
    def __init__(self, settings: TezzeretSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = TezzeretMetrics(self.registry)
        self.client = OonaClient.from_settings(settings, sender="tezzeret", metrics=OonaMetrics(self.registry))
        self.device = pick_device(settings.device)
        self.slots = [SlotShape.from_key(k) for k in settings.slots]
        self.library = UrzaLibrary(settings.db_path, settings.artifact_dir, busy_timeout_ms=settings.busy_timeout_ms)
        self.last: ForgeReport | None = None

    def forge(self) -> ForgeReport:
        s = self.settings
        return forge_once(self.library, self.slots, device=self.device, compile_enabled=s.enable_compile,
                          seed=s.seed, max_attempts=s.max_attempts, metrics=self.metrics)

    async def announce(self, report: ForgeReport) -> None:
        """`KernelCatalogUpdate` per new kernel; failures as telemetry. A refused publish is logged:
        the kernel is registered either way, and Kasmina fetches through Urza, not these announcements."""
        events = [build_event("compile_failed", level=pb.TELEMETRY_LEVEL_WARNING, description=f"{kid}: {reason}",
                              reason=reason, kernel_id=kid) for kid, reason in report.failed.items()]
        try:
            if report.registered:
                await self.client.publish_many("kernel.ready", [catalog_update(r) for r in report.registered])
            if events:
                await self.client.publish("telemetry", build_telemetry_packet("tezzeret", events=events))
        except PublishError as e:
            log.warning("forge announcement not sent", error=str(e))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            report = await asyncio.to_thread(self.forge)
            self.last = report
            log.info("forge pass", registered=len(report.registered), current=len(report.current),
                     failed=len(report.failed))
            await self.announce(report)
            await sleep_or_stop(stop, self.settings.interval_s)

    def health(self) -> tuple[bool, Mapping[str, object]]:
        last = self.last
        return True, {"device": str(self.device), "slots": self.settings.slots,
                      "kernels": None if last is None else len(last.registered) + len(last.current),
                      "failed": None if last is None else dict(last.failed)}


async def serve(settings: TezzeretSettings) -> int:
    service = TezzeretService(settings)
    return await run_bus_service("tezzeret", settings, client=service.client, registry=service.registry,
                                 health=service.health, loops=lambda stop: [service.run(stop)],
                                 close=service.library.close,
                                 ready={"device": str(service.device), "slots": settings.slots})
