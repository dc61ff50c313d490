"""Simic's own training rounds against a real Redis: enough new reports → a round whose accepted
candidate is published and becomes the current policy (kept across a restart); too few → no round; a
publish cut short is finished first; a round that fails (no catalogue, a lost checkpoint) is reported
and leaves the service running."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from esper.core.clock import now_ms
from esper.leyline import decode_envelope, pb, unpack_as
from esper.leyline.channels import CHANNELS
from esper.oona import OonaSettings
from esper.simic.pipeline import initial_model, save_checkpoint
from esper.simic.rounds import STATE_FILE, RoundState
from esper.simic.service import SimicService
from esper.simic.settings import SimicSettings
from esper.tamiyo.checkpoint import decode_checkpoint, encode_checkpoint
from esper.tamiyo.registry import RegistrySet
from tests.conftest import ClientFactory
from tests.simic._data import runs
from tests.tamiyo._fleet import urza_stand_in


def _settings(settings: OonaSettings, tmp_path: Path, **overrides: object) -> SimicSettings:
    base = {**settings.model_dump(), "replay_path": tmp_path / "replay.db", "policy_dir": tmp_path / "policies",
            "imitation_epochs": 2, "awr_epochs": 6, "batch_size": 32, "learning_rate": 5e-3, "gate_min_holdout": 10,
            "train_min_new_reports": 50, "catalog_timeout_ms": 100.0, "train_interval_s": 0.0}
    base.update(overrides)
    return SimicSettings(**base)


async def _events(client: object, stream: str) -> list[pb.TelemetryEvent]:
    entries = await client.redis.xrange(stream)  # type: ignore[attr-defined]
    return [e for _, f in entries for e in unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket).events]


async def test_a_round_publishes_an_accepted_candidate_and_keeps_it_as_current(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    watcher, urza = await make_client("nissa"), await make_client("urza")
    s = _settings(settings, tmp_path)
    service = SimicService(s, registry=CollectorRegistry())
    await service.client.connect()
    try:
        for r in runs(n_runs=4, steps=24)[:40]:
            service.store.add(r)
        assert await service.rounds.maybe_train() is None  # 40 new reports, 50 needed: no round
        assert not (s.policy_dir / STATE_FILE).exists()
        for r in runs(n_runs=4, steps=24)[40:]:
            service.store.add(r)
        async with urza_stand_in(urza):
            result = await service.rounds.maybe_train()
        assert result is not None and result.gate.accepted, result and result.gate
        assert service.rounds.rounds.labels("accepted")._value.get() == 1
        state = RoundState.load(s.policy_dir)
        assert state.checkpoint is not None and state.last_round_ms > 0 and not state.pending_publish
        assert (s.policy_dir / state.checkpoint).read_bytes() == result.checkpoint
        updates = await watcher.redis.xrange(CHANNELS["policy"].normal_stream)
        assert len(updates) == 1
        raw = updates[0][1][b"payload"]
        update = unpack_as(decode_envelope(raw, max_bytes=CHANNELS["policy"].max_message_bytes), pb.PolicyUpdate)
        assert update.payload == result.checkpoint
        assert decode_checkpoint(update.payload).policy_version == result.policy_version
        events = await _events(watcher, CHANNELS["telemetry"].normal_stream)
        done = [e for e in events if e.attributes["event"] == "simic_round"]
        assert len(done) == 1 and done[0].attributes["accepted"] == "True" and done[0].attributes["published"] == "True"
        # Nothing new since: the next interval runs no round.
        assert await service.rounds.maybe_train() is None
    finally:
        service.store.close()
        await service.client.close()
    # A restarted service starts from the accepted policy: its next round's current is that checkpoint.
    again = SimicService(s, registry=CollectorRegistry())
    try:
        current = again.rounds._current(RoundState.load(s.policy_dir), RegistrySet.new())
        assert all(bool((a == b).all()) for a, b in zip(current.state_dict().values(),
                                                         result.candidate.state_dict().values(), strict=True))
    finally:
        again.store.close()


async def test_a_shutdown_cancels_a_round_in_progress_and_writes_nothing(
        make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    """The round's worker thread stops at its next optimizer step once the loop's stop event is set;
    uncancelled, these 100 000 passes would run for hours (the timeout only guards against a hang)."""
    watcher, urza = await make_client("nissa"), await make_client("urza")
    s = _settings(settings, tmp_path, train_interval_s=0.05, awr_epochs=100_000)
    service = SimicService(s, registry=CollectorRegistry())
    await service.client.connect()
    for r in runs(n_runs=4, steps=24):
        service.store.add(r)
    stop = asyncio.Event()
    try:
        async with urza_stand_in(urza):
            task = asyncio.create_task(service.rounds.run(stop))
            async with asyncio.timeout(60):
                while not service.rounds.training:  # noqa: ASYNC110 - a flag of this process
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # well into training
                stop.set()
                await task
    finally:
        service.store.close()
        await service.client.close()
    labels = service.rounds.rounds.labels
    assert labels("cancelled")._value.get() == 1
    assert (labels("accepted")._value.get(), labels("refused")._value.get(), labels("failed")._value.get()) == (0, 0, 0)
    assert not service.rounds.training and not (s.policy_dir / STATE_FILE).exists()  # no state, no checkpoint
    assert not s.policy_dir.exists() or not list(s.policy_dir.glob("*.pt"))
    assert await watcher.redis.xlen(CHANNELS["policy"].normal_stream) == 0


async def test_a_failed_round_is_reported_and_the_service_goes_on(make_client: ClientFactory, settings: OonaSettings,
                                                                 tmp_path: Path) -> None:
    watcher = await make_client("nissa")
    s = _settings(settings, tmp_path, train_interval_s=0.05)
    RoundState(checkpoint="gone.pt", last_round_ms=0).save(s.policy_dir)  # names a file that is not there
    service = SimicService(s, registry=CollectorRegistry())
    await service.client.connect()
    for r in runs(n_runs=4, steps=24):
        service.store.add(r)
    stop = asyncio.Event()
    task = asyncio.create_task(service.rounds.run(stop))
    try:
        async with asyncio.timeout(30):
            while service.rounds.rounds.labels("failed")._value.get() < 2:  # noqa: ASYNC110 - a counter in-process
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        service.store.close()
        await service.client.close()
    assert RoundState.load(s.policy_dir).checkpoint == "gone.pt"  # a failed round changes nothing
    assert await watcher.redis.xlen(CHANNELS["policy"].normal_stream) == 0
    failed = [e for e in await _events(watcher, CHANNELS["telemetry"].normal_stream)
              if e.attributes["event"] == "simic_round_failed"]
    assert failed and failed[0].level == pb.TELEMETRY_LEVEL_WARNING and "gone.pt" in failed[0].description


async def test_no_catalogue_is_a_failed_round_not_a_blind_one(make_client: ClientFactory, settings: OonaSettings,
                                                              tmp_path: Path) -> None:
    watcher = await make_client("nissa")
    s = _settings(settings, tmp_path)
    service = SimicService(s, registry=CollectorRegistry())
    await service.client.connect()
    try:
        for r in runs(n_runs=4, steps=24):
            service.store.add(r)
        assert await service.rounds.maybe_train() is None  # nobody answers blueprint.query
    finally:
        service.store.close()
        await service.client.close()
    assert service.rounds.rounds.labels("failed")._value.get() == 1
    assert RoundState.load(s.policy_dir) == RoundState()  # nothing changed: the next interval tries again
    failed = [e for e in await _events(watcher, CHANNELS["telemetry"].normal_stream)
              if e.attributes["event"] == "simic_round_failed"]
    assert len(failed) == 1 and "catalogue" in failed[0].description


async def test_a_publish_cut_short_is_finished_before_anything_else(make_client: ClientFactory,
                                                                    settings: OonaSettings, tmp_path: Path) -> None:
    """State left by a kill -9 between naming the accepted checkpoint and publishing it."""
    watcher = await make_client("nissa")
    s = _settings(settings, tmp_path)
    data = encode_checkpoint(initial_model(), RegistrySet.new(), policy_version="simic-cut-short")
    name = save_checkpoint(data, s.policy_dir).name
    RoundState(name, last_round_ms=now_ms(), pending_publish=True).save(s.policy_dir)
    service = SimicService(s, registry=CollectorRegistry())
    await service.client.connect()
    try:
        assert await service.rounds.maybe_train() is None  # no new reports: no round, but the publish
    finally:
        service.store.close()
        await service.client.close()
    assert RoundState.load(s.policy_dir) == RoundState(name, RoundState.load(s.policy_dir).last_round_ms)
    updates = await watcher.redis.xrange(CHANNELS["policy"].normal_stream)
    assert len(updates) == 1
    raw = updates[0][1][b"payload"]
    update = unpack_as(decode_envelope(raw, max_bytes=CHANNELS["policy"].max_message_bytes), pb.PolicyUpdate)
    assert update.payload == data and update.tamiyo_policy_version == "simic-cut-short"
