"""Tamiyo end to end on a real Redis: real graph, real GNN, real risk engine, real signatures."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from esper.leyline import CHANNELS, SignatureError, decode_envelope, pb, unpack_as, verify_command
from esper.oona import OonaSettings
from esper.tamiyo.culls import culled_pairs
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until
from tests.tamiyo._fleet import packet, running_tamiyo, tamiyo_settings, urza_stand_in

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


async def _metadata_ready(service: object) -> bool:
    return bool(service.catalog.view().blueprints)  # type: ignore[attr-defined]


async def test_signed_command_with_annotations(make_client: ClientFactory, settings: OonaSettings,
                                               tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        await wait_until(lambda: _metadata_ready(tamiyo), what="catalogue fetched")
        reply = await trainer.request("state", packet(), timeout_ms=2000)
    command = reply.message_as(pb.AdaptationCommand)
    verify_command(command, trainer.keys)
    assert command.command_id and command.issued_at.seconds > 0
    a = command.annotations
    assert a["policy_version"] == "tamiyo_gnn_v2" and a["metadata"] == "ok"
    assert "node.seed" in a["coverage_map"] and 0.0 < float(a["feature_coverage"]) <= 1.0
    if command.command_type == pb.COMMAND_SEED:
        assert command.seed_operation.blueprint_id == "BP001" and command.target_seed_id.startswith("seed-")
    tampered = pb.AdaptationCommand()
    tampered.CopyFrom(command)
    tampered.annotations["policy_version"] = "forged"
    with pytest.raises(SignatureError):
        verify_command(tampered, trainer.keys)


async def test_no_blueprint_library_is_an_explicit_failure(make_client: ClientFactory, settings: OonaSettings,
                                                          tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    async with running_tamiyo(tamiyo_settings(settings, tmp_path, metadata_timeout_ms=30.0)) as tamiyo:
        await wait_until(lambda: _failed(tamiyo), what="metadata refresh failed")
        reply = await trainer.request("state", packet(), timeout_ms=2000)
        assert tamiyo.catalog.last_failure == "timeout_urza"
    failure = reply.message_as(pb.DecisionFailure)
    assert failure.packet_id == "pkt-1"
    assert failure.annotations["metadata"] == "unavailable:timeout_urza"
    # The untrained policy wants to germinate; with no real blueprint that is refused, not faked.
    assert failure.reason == pb.DECISION_FAILURE_REASON_DEPENDENCY_VIOLATION, failure.detail


async def _failed(service: object) -> bool:
    return service.catalog.last_failure is not None  # type: ignore[attr-defined]


async def test_missing_ids_are_a_dependency_violation(make_client: ClientFactory, settings: OonaSettings,
                                                      tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    nameless = packet()
    nameless.training_run_id = ""
    async with running_tamiyo(tamiyo_settings(settings, tmp_path)):
        reply = await trainer.request("state", nameless, timeout_ms=2000)
    failure = reply.message_as(pb.DecisionFailure)
    assert failure.reason == pb.DECISION_FAILURE_REASON_DEPENDENCY_VIOLATION
    assert "training_run_id" in failure.detail


async def test_inference_timeout_breaker_and_recovery(make_client: ClientFactory, settings: OonaSettings,
                                                      tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    # The reply margin is a quarter of the budget: 100 ms for the failure to travel back. With the
    # default tenth of a 60 ms budget (6 ms), a busy 2-core CI box once missed the requester's deadline.
    tamiyo_cfg = tamiyo_settings(settings, tmp_path, reply_margin_fraction=0.25)
    async with urza_stand_in(urza), running_tamiyo(tamiyo_cfg) as tamiyo:
        await wait_until(lambda: _metadata_ready(tamiyo), what="catalogue fetched")
        # One ordinary decision first: a cold first decision (first graph build and forward) is not
        # what this test is about, and on a busy 2-core box it can eat a small budget on its own.
        await trainer.request("state", packet(1000), timeout_ms=5000)
        tamiyo.faults.inference_delay_ms = 1500.0
        reasons = []
        for step in range(60):  # a forward still running makes the next ones fail fast ("busy")
            t0 = time.monotonic()
            reply = await trainer.request("state", packet(step), timeout_ms=400)
            assert time.monotonic() - t0 < 1.0  # liveness: answered, not left to time out
            reasons.append(reply.message_as(pb.DecisionFailure).reason)
            if reasons[-1] == pb.DECISION_FAILURE_REASON_BREAKER_OPEN:
                break
            await asyncio.sleep(0.05)  # one request per training step
        assert reasons[0] == pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE
        assert reasons[-1] == pb.DECISION_FAILURE_REASON_BREAKER_OPEN, reasons
        assert set(reasons[:-1]) == {pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE}
        assert tamiyo.worker.inference_breaker.state == pb.CIRCUIT_STATE_OPEN
        tamiyo.faults.inference_delay_ms = 0.0
        await asyncio.sleep(0.5)  # cooldown (300 ms); the stalled forward finishes within wait_until

        async def recovered() -> bool:
            r = await trainer.request("state", packet(99), timeout_ms=2000)
            return r.message_type == pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND

        await wait_until(recovered, what="commands flow again")
        assert tamiyo.worker.inference_breaker.state == pb.CIRCUIT_STATE_CLOSED
    # HIGH timeout telemetry rides the emergency lane.
    entries = await trainer.redis.xrange(CHANNELS["telemetry"].emergency_stream)
    events = [e.attributes.get("event") for _, f in entries
              for e in unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket).events]
    assert "timeout_inference" in events
    assert trainer.metrics.late_replies._value.get() == 0


async def test_risk_engine_pauses_on_loss_spike(make_client: ClientFactory, settings: OonaSettings,
                                                tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        await wait_until(lambda: _metadata_ready(tamiyo), what="catalogue fetched")
        reply = await trainer.request("state", packet(loss_delta=0.5), timeout_ms=2000)
        assert tamiyo.worker.conservative.active
    command = reply.message_as(pb.AdaptationCommand)
    verify_command(command, trainer.keys)
    assert command.command_type == pb.COMMAND_PAUSE
    assert command.annotations["risk_reason"] == "loss_spike"


async def test_no_seed_is_grown_that_the_run_cannot_finish(make_client: ClientFactory, settings: OonaSettings,
                                                            tmp_path: Path) -> None:
    """The untrained GNN germinates whenever a seed is DORMANT; with 68 of 368 steps left (fewer than
    the 75 a seed needs by default) the risk engine makes it a PAUSE, said in the annotations."""
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    replies = {}
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        await wait_until(lambda: _metadata_ready(tamiyo), what="catalogue fetched")
        for step in (10, 300):
            p = packet(step)
            p.training_metrics["steps_total"] = 368.0
            replies[step] = (await trainer.request("state", p, timeout_ms=2000)).message_as(pb.AdaptationCommand)
    for command in replies.values():
        verify_command(command, trainer.keys)
    assert replies[10].command_type == pb.COMMAND_SEED and "risk_reason" not in replies[10].annotations
    late = replies[300]
    assert late.command_type == pb.COMMAND_PAUSE
    assert late.annotations["risk_reason"] == "germinate_too_late"
    assert late.annotations["policy_command"] == "COMMAND_SEED"  # not the policy's choice: Simic skips it


def _with_stage(p: pb.SystemStatePacket, seed_id: str, stage: int) -> pb.SystemStatePacket:
    for s in p.seed_states:
        if s.seed_id == seed_id:
            s.stage = stage  # type: ignore[assignment]  # a pb enum value
    return p


@pytest.mark.parametrize("memory", [True, False])
async def test_the_gnn_never_regrows_a_design_culled_in_that_seed(make_client: ClientFactory, settings: OonaSettings,
                                                                   tmp_path: Path, memory: bool) -> None:
    """The untrained GNN germinates its first pair whenever a seed is DORMANT. Once Kasmina culled it
    (the seed seen TRAINING, then EMBARGOED, then DORMANT again) Tamiyo grows another design there and
    says which pairs it excluded; with TAMIYO_CULL_MEMORY off it grows the same pair again. An
    exploring replica counts what it grew (its draws favour the least-grown designs; the sample
    catalogue has one, so nothing is drawn here)."""
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    config = tamiyo_settings(settings, tmp_path, cull_memory=memory, explore_epsilon=1.0)
    async with urza_stand_in(urza), running_tamiyo(config) as tamiyo:
        await wait_until(lambda: _metadata_ready(tamiyo), what="catalogue fetched")

        sent: dict[tuple[str, str], int] = {}

        async def ask(p: pb.SystemStatePacket) -> pb.AdaptationCommand:
            command = (await trainer.request("state", p, timeout_ms=2000)).message_as(pb.AdaptationCommand)
            verify_command(command, trainer.keys)
            if command.command_type == pb.COMMAND_SEED:
                key = (command.target_seed_id, command.seed_operation.blueprint_id)
                sent[key] = sent.get(key, 0) + 1
            return command

        first = await ask(packet(10))
        assert first.command_type == pb.COMMAND_SEED and "culled_pairs" not in first.annotations
        grown = (first.target_seed_id, first.seed_operation.blueprint_id)
        await ask(_with_stage(packet(20), grown[0], pb.SEED_STAGE_TRAINING))
        await ask(_with_stage(packet(30), grown[0], pb.SEED_STAGE_EMBARGOED))
        again = await ask(packet(40))
        counted = dict(tamiyo.worker.grown)
    assert again.command_type == pb.COMMAND_SEED
    pair = (again.target_seed_id, again.seed_operation.blueprint_id)
    if memory:
        assert pair != grown and culled_pairs(again.annotations) == {grown}
    else:
        assert pair == grown and "culled_pairs" not in again.annotations
    assert counted == sent and counted[grown] == (1 if memory else 2)


async def test_two_workers_split_requests_without_duplicates(make_client: ClientFactory, settings: OonaSettings,
                                                             tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    a = tamiyo_settings(settings, tmp_path / "a", instance_id="a", read_batch=1)
    b = tamiyo_settings(settings, tmp_path / "b", instance_id="b", read_batch=1)
    async with urza_stand_in(urza), running_tamiyo(a) as ta, running_tamiyo(b) as tb:
        await wait_until(lambda: _metadata_ready(ta), what="a ready")
        await wait_until(lambda: _metadata_ready(tb), what="b ready")
        replies = await asyncio.gather(*(trainer.request("state", packet(i), timeout_ms=5000) for i in range(40)))
        decided = ta.worker.decisions + tb.worker.decisions
    by = [r.message_as(pb.AdaptationCommand).issued_by for r in replies]
    assert {"tamiyo:a", "tamiyo:b"} == set(by), "both replicas should have answered"
    assert decided == 40, "a request was decided twice"
    assert await trainer.redis.xlen(trainer.reply_stream) == 40


def test_fault_knobs_need_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.tamiyo.settings import TamiyoSettings

    monkeypatch.setenv("TAMIYO_FAULT_INFERENCE_DELAY_MS", "50")
    monkeypatch.delenv("ESPER_ENABLE_FAULT_INJECTION", raising=False)
    with pytest.raises(ValidationError, match="ESPER_ENABLE_FAULT_INJECTION"):
        TamiyoSettings(leyline_secret="s" * 32, redis_url="redis://127.0.0.1:1/0")
    monkeypatch.setenv("ESPER_ENABLE_FAULT_INJECTION", "1")
    assert TamiyoSettings(leyline_secret="s" * 32).fault_inference_delay_ms == 50.0


async def test_field_reports_reach_the_bus_and_windows_close(make_client: ClientFactory, settings: OonaSettings,
                                                             tmp_path: Path) -> None:
    trainer = await make_client("tolaria")
    urza = await make_client("urza")
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        await wait_until(lambda: _metadata_ready(tamiyo), what="catalogue fetched")
        first = packet(1)
        first.current_epoch = 1
        reply = await trainer.request("state", first, timeout_ms=2000)
        command = reply.message_as(pb.AdaptationCommand)
        later = packet(2)
        later.current_epoch = 2  # one epoch on: the observation window (1 epoch) closes
        await trainer.request("state", later, timeout_ms=2000)

        async def reports() -> list[pb.FieldReport]:
            entries = await trainer.redis.xrange(CHANNELS["field_report"].stream("normal"))
            return [unpack_as(decode_envelope(f[b"payload"]), pb.FieldReport) for _, f in entries]

        async def both_landed() -> bool:
            ids = {r.report_id for r in await reports()}
            return f"fr-{command.command_id}" in ids and any(i.startswith("fr-synth-") for i in ids)

        await wait_until(both_landed, what="decision and synthetic reports published")

        async def counted() -> bool:  # the counter moves once the outbox marked them (after the XADDs)
            return bool(tamiyo.fr_published._value.get() >= 2)

        await wait_until(counted, what="published reports counted")
    by_id = {r.report_id: r for r in await reports()}
    decision_report = by_id[f"fr-{command.command_id}"]
    assert decision_report.issued_at.seconds > 0 and decision_report.training_run_id == "run1"
    # Simic trains on what the decision saw and what it decided: both ride the report.
    assert decision_report.observation == first
    assert decision_report.command == command
    if command.command_type == pb.COMMAND_SEED:
        synth = by_id[f"fr-synth-{command.command_id}-1+1"]
        assert synth.observation_window_epochs == 1 and synth.seed_id == command.target_seed_id


def test_the_candidate_cap_is_a_setting_simic_shares(settings: OonaSettings, tmp_path: Path) -> None:
    """TAMIYO_MAX_BLUEPRINTS sizes every decision's graph; Simic rebuilds the same graphs with
    SIMIC_MAX_BLUEPRINTS, so the two defaults are one number."""
    from esper.simic.settings import SimicSettings
    from esper.tamiyo.graph import DEFAULT_MAX_BLUEPRINTS
    from esper.tamiyo.service import TamiyoService
    from tests.simic._data import two_blueprints

    defaults = (tamiyo_settings(settings, tmp_path).max_blueprints, SimicSettings().max_blueprints)
    assert defaults == (DEFAULT_MAX_BLUEPRINTS, DEFAULT_MAX_BLUEPRINTS)
    service = TamiyoService(tamiyo_settings(settings, tmp_path, max_blueprints=1))
    try:
        assert service.worker.builder.max_blueprints == 1
        graph = service.worker.builder.build(packet(), two_blueprints())
        assert graph.blueprint_ids == ["BP001"] and graph.truncated["blueprint"] == 1  # the riskier BP002 left out
    finally:
        service.worker.close()
        service.close_outbox()
