"""Test helpers: a Tamiyo service running in-process against the real test Redis; the blueprint-library
stand-in (`urza_stand_in`) is the drills' own, so tests and drills exercise the same catalogue."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from esper.core.lifecycle import tune_gc_for_hot_loop
from esper.leyline import pb
from esper.oona import OonaSettings
from esper.tamiyo.service import TamiyoService
from esper.tamiyo.settings import TamiyoSettings
from esper.tamiyo.standin import sample_catalog, sample_packet, urza_stand_in

__all__ = ["catalog", "packet", "running_tamiyo", "tamiyo_settings", "urza_stand_in"]


def catalog() -> pb.BlueprintCatalog:
    return sample_catalog()


def packet(step: int = 1, *, loss_delta: float = -0.01, run: str = "run1") -> pb.SystemStatePacket:
    return sample_packet(f"pkt-{step}", step, run=run, loss_delta=loss_delta)


def tamiyo_settings(bus: OonaSettings, var_dir: Path, **overrides: object) -> TamiyoSettings:
    base = bus.model_dump()
    base.update(var_dir=var_dir, policy_dir=var_dir / "policies", enable_fault_injection=True, block_ms=20,
                breaker_cooldown_ms=300.0, metadata_timeout_ms=200.0)
    base.update(overrides)
    return TamiyoSettings(**base)


@asynccontextmanager
async def running_tamiyo(settings: TamiyoSettings) -> AsyncIterator[TamiyoService]:
    """As `serve()` runs it, GC tuning included: the suite's process holds a large heap by the time
    these tests run, and a full collection walking it can stall the loop past a 60 ms budget."""
    service = TamiyoService(settings)
    await service.client.connect()
    threshold = gc.get_threshold()
    tune_gc_for_hot_loop()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.consumer.run(stop)), asyncio.create_task(service.catalog.run(stop)),
             asyncio.create_task(service.publish_field_reports(stop, poll_s=0.05)),
             asyncio.create_task(service.policy_consumer.run(stop))]
    try:
        yield service
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        service.worker.close()
        service.close_outbox()
        await service.client.close()
        gc.unfreeze()
        gc.set_threshold(*threshold)
