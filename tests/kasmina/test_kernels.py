"""KernelClient against a real Urza over a real Redis: success, cache hit, missing kernel, tampered
artifact, Urza not running, and the breaker. Failures are typed; there is never a fallback kernel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from esper.kasmina import KernelClient, KernelFetchError
from esper.leyline import pb
from esper.oona import OonaSettings
from esper.urza.store import ArtifactStore
from tests.conftest import ClientFactory
from tests.kasmina._urza import SLOT, forge
from tests.urza._service import running_urza, urza_settings


async def _client(make_client: ClientFactory, var: Path, **kw: object) -> KernelClient:
    bus = await make_client("kasmina")
    return KernelClient(bus, ArtifactStore(var / "artifacts"), training_run_id="run-k", **kw)  # type: ignore[arg-type]


async def test_fetch_then_cache_hit(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    (record,) = forge(tmp_path, "BP002").registered
    client = await _client(make_client, tmp_path)
    async with running_urza(urza_settings(settings, tmp_path)) as urza:
        first = await client.fetch("BP002", SLOT)
        second = await client.fetch("BP002@v8", SLOT)
    assert (first.kernel_id, first.blueprint_id, first.checksum) == ("BP002@v8", "BP002", record.checksum)
    assert first.guard_digest == record.guard_digest and not first.cache_hit and second.cache_hit
    assert client.stats.loads == 1 and client.stats.cache_hits == 1 and client.stats.requests == 2
    assert first.module is not second.module  # every seed gets its own module
    x = SLOT.example_input(4)
    first.module.eval()
    second.module.eval()
    assert torch.equal(first.module(x), second.module(x))  # the same verified weights
    assert urza.stats.ready == 2 and client.breaker.state == pb.CIRCUIT_STATE_CLOSED


async def test_cache_is_lru_and_bounded(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    forge(tmp_path, "BP001", "BP002")
    client = await _client(make_client, tmp_path, cache_size=1)
    async with running_urza(urza_settings(settings, tmp_path)):
        await client.prefetch("BP001", SLOT)
        await client.fetch("BP002", SLOT)
        again = await client.fetch("BP001", SLOT)  # evicted by BP002
    assert not again.cache_hit and client.stats.loads == 3 and client.cache_len == 1
    assert client.clear_cache() == 1 and client.cache_len == 0


async def test_missing_kernel(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    forge(tmp_path, "BP002")
    client = await _client(make_client, tmp_path)
    async with running_urza(urza_settings(settings, tmp_path)):
        with pytest.raises(KernelFetchError) as info:
            await client.fetch("BP003", SLOT)
    assert info.value.reason == "artifact_not_found" and info.value.kernel_id == "BP003@v8"
    assert client.breaker.failures == 0  # a kernel that does not exist says nothing about Urza's health


async def test_tampered_artifact(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    (record,) = forge(tmp_path, "BP002").registered
    path = ArtifactStore(tmp_path / "artifacts").path_for(record.artifact_ref)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    client = await _client(make_client, tmp_path)
    async with running_urza(urza_settings(settings, tmp_path)):
        with pytest.raises(KernelFetchError) as info:
            await client.fetch("BP002", SLOT)
    assert info.value.reason == "checksum_mismatch" and client.stats.loads == 0


async def test_local_verification_catches_what_urza_promised_wrong(make_client: ClientFactory,
                                                                     tmp_path: Path) -> None:
    (record,) = forge(tmp_path, "BP002").registered
    client = await _client(make_client, tmp_path)
    good = pb.KernelArtifactReady(request_id="r", blueprint_id="BP002@v8", artifact_ref=record.artifact_ref,
                                  checksum=record.checksum, guard_digest=record.guard_digest)
    assert client.load_ready(good).kernel_id == "BP002@v8"
    for field, value, reason in (("checksum", "0" * 64, "checksum_mismatch"),
                                 ("guard_digest", "f" * 64, "artifact_format")):
        bad = pb.KernelArtifactReady()
        bad.CopyFrom(good)
        setattr(bad, field, value)
        with pytest.raises(KernelFetchError) as info:
            client.load_ready(bad)
        assert info.value.reason == reason
    (tmp_path / "artifacts" / record.checksum[:2] / record.checksum).unlink()
    with pytest.raises(KernelFetchError) as info:
        client.load_ready(good)
    assert info.value.reason == "missing_artifact"


async def test_urza_not_running_times_out_and_opens_the_breaker(make_client: ClientFactory,
                                                                 tmp_path: Path) -> None:
    client = await _client(make_client, tmp_path, timeout_ms=100.0)
    for _ in range(3):
        with pytest.raises(KernelFetchError) as info:
            await client.fetch("BP002", SLOT)
        assert info.value.reason == "timeout"
    assert client.breaker.state == pb.CIRCUIT_STATE_OPEN
    with pytest.raises(KernelFetchError) as info:
        await client.fetch("BP002", SLOT)
    assert info.value.reason == "breaker_open" and client.stats.requests == 3


async def test_kernel_for_another_slot_is_refused(make_client: ClientFactory, tmp_path: Path) -> None:
    client = await _client(make_client, tmp_path)
    with pytest.raises(KernelFetchError) as info:
        await client.fetch("BP002@v64", SLOT)
    assert info.value.reason == "slot_mismatch" and client.stats.requests == 0


def _own_view(tmp_path: Path, artifact_ref: str) -> tuple[Path, Path]:
    """Kasmina's own view of the shared artifact directory (a mount), and its path for the artifact."""
    mine = tmp_path / "kasmina_mount"
    shutil.copytree(tmp_path / "artifacts", mine)
    return mine, ArtifactStore(mine).path_for(artifact_ref)


async def test_an_os_error_reading_the_artifact_is_typed_and_counts_for_the_breaker(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    """A broken mount (here a symlink loop: ELOOP) escaped as a bare OSError, uncounted by the breaker."""
    (record,) = forge(tmp_path, "BP002").registered
    mine, path = _own_view(tmp_path, record.artifact_ref)
    path.unlink()
    os.symlink(path, path)
    client = KernelClient(await make_client("kasmina"), ArtifactStore(mine), training_run_id="run-k")
    async with running_urza(urza_settings(settings, tmp_path)):
        for _ in range(3):
            with pytest.raises(KernelFetchError) as info:
                await client.fetch("BP002", SLOT)
            assert info.value.reason == "artifact_io"
    assert client.breaker.state == pb.CIRCUIT_STATE_OPEN and client.stats.errors == 3


async def test_a_hung_artifact_read_fails_the_fetch_at_the_deadline(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    """The deadline covered only Urza's reply: a read that never returned (a FIFO standing in for a
    stalled network mount) left the germination waiting for ever, with nothing reported."""
    (record,) = forge(tmp_path, "BP002").registered
    mine, path = _own_view(tmp_path, record.artifact_ref)
    path.unlink()
    os.mkfifo(path)
    client = KernelClient(await make_client("kasmina"), ArtifactStore(mine), training_run_id="run-k",
                          timeout_ms=300.0)
    try:
        async with running_urza(urza_settings(settings, tmp_path)):
            with pytest.raises(KernelFetchError) as info:
                await client.fetch("BP002", SLOT)
        assert info.value.reason == "timeout" and "read" in info.value.detail
    finally:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader thread finish (EOF)
