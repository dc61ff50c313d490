"""Urza over the real bus: kernel requests, catalogue queries, BSDS, stale and replayed requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from esper.core.clock import now_ms
from esper.karn.template import SlotShape
from esper.leyline import CHANNELS, decode_envelope, pb, reason_code, unpack_as
from esper.oona import OonaClient, OonaSettings
from esper.urza.artifact import pack_artifact, rebuild
from esper.urza.library import UrzaLibrary
from esper.urza.records import KernelRecord
from esper.urza.settings import UrzaSettings
from esper.urza.store import ArtifactStore
from tests.conftest import ClientFactory
from tests.oona._helpers import dead_letters, wait_until
from tests.urza._service import kernel_request, running_urza, urza_settings
from tests.urza._templates import MLP, descriptor, graph, lookup, trained_module

V16 = SlotShape(16)
PARAMS = MLP.resolve_params({"hidden": 8})


def _register(var: Path) -> KernelRecord:
    """What Tezzeret does, from its own `UrzaLibrary` on the same files."""
    with UrzaLibrary(var / "catalog.db", var / "artifacts") as lib:
        lib.upsert_blueprint(descriptor(MLP), graph())
        data = pack_artifact("TST001", V16, PARAMS, trained_module(MLP, V16, PARAMS, seed=5).state_dict())
        return lib.register_kernel("TST001", V16, data, compile_ms=40.0, prewarm_p50_ms=0.5, prewarm_p95_ms=0.75)


async def _ask(client: OonaClient, req: pb.KernelPrefetchRequest) -> pb.KernelArtifactReady | pb.KernelArtifactError:
    reply = await client.request("kernel.request", req, timeout_ms=5000)
    if reply.message_type == pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY:
        return reply.message_as(pb.KernelArtifactReady)
    return reply.message_as(pb.KernelArtifactError)


async def _stream(redis: Redis, channel: str, cls: type[pb.KernelArtifactReady] | type[pb.KernelArtifactError]
                  ) -> list[object]:
    stream = CHANNELS[channel].normal_stream
    assert stream is not None
    entries: Any = await redis.xrange(stream)
    return [unpack_as(decode_envelope(f[b"payload"]), cls) for _, f in entries]


async def _events(redis: Redis) -> list[dict[str, str]]:
    out = []
    for stream in CHANNELS["telemetry"].streams:
        entries: Any = await redis.xrange(stream)
        for _, f in entries:
            for e in unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket).events:
                out.append(dict(e.attributes))
    return out


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_prefetch_request_gets_ready_with_the_right_checksum(make_client: ClientFactory,
                                                                   settings: OonaSettings, tmp_path: Path) -> None:
    rec = _register(tmp_path)
    kasmina = await make_client("kasmina")
    async with running_urza(urza_settings(settings, tmp_path)) as urza:
        ready = await _ask(kasmina, kernel_request("prefetch-1", "TST001@v16"))
        latest = await _ask(kasmina, kernel_request("prefetch-2", "TST001"))
    assert isinstance(ready, pb.KernelArtifactReady) and isinstance(latest, pb.KernelArtifactReady)
    assert (ready.request_id, ready.blueprint_id) == ("prefetch-1", "TST001@v16")
    assert (ready.artifact_ref, ready.checksum, ready.guard_digest) == (rec.artifact_ref, rec.checksum,
                                                                        rec.guard_digest)
    assert (ready.prewarm_p50_ms, ready.prewarm_p95_ms) == (0.5, 0.75)
    assert latest.checksum == rec.checksum and latest.blueprint_id == "TST001"
    # Kasmina's side: verified bytes from the shared artifact dir, rebuilt from trusted template code.
    artifact = ArtifactStore(tmp_path / "artifacts").load(ready.artifact_ref, ready.checksum,
                                                          expected_guard_digest=ready.guard_digest)
    module = rebuild(artifact, templates=lookup).eval()
    original = trained_module(MLP, V16, PARAMS, seed=5)
    x = V16.example_input(4)
    assert (module(x) == original(x)).all()
    assert _metric(urza.registry, "urza_kernel_requests_total", result="ready") == 2
    assert _metric(urza.registry, "urza_kernel_fetch_seconds_count") == 2


async def test_failures_are_typed_replies_with_telemetry(make_client: ClientFactory, settings: OonaSettings,
                                                         tmp_path: Path) -> None:
    rec = _register(tmp_path)
    kasmina = await make_client("kasmina")
    path = ArtifactStore(tmp_path / "artifacts").path_for(rec.artifact_ref)
    async with running_urza(urza_settings(settings, tmp_path)) as urza:
        unknown = await _ask(kasmina, kernel_request("r-unknown", "BP404"))
        nameless = await _ask(kasmina, kernel_request("r-nameless", ""))
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
        tampered = await _ask(kasmina, kernel_request("r-tampered", "TST001@v16"))
        path.unlink()
        missing = await _ask(kasmina, kernel_request("r-missing", "TST001"))
        reasons = {r: _metric(urza.registry, "urza_kernel_requests_total", result=r)
                   for r in ("artifact_not_found", "missing_id", "checksum_mismatch", "missing_artifact", "ready")}
        await wait_until(lambda: _n_events(kasmina.redis, "kernel_artifact_error", 4), what="error telemetry")
    for reply, request_id, reason in ((unknown, "r-unknown", "artifact_not_found"),
                                      (nameless, "r-nameless", "missing_id"),
                                      (tampered, "r-tampered", "checksum_mismatch"),
                                      (missing, "r-missing", "missing_artifact")):
        assert isinstance(reply, pb.KernelArtifactError), reply
        assert (reply.request_id, reply.reason) == (request_id, reason)
    assert unknown.blueprint_id == "BP404" and tampered.blueprint_id == "TST001@v16"
    assert reasons == {"artifact_not_found": 1, "missing_id": 1, "checksum_mismatch": 1, "missing_artifact": 1,
                       "ready": 0}
    events = [e for e in await _events(kasmina.redis) if e["event"] == "kernel_artifact_error"]
    assert sorted(e["reason"] for e in events) == ["artifact_not_found", "checksum_mismatch", "missing_artifact",
                                                   "missing_id"]


async def _n_events(redis: Redis, name: str, n: int) -> bool:
    return sum(e["event"] == name for e in await _events(redis)) >= n


async def test_stale_future_undated_and_replayed_requests_are_dropped_and_counted(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    _register(tmp_path)
    kasmina = await make_client("kasmina")
    window = 60_000
    async with running_urza(urza_settings(settings, tmp_path, kernel_freshness_window_ms=window)) as urza:
        first = await _ask(kasmina, kernel_request("dup", "TST001"))
        assert isinstance(first, pb.KernelArtifactReady)
        # No reply_to: an answer would land on kernel.ready / kernel.error, so silence is observable.
        await kasmina.publish("kernel.request", kernel_request("old", "TST001", issued_at_ms=now_ms() - 10 * window))
        await kasmina.publish("kernel.request", kernel_request("ahead", "TST001", issued_at_ms=now_ms() + 10 * window))
        await kasmina.publish("kernel.request", kernel_request("undated", "TST001", issued_at_ms=0))
        await kasmina.publish("kernel.request", kernel_request("dup", "TST001"))  # a new message, same request id
        await kasmina.publish("kernel.request", kernel_request("dup", "BP404"))
        # Requests are handled in order: once this one is answered, the five above were handled.
        last = await _ask(kasmina, kernel_request("fresh", "TST001"))
        assert isinstance(last, pb.KernelArtifactReady)
        assert urza.stats.stale_dropped == 3 and urza.stats.replay_dropped == 2
        assert _metric(urza.registry, "urza_kernel_stale_dropped_total") == 3
        assert _metric(urza.registry, "urza_kernel_replay_dropped_total") == 2
        assert _metric(urza.registry, "urza_kernel_requests_total", result="stale") == 3
        assert _metric(urza.registry, "urza_kernel_requests_total", result="replay") == 2
        await wait_until(lambda: _n_events(kasmina.redis, "kernel_replay_dropped", 2), what="drop telemetry")
    assert await _stream(kasmina.redis, "kernel.ready", pb.KernelArtifactReady) == []
    assert await _stream(kasmina.redis, "kernel.error", pb.KernelArtifactError) == []
    events = await _events(kasmina.redis)
    stale = sorted((e["request_id"], e["reason"]) for e in events if e["event"] == "kernel_stale_dropped")
    assert stale == [("ahead", "future"), ("old", "stale"), ("undated", "missing_issued_at")]


async def test_requests_without_reply_to_are_answered_on_the_kernel_channels(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    rec = _register(tmp_path)
    kasmina = await make_client("kasmina")
    async with running_urza(urza_settings(settings, tmp_path)):
        await kasmina.publish("kernel.request", kernel_request("s-ok", "TST001@v16"))
        await kasmina.publish("kernel.request", kernel_request("s-bad", "BP404"))

        async def answered() -> bool:
            return bool(await _stream(kasmina.redis, "kernel.error", pb.KernelArtifactError))

        await wait_until(answered, what="error published")
    [ready] = await _stream(kasmina.redis, "kernel.ready", pb.KernelArtifactReady)
    [error] = await _stream(kasmina.redis, "kernel.error", pb.KernelArtifactError)
    assert isinstance(ready, pb.KernelArtifactReady) and isinstance(error, pb.KernelArtifactError)
    assert (ready.request_id, ready.checksum) == ("s-ok", rec.checksum)
    assert (error.request_id, error.reason) == ("s-bad", "artifact_not_found")


async def test_blueprint_query_returns_descriptor_graph_and_bsds(make_client: ClientFactory, settings: OonaSettings,
                                                                 tmp_path: Path) -> None:
    _register(tmp_path)
    tamiyo = await make_client("tamiyo")
    bsds = pb.BSDS(version=1, blueprint_id="TST001", risk_score=0.7, hazard_band=pb.HAZARD_BAND_HIGH,
                   handling_class=pb.HANDLING_CLASS_RESTRICTED)
    bsds.issued_at.FromMilliseconds(now_ms())
    async with running_urza(urza_settings(settings, tmp_path)) as urza:
        urza.library.set_bsds(bsds)
        t0 = now_ms()
        reply = await tamiyo.request("blueprint.query", pb.BlueprintQuery(request_id="q1", include_graph=True),
                                     timeout_ms=5000)
        lean = await tamiyo.request("blueprint.query", pb.BlueprintQuery(request_id="q2", blueprint_ids=["TST001"]),
                                    timeout_ms=5000)
        nothing = await tamiyo.request("blueprint.query", pb.BlueprintQuery(request_id="q3", blueprint_ids=["BP9"]),
                                       timeout_ms=5000)
        assert _metric(urza.registry, "urza_catalog_queries_total") == 3
    catalog = reply.message_as(pb.BlueprintCatalog)
    assert catalog.request_id == "q1" and catalog.issued_at.ToMilliseconds() >= t0
    [entry] = catalog.entries
    assert entry.descriptor == descriptor(MLP) and entry.graph == graph() and entry.bsds == bsds
    [lean_entry] = lean.message_as(pb.BlueprintCatalog).entries
    assert lean_entry.bsds == bsds and not lean_entry.HasField("graph")
    assert list(nothing.message_as(pb.BlueprintCatalog).entries) == []


async def test_bsds_issued_lands_in_extras(make_client: ClientFactory, settings: OonaSettings,
                                           tmp_path: Path) -> None:
    _register(tmp_path)
    urabrask = await make_client("urabrask")
    bsds = pb.BSDS(version=1, blueprint_id="TST001", risk_score=0.2, hazard_band=pb.HAZARD_BAND_LOW,
                   recommendation="safe to graft")
    bsds.issued_at.FromMilliseconds(1_700_000_000_000)
    async with running_urza(urza_settings(settings, tmp_path)) as urza:
        await urabrask.publish("bsds", pb.BSDSIssued(bsds=bsds))
        await urabrask.publish("bsds", pb.BSDSIssued(bsds=pb.BSDS(blueprint_id="BP404")))
        await urabrask.publish("bsds", pb.BSDSIssued())
        await urabrask.publish("bsds", pb.BSDSFailed(blueprint_id="TST001", reason="probe crashed"))  # not stored
        await urabrask.publish("bsds", pb.EmergencySignal(reason="does not belong on bsds"))

        async def handled() -> bool:
            return urza.stats.bsds_stored == 1 and urza.stats.bsds_rejected == 3

        await wait_until(handled, what="bsds handled")
        assert _metric(urza.registry, "urza_bsds_rejected_total", reason="unknown_blueprint") == 1
        assert _metric(urza.registry, "urza_bsds_rejected_total", reason="missing_id") == 1
        assert _metric(urza.registry, "urza_bsds_rejected_total", reason="unexpected_type") == 1
    with UrzaLibrary(tmp_path / "catalog.db", tmp_path / "artifacts") as lib:  # durable, seen by other processes
        assert lib.extras("TST001")["bsds"]["recommendation"] == "safe to graft"
        assert lib.catalog_entries(["TST001"])[0].bsds == bsds
    reasons = [reason for reason, record, _ in await dead_letters(urabrask.redis)
               if record.source_stream.startswith("oona.{bsds}")]
    assert reasons == [reason_code(pb.DEAD_LETTER_REASON_HANDLER_REJECTED)] * 3


def test_settings_accept_the_prototype_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("URZA_DATABASE_URL", f"sqlite:///{tmp_path}/x/catalog.db")
    monkeypatch.setenv("URZA_ARTIFACT_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("KERNEL_FRESHNESS_WINDOW_MS", "1234")
    monkeypatch.setenv("KERNEL_NONCE_CACHE_SIZE", "99")
    monkeypatch.setenv("URZA_SEED_SLOT", "c8x4x4")
    s = UrzaSettings(_env_file=None)
    assert s.db_path == tmp_path / "x" / "catalog.db" and s.artifact_dir == tmp_path / "art"
    assert (s.kernel_freshness_window_ms, s.kernel_nonce_cache_size, s.seed_slot) == (1234, 99, "c8x4x4")
    monkeypatch.setenv("URZA_DATABASE_URL", "postgres://db/urza")
    with pytest.raises(ValueError, match="sqlite"):
        UrzaSettings(_env_file=None)
    monkeypatch.setenv("URZA_DATABASE_URL", "sqlite:///./var/urza/catalog.db")
    monkeypatch.setenv("URZA_SEED_SLOT", "bogus")
    with pytest.raises(ValueError, match="slot"):
        UrzaSettings(_env_file=None)
