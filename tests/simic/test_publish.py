"""Simic's policy updates against a live Tamiyo over the real bus: a trained update goes live while
decisions continue; a tampered, stale or shape-mismatched one is refused with the live policy untouched."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr

from esper.core.clock import now_ms
from esper.leyline import pb
from esper.leyline.channels import CHANNELS
from esper.oona import OonaSettings
from esper.simic.pipeline import initial_model, run_round
from esper.simic.publish import build_update, publish_policy
from esper.simic.settings import SimicSettings
from esper.tamiyo.checkpoint import PolicyUpdateRejected, encode_checkpoint
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.registry import RegistrySet
from esper.tamiyo.schema import POLICY_VERSION
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until
from tests.simic._data import SMALL, blueprints, runs
from tests.tamiyo._fleet import packet, running_tamiyo, tamiyo_settings, urza_stand_in


async def _version_of_decision(trainer: object, step: int) -> str:
    reply = await trainer.request("state", packet(step), timeout_ms=2000)  # type: ignore[attr-defined]
    assert reply.message_type == pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
    return str(reply.message_as(pb.AdaptationCommand).annotations["policy_version"])


def test_unreadable_checkpoints_are_never_published() -> None:
    for data in (b"", b"not a checkpoint"):
        with pytest.raises(PolicyUpdateRejected) as exc:
            build_update(data)
        assert exc.value.reason == "invalid_payload"


async def test_simic_update_goes_live_and_bad_ones_are_refused(make_client: ClientFactory, settings: OonaSettings,
                                                                tmp_path: Path) -> None:
    trainer, simic, urza = await make_client("tolaria"), await make_client("simic"), await make_client("urza")
    forger = await make_client("simic", leyline_secret=SecretStr("not-the-fleet-secret"))
    simic_settings = SimicSettings(imitation_epochs=1, awr_epochs=1, batch_size=48, gate_min_holdout=10,
                                   leyline_secret="s" * 32)
    # Serving widths, registries of Simic's own: deterministic indexing makes them Tamiyo-compatible.
    result = run_round(runs(n_runs=4, steps=24), initial_model(), simic_settings, blueprints=blueprints(),
                       registries=RegistrySet.new(), policy_version="simic-live-1")
    assert result.train.steps > 0
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path)) as tamiyo:
        async def catalogue() -> bool:
            return bool(tamiyo.catalog.view().blueprints)

        await wait_until(catalogue, what="catalogue fetched")
        assert await _version_of_decision(trainer, 1) == POLICY_VERSION
        update = await publish_policy(simic, result.checkpoint, training_run_id="simic-test")

        async def live() -> bool:
            return tamiyo.worker.live.version == "simic-live-1"

        await wait_until(live, what="Simic's update applied")
        assert tamiyo.worker.live.policy_id == update.policy_id
        assert await _version_of_decision(trainer, 2) == "simic-live-1"  # decisions continue on the new policy
        served = tamiyo.worker.policy.model.state_dict()
        assert all(torch.equal(v, served[k]) for k, v in result.candidate.state_dict().items())
        before = {k: v.clone() for k, v in served.items()}

        torch.manual_seed(5)
        small = encode_checkpoint(TamiyoGNN(SMALL), RegistrySet.new(), policy_version="simic-small")
        bad: list[tuple[str, Callable[[], Awaitable[pb.PolicyUpdate]]]] = [
            ("bad_signature", lambda: publish_policy(forger, result.checkpoint, policy_id="pu-forged")),
            ("stale_update", lambda: publish_policy(simic, result.checkpoint, policy_id="pu-stale",
                                                    issued_at_ms=now_ms() - 3_600_000)),
            ("shape_mismatch", lambda: publish_policy(simic, small, policy_id="pu-small")),
        ]
        for n, (reason, send) in enumerate(bad, start=1):
            await send()

            async def refused(reason: str = reason) -> bool:
                return bool(tamiyo.updates_rejected.labels(reason)._value.get() >= 1)

            await wait_until(refused, what=f"{reason} refused")
            assert tamiyo.worker.live.version == "simic-live-1"
            assert await _version_of_decision(trainer, 2 + n) == "simic-live-1"
        served = tamiyo.worker.policy.model.state_dict()
        assert all(torch.equal(v, served[k]) for k, v in before.items())
        assert tamiyo.updates_applied._value.get() == 1
    assert await simic.redis.xlen(CHANNELS["policy"].normal_stream) == 4
