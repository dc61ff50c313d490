"""Urabrask's producer and service: sheets measured on the current artifact, stored in Urza's
catalogue, announced on `bsds`; unusable artifacts reported as `BSDSFailed`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from esper.karn import CATALOGUE, SlotShape
from esper.leyline import CHANNELS, decode_envelope, pb, unpack
from esper.oona import OonaSettings
from esper.tezzeret.forge import forge_once
from esper.urabrask.producer import BSDS_KERNEL_EXTRA, due_kernels, produce_once
from esper.urabrask.service import UrabraskService
from esper.urabrask.settings import UrabraskSettings
from esper.urza.library import UrzaLibrary
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until

CPU = torch.device("cpu")
V64 = SlotShape(64)
PICK = ["BP002", "BP045", "BP049"]


def _library(tmp: Path, seed: int = 0) -> UrzaLibrary:
    lib = UrzaLibrary(tmp / "catalog.db", tmp / "artifacts")
    forge_once(lib, [V64], device=CPU, compile_enabled=False, seed=seed, max_attempts=1,
               templates=[CATALOGUE[b] for b in PICK])
    return lib


def test_sheets_follow_the_current_artifact(tmp_path: Path) -> None:
    with _library(tmp_path) as lib:
        first = produce_once(lib, device=CPU, seed=0, only_safe_tier=False)
        bands = {s.blueprint_id: s.hazard_band for s in first.issued}
        assert bands["BP002"] in (pb.HAZARD_BAND_LOW, pb.HAZARD_BAND_MEDIUM)
        assert bands["BP045"] == bands["BP049"] == pb.HAZARD_BAND_CRITICAL
        entries = {e.descriptor.blueprint_id: e for e in lib.catalog_entries()}
        assert entries["BP045"].bsds.handling_class == pb.HANDLING_CLASS_QUARANTINE
        assert due_kernels(lib, only_safe_tier=False) == []
        assert produce_once(lib, device=CPU, seed=0, only_safe_tier=False).issued == []
        # A sheet measured on another artifact (a recompile) is not current: the kernel is due again.
        record = lib.kernel("BP002@v64")
        lib.set_extra("BP002", BSDS_KERNEL_EXTRA, "some-older-artifact")
        assert [k.kernel_id for _, k in due_kernels(lib, only_safe_tier=False)] == [record.kernel_id]
        assert [d.blueprint_id for d, _ in due_kernels(lib, only_safe_tier=True)] == ["BP002"]


def test_tampered_artifact_is_a_failure_not_a_sheet(tmp_path: Path) -> None:
    with _library(tmp_path) as lib:
        record = lib.kernel("BP045@v64")
        path = lib.store.path_for(record.artifact_ref)
        path.chmod(0o644)
        path.write_bytes(path.read_bytes() + b"tampered")
        report = produce_once(lib, device=CPU, seed=0, only_safe_tier=False)
        assert report.failed == {"BP045": "checksum_mismatch"}
        assert "BP045" not in {s.blueprint_id for s in report.issued}
        assert not lib.catalog_entries(["BP045"])[0].HasField("bsds")


async def test_service_announces_sheets_and_failures(make_client: ClientFactory, settings: OonaSettings,
                                                     tmp_path: Path) -> None:
    observer = await make_client("observer")
    with _library(tmp_path) as lib:
        record = lib.kernel("BP049@v64")
        lib.store.path_for(record.artifact_ref).unlink()
    s = UrabraskSettings(**{**settings.model_dump(), "database_url": f"sqlite:///{tmp_path}/catalog.db",
                            "artifact_dir": tmp_path / "artifacts", "device": "cpu"})
    service = UrabraskService(s, registry=CollectorRegistry())
    await service.client.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async def passed() -> bool:
            return service.last is not None

        await wait_until(passed, timeout_s=60, what="one crucible pass")
    finally:
        stop.set()
        await task
        service.library.close()
        await service.client.close()
    rows = await observer.redis.xrange(CHANNELS["bsds"].normal_stream)
    messages = [unpack(decode_envelope(f[b"payload"])) for _, f in rows]
    issued = sorted(m.bsds.blueprint_id for m in messages if isinstance(m, pb.BSDSIssued))
    failed = [(m.blueprint_id, m.reason) for m in messages if isinstance(m, pb.BSDSFailed)]
    assert issued == ["BP002", "BP045"]
    assert failed == [("BP049", "missing_artifact")]
    assert service.registry.get_sample_value("urabrask_bsds_failed_total", {"reason": "missing_artifact"}) == 1
