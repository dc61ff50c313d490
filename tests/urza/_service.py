"""Test helpers: an Urza service running in-process against the real test Redis and real SQLite files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from esper.core.clock import now_ms
from esper.leyline import pb
from esper.oona import OonaSettings
from esper.urza.service import UrzaService
from esper.urza.settings import UrzaSettings


def urza_settings(bus: OonaSettings, var: Path, **overrides: object) -> UrzaSettings:
    base = bus.model_dump()
    base.update(database_url=f"sqlite:///{var / 'catalog.db'}", artifact_dir=var / "artifacts", seed_karn=False,
                block_ms=20)
    base.update(overrides)
    return UrzaSettings(**base)


@asynccontextmanager
async def running_urza(settings: UrzaSettings) -> AsyncIterator[UrzaService]:
    service = UrzaService(settings)
    await service.seed()
    await service.client.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await task
        await service.close()


def kernel_request(request_id: str, blueprint_id: str, *, issued_at_ms: int | None = None,
                   run: str = "run1") -> pb.KernelPrefetchRequest:
    req = pb.KernelPrefetchRequest(request_id=request_id, blueprint_id=blueprint_id, training_run_id=run)
    if issued_at_ms != 0:
        req.issued_at.FromMilliseconds(now_ms() if issued_at_ms is None else issued_at_ms)
    return req
