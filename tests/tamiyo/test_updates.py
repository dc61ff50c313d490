"""Policy updates: checkpoint contract, message checks, and live application over the real bus."""

from __future__ import annotations

import io
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr

from esper.core.clock import now_ms
from esper.leyline import decode_envelope, pb, unpack_as
from esper.leyline.channels import CHANNELS
from esper.oona import OonaSettings
from esper.tamiyo.checkpoint import PolicyStore, PolicyUpdateRejected, decode_checkpoint, encode_checkpoint
from esper.tamiyo.compile import CompiledPolicy
from esper.tamiyo.gnn import GNNConfig, TamiyoGNN
from esper.tamiyo.registry import RegistrySet
from esper.tamiyo.schema import POLICY_VERSION
from esper.tamiyo.service import TamiyoService, serve
from esper.tamiyo.updates import LivePolicy, bus_rejection_reason, check_update
from tests.conftest import ClientFactory
from tests.oona._helpers import dead_letters, wait_until
from tests.tamiyo._fleet import packet, running_tamiyo, tamiyo_settings, urza_stand_in


def _model(seed: int, config: GNNConfig | None = None) -> TamiyoGNN:
    torch.manual_seed(seed)
    return TamiyoGNN(config).eval()


def _update(payload: bytes, *, policy_id: str = "pu-1", version: str = "simic-1",
            issued_at_ms: int | None = None) -> pb.PolicyUpdate:
    update = pb.PolicyUpdate(version=1, policy_id=policy_id, training_run_id="run1", tamiyo_policy_version=version,
                             payload=payload)
    update.issued_at.FromMilliseconds(now_ms() if issued_at_ms is None else issued_at_ms)
    return update


def _live(issued_at_ms: int = 0, policy_id: str = "") -> LivePolicy:
    return LivePolicy(CompiledPolicy(_model(0)), POLICY_VERSION, policy_id, issued_at_ms)


def _reason(exc: pytest.ExceptionInfo[PolicyUpdateRejected]) -> str:
    return exc.value.reason


# -- checkpoint contract --------------------------------------------------------------------------

def test_checkpoint_round_trip_restores_exact_weights() -> None:
    registries = RegistrySet.new()
    registries.blueprint.index("BP001")
    model = _model(3)
    ckpt = decode_checkpoint(encode_checkpoint(model, registries, policy_version="simic-7"))
    assert ckpt.policy_version == "simic-7"
    assert ckpt.registry_entries["blueprint"] == {"BP001": registries.blueprint.index("BP001")}
    rebuilt = ckpt.build_model(GNNConfig(), registries)
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_shape_mismatch_is_refused() -> None:
    registries = RegistrySet.new()
    data = encode_checkpoint(_model(0, GNNConfig(hidden_dim=64)), registries, policy_version="small")
    with pytest.raises(PolicyUpdateRejected) as exc:
        decode_checkpoint(data).build_model(GNNConfig(), registries)
    assert _reason(exc) == "shape_mismatch"


def test_registry_conflict_and_schema_mismatch_are_refused() -> None:
    trained = RegistrySet.new()
    trained.blueprint.index("BP001")
    ckpt = decode_checkpoint(encode_checkpoint(_model(0), trained, policy_version="v"))
    live = RegistrySet.new()
    live.blueprint.adopt({"BP009": trained.blueprint.index("BP001")})  # the slot BP001 was trained on
    with pytest.raises(PolicyUpdateRejected) as exc:
        ckpt.build_model(GNNConfig(), live)
    assert _reason(exc) == "registry_mismatch"
    assert "conflicting_entry" in exc.value.detail

    other_schema = decode_checkpoint(encode_checkpoint(_model(0), trained, policy_version="v"))
    object.__setattr__(other_schema, "registry_schema", "0" * 64)
    with pytest.raises(PolicyUpdateRejected) as exc:
        other_schema.build_model(GNNConfig(), RegistrySet.new())
    assert _reason(exc) == "registry_mismatch"


def test_a_live_set_with_more_keys_is_compatible() -> None:
    trained = RegistrySet.new()
    trained.seed.index("seed-1")
    live = RegistrySet.new()
    live.seed.index("seed-1")
    live.seed.index("seed-2")
    decode_checkpoint(encode_checkpoint(_model(0), trained, policy_version="v")).build_model(GNNConfig(), live)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch should-never-exist",))


def test_payload_that_is_not_weights_only_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"format": 1, "state_dict": {}, "evil": _Boom()}, buf)
    for data in (buf.getvalue(), pickle.dumps(_Boom()), b"", b"not a checkpoint"):
        with pytest.raises(PolicyUpdateRejected) as exc:
            decode_checkpoint(data)
        assert _reason(exc) == "invalid_payload"
    assert not (tmp_path / "should-never-exist").exists()


def test_architecture_version_mismatch_is_incompatible() -> None:
    ckpt = decode_checkpoint(encode_checkpoint(_model(0), RegistrySet.new(), policy_version="v"))
    object.__setattr__(ckpt, "architecture_version", "tamiyo_gnn_v0")
    with pytest.raises(PolicyUpdateRejected) as exc:
        ckpt.build_model(GNNConfig(), RegistrySet.new())
    assert _reason(exc) == "incompatible_update"


def test_policy_store_points_at_verified_bytes(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    assert store.load() is None
    for n in range(5):
        store.save(f"checkpoint-{n}".encode(), policy_version=f"v{n}", policy_id=f"p{n}", issued_at_ms=n)
    stored = store.load()
    assert stored is not None
    assert (stored.data, stored.policy_version, stored.policy_id, stored.issued_at_ms) == (b"checkpoint-4", "v4",
                                                                                           "p4", 4)
    assert len(list(tmp_path.glob("*.pt"))) <= 3
    current = next(p for p in tmp_path.glob("*.pt") if p.read_bytes() == b"checkpoint-4")
    current.write_bytes(b"checkpoint-X")
    with pytest.raises(PolicyUpdateRejected) as exc:
        store.load()
    assert _reason(exc) == "invalid_payload"


# -- message checks -------------------------------------------------------------------------------

NOW = 1_800_000_000_000


@pytest.mark.parametrize(
    ("mutate", "live", "reason"),
    [
        (lambda u: setattr(u, "version", 2), _live(), "version_mismatch"),
        (lambda u: u.ClearField("policy_id"), _live(), "invalid_payload"),
        (lambda u: None, _live(policy_id="pu-1"), "duplicate_update"),
        (lambda u: u.ClearField("tamiyo_policy_version"), _live(), "version_mismatch"),
        (lambda u: u.ClearField("issued_at"), _live(), "stale_update"),
        (lambda u: u.issued_at.FromMilliseconds(NOW - 601_000), _live(), "stale_update"),
        (lambda u: u.issued_at.FromMilliseconds(NOW + 60_000), _live(), "stale_update"),
        (lambda u: None, _live(issued_at_ms=NOW), "stale_update"),  # not newer than the live policy
    ],
)
def test_check_update_rejections(mutate: object, live: LivePolicy, reason: str) -> None:
    update = _update(b"x", issued_at_ms=NOW - 1000)
    mutate(update)  # type: ignore[operator]
    with pytest.raises(PolicyUpdateRejected) as exc:
        check_update(update, live, now_ms=NOW, verify=True, freshness_s=600)
    assert _reason(exc) == reason


def test_check_update_accepts_fresh_and_skips_age_checks_when_not_verifying() -> None:
    check_update(_update(b"x", issued_at_ms=NOW - 1000), _live(), now_ms=NOW, verify=True, freshness_s=600)
    old = _update(b"x", issued_at_ms=NOW - 10_000_000)
    check_update(old, _live(issued_at_ms=NOW), now_ms=NOW, verify=False, freshness_s=600)
    check_update(old, _live(), now_ms=NOW, verify=True, freshness_s=0)  # 0 = no age limit


def test_bus_rejections_map_to_prototype_reasons() -> None:
    assert bus_rejection_reason("bad_signature") == "bad_signature"
    assert bus_rejection_reason("stale") == "stale_update"
    assert bus_rejection_reason("handler_rejected") is None  # the handler reported it already


# -- live over the bus ----------------------------------------------------------------------------

async def _rejection_events(redis: object) -> list[dict[str, str]]:
    out = []
    for stream in CHANNELS["telemetry"].streams:
        for _, fields in await redis.xrange(stream):  # type: ignore[attr-defined]
            for e in unpack_as(decode_envelope(fields[b"payload"]), pb.TelemetryPacket).events:
                if e.attributes.get("event") == "policy_update_rejected":
                    out.append(dict(e.attributes))
    return out


async def _decide_version(trainer: object, step: int) -> str:
    reply = await trainer.request("state", packet(step), timeout_ms=2000)  # type: ignore[attr-defined]
    assert reply.message_type == pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
    return str(reply.message_as(pb.AdaptationCommand).annotations["policy_version"])


async def test_valid_update_is_applied_live_and_survives_restart(make_client: ClientFactory,
                                                                 settings: OonaSettings, tmp_path: Path) -> None:
    trainer, simic, urza = await make_client("tolaria"), await make_client("simic"), await make_client("urza")
    s = tamiyo_settings(settings, tmp_path)
    new_model = _model(11)
    async with urza_stand_in(urza), running_tamiyo(s) as tamiyo:
        await wait_until(lambda: _has_blueprints(tamiyo), what="catalogue fetched")
        assert await _decide_version(trainer, 1) == POLICY_VERSION
        payload = encode_checkpoint(new_model, tamiyo.registries, policy_version="simic-1")
        await simic.publish("policy", _update(payload))

        async def applied() -> bool:
            return tamiyo.worker.live.version == "simic-1"

        await wait_until(applied, what="update applied")
        assert await _decide_version(trainer, 2) == "simic-1"
        served = tamiyo.worker.policy.model.state_dict()
        assert all(torch.equal(v, served[k]) for k, v in new_model.state_dict().items())
        assert tamiyo.updates_applied._value.get() == 1
    restarted = TamiyoService(s)
    try:
        assert restarted.worker.live.version == "simic-1"
        assert restarted.worker.live.policy_id == "pu-1"
    finally:
        restarted.worker.close()
        restarted.close_outbox()
    assert await _rejection_events(trainer.redis) == []


async def _has_blueprints(service: TamiyoService) -> bool:
    return bool(service.catalog.view().blueprints)


async def test_bad_updates_are_rejected_and_live_policy_untouched(make_client: ClientFactory,
                                                                  settings: OonaSettings, tmp_path: Path) -> None:
    trainer, simic, urza = await make_client("tolaria"), await make_client("simic"), await make_client("urza")
    forger = await make_client("forger", leyline_secret=SecretStr("not-the-fleet-secret"))
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        await wait_until(lambda: _has_blueprints(tamiyo), what="catalogue fetched")
        before = {k: v.clone() for k, v in tamiyo.worker.policy.model.state_dict().items()}
        good = encode_checkpoint(_model(5), tamiyo.registries, policy_version="simic-2")
        conflicting = RegistrySet.new()
        conflicting.blueprint.adopt({"BP-other": tamiyo.registries.blueprint.index("BP001")})
        conflicting.blueprint.adopt({"BP001": 7 if tamiyo.registries.blueprint.index("BP001") != 7 else 8})
        cases = [
            (forger, _update(good, policy_id="pu-forged", version="simic-2"), "bad_signature"),
            (simic, _update(good, policy_id="pu-stale", version="simic-2", issued_at_ms=now_ms() - 3_600_000),
             "stale_update"),
            (simic, _update(encode_checkpoint(_model(5), conflicting, policy_version="simic-2"),
                            policy_id="pu-registry", version="simic-2"), "registry_mismatch"),
            (simic, _update(encode_checkpoint(_model(5, GNNConfig(hidden_dim=64)), tamiyo.registries,
                                              policy_version="simic-2"), policy_id="pu-shape", version="simic-2"),
             "shape_mismatch"),
        ]
        for n, (sender, update, reason) in enumerate(cases, start=1):
            await sender.publish("policy", update)

            async def rejected(n: int = n) -> bool:
                return len(await _rejection_events(trainer.redis)) >= n

            await wait_until(rejected, what=f"{reason} reported")
            events = await _rejection_events(trainer.redis)
            assert events[-1]["reason"] == reason, events
            assert tamiyo.worker.live.version == POLICY_VERSION
            assert await _decide_version(trainer, n) == POLICY_VERSION  # decisions never interrupted
        served = tamiyo.worker.policy.model.state_dict()
        assert all(torch.equal(v, served[k]) for k, v in before.items())
        assert {r: tamiyo.updates_rejected.labels(r)._value.get() for _, _, r in cases} == {
            "bad_signature": 1, "stale_update": 1, "registry_mismatch": 1, "shape_mismatch": 1}
    reasons = sorted(reason for reason, _, _ in await dead_letters(trainer.redis))
    assert reasons == ["bad_signature", "handler_rejected", "handler_rejected", "handler_rejected"]
    assert not (tmp_path / "policies" / "current.json").exists()


async def test_every_replica_applies_an_update(make_client: ClientFactory, settings: OonaSettings,
                                               tmp_path: Path) -> None:
    simic = await make_client("simic")
    a = tamiyo_settings(settings, tmp_path / "a", instance_id="a")
    b = tamiyo_settings(settings, tmp_path / "b", instance_id="b")
    async with running_tamiyo(a) as one, running_tamiyo(b) as two:
        payload = encode_checkpoint(_model(2), one.registries, policy_version="s-3")
        await simic.publish("policy", _update(payload, version="s-3"))

        async def both() -> bool:
            return one.worker.live.version == two.worker.live.version == "s-3"

        await wait_until(both, what="both replicas updated")
    groups = await simic.redis.xinfo_groups(CHANNELS["policy"].normal_stream)
    assert [g["name"] for g in groups] == []  # per-replica groups are removed on clean shutdown


async def test_new_replica_catches_up_on_the_newest_update(make_client: ClientFactory, settings: OonaSettings,
                                                           tmp_path: Path) -> None:
    simic = await make_client("simic")
    registries = RegistrySet.new()
    t = now_ms()
    for n in (1, 2):
        payload = encode_checkpoint(_model(n), registries, policy_version=f"s-{n}")
        await simic.publish("policy", _update(payload, policy_id=f"pu-{n}", version=f"s-{n}", issued_at_ms=t + n))
    async with running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        async def caught_up() -> bool:
            return tamiyo.worker.live.version == "s-2"

        await wait_until(caught_up, what="newest update applied on start")
        assert await _rejection_events(simic.redis) == []


async def test_corrupt_registries_refuse_start_with_telemetry(make_client: ClientFactory, settings: OonaSettings,
                                                              tmp_path: Path) -> None:
    observer = await make_client("observer")
    (tmp_path / "registries.json").write_text('{"format": 1, "registries": {}, "digest": "x"}')
    t0 = time.monotonic()
    assert await serve(tamiyo_settings(settings, tmp_path, metrics_port=-1)) == 3
    assert time.monotonic() - t0 < 60  # liveness: it exits, it does not hang
    events = [e.attributes for s in CHANNELS["telemetry"].streams for _, f in await observer.redis.xrange(s)
              for e in unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket).events]
    assert [(e["event"], e["reason"]) for e in events] == [("registry_mismatch", "missing_registry")]
