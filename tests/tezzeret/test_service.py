"""Tezzeret over the real bus: a forge pass registers kernels and announces them on `kernel.ready`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from esper.karn import CATALOGUE
from esper.leyline import CHANNELS, decode_envelope, pb, unpack_as
from esper.oona import OonaSettings
from esper.tezzeret.service import TezzeretService
from esper.tezzeret.settings import TezzeretSettings
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until


async def test_forge_pass_is_announced(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    observer = await make_client("observer")
    s = TezzeretSettings(**{**settings.model_dump(), "database_url": f"sqlite:///{tmp_path}/catalog.db",
                            "artifact_dir": tmp_path / "artifacts", "slots": ["v64"], "device": "cpu"})
    service = TezzeretService(s, registry=CollectorRegistry())
    await service.client.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async def passed() -> bool:
            return service.last is not None

        await wait_until(passed, timeout_s=60, what="one forge pass")
    finally:
        stop.set()
        await task
        service.library.close()
        await service.client.close()
    fitting = sorted(f"{b}@v64" for b, t in CATALOGUE.items() if "vector" in t.slot_kinds)
    assert service.last is not None and service.last.failed == {}
    rows = await observer.redis.xrange(CHANNELS["kernel.ready"].normal_stream)
    updates = [unpack_as(decode_envelope(f[b"payload"]), pb.KernelCatalogUpdate) for _, f in rows]
    assert sorted(u.blueprint_id for u in updates) == fitting
    assert all(u.checksum and u.artifact_ref == f"sha256:{u.checksum}" and u.compile_ms > 0 for u in updates)
