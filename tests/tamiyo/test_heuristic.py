"""The rule-based policy (TAMIYO_POLICY=heuristic): one seed at a time, germinate on a plateau."""

from __future__ import annotations

from pathlib import Path

from esper.leyline import pb, verify_command
from esper.oona import OonaSettings
from esper.tamiyo.culls import culled_pairs
from esper.tamiyo.heuristic import HEURISTIC_VERSION, HeuristicPolicy
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until
from tests.tamiyo._fleet import running_tamiyo, tamiyo_settings, urza_stand_in

SEEDS = ["seed-hidden1", "seed-hidden2"]


def _packet(epoch: int, val_loss: float, *, stages: tuple[int, int] = (pb.SEED_STAGE_DORMANT,) * 2,
            run: str = "r") -> pb.SystemStatePacket:
    return pb.SystemStatePacket(
        training_run_id=run, current_epoch=epoch, validation_loss=val_loss, packet_id=f"p{epoch}",
        seed_states=[pb.SeedState(seed_id=s, stage=st, layer_depth=i + 1)
                     for i, (s, st) in enumerate(zip(SEEDS, stages, strict=True))])


def _decide(policy: HeuristicPolicy, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
    return policy.decide(packet, seed_ids=SEEDS, blueprint_ids=["BP005", "BP002"], feature_coverage=0.5).command


def test_germinates_on_a_plateau_then_waits_for_the_seed() -> None:
    policy = HeuristicPolicy(patience=2, min_improvement=0.01, cooldown_epochs=2)
    rules = [_decide(policy, _packet(e, loss)).annotations["rule"] for e, loss in
             [(1, 1.0), (2, 0.8), (3, 0.6), (4, 0.599), (5, 0.598)]]
    assert rules == ["improving", "improving", "improving", "improving", "plateau"]
    cmd = _decide(policy, _packet(5, 0.598))
    assert cmd.command_type == pb.COMMAND_PAUSE and cmd.annotations["rule"] == "cooldown"
    first = _decide(HeuristicPolicy(cooldown_epochs=0), _packet(5, 0.598))
    assert first.command_type == pb.COMMAND_PAUSE  # a fresh policy has no history: no plateau yet
    in_flight = _decide(policy, _packet(9, 0.598, stages=(pb.SEED_STAGE_TRAINING, pb.SEED_STAGE_DORMANT)))
    assert in_flight.annotations["rule"] == "seed_in_flight"


def test_plateau_germinate_targets_the_shallowest_dormant_seed_and_best_blueprint() -> None:
    policy = HeuristicPolicy(patience=1, min_improvement=0.01, cooldown_epochs=0)
    for e, loss in [(1, 0.5), (2, 0.5)]:
        cmd = _decide(policy, _packet(e, loss, stages=(pb.SEED_STAGE_FOSSILIZED, pb.SEED_STAGE_DORMANT)))
    assert cmd.command_type == pb.COMMAND_SEED and cmd.annotations["rule"] == "plateau"
    assert cmd.target_seed_id == "seed-hidden2" and cmd.seed_operation.blueprint_id == "BP005"
    assert cmd.annotations["policy_version"] == HEURISTIC_VERSION
    none_left = _decide(policy, _packet(3, 0.5, stages=(pb.SEED_STAGE_FOSSILIZED,) * 2))
    assert none_left.annotations["rule"] == "no_dormant_seed"


def _observe(policy: HeuristicPolicy, epoch: int, stages: tuple[int, int], run: str = "r") -> None:
    """A packet inside the cooldown: it shows the seeds' stages and must not germinate."""
    assert _decide(policy, _packet(epoch, 0.5, stages=stages, run=run)).annotations["rule"] == "cooldown"


def test_a_blueprint_culled_in_a_seed_is_not_grown_there_again() -> None:
    policy = HeuristicPolicy(patience=1, min_improvement=0.01, cooldown_epochs=2)
    culled = (pb.SEED_STAGE_EMBARGOED, pb.SEED_STAGE_DORMANT)
    _decide(policy, _packet(1, 0.5))
    first = _decide(policy, _packet(2, 0.5))
    assert (first.target_seed_id, first.seed_operation.blueprint_id) == ("seed-hidden1", "BP005")
    _observe(policy, 3, culled)  # Kasmina culled it: its seed is embargoed
    second = _decide(policy, _packet(4, 0.5))
    assert (second.target_seed_id, second.seed_operation.blueprint_id) == ("seed-hidden1", "BP002")
    # Which pairs it could not grow travels with the command, for Simic (as the GNN's do).
    assert "culled_pairs" not in first.annotations
    assert culled_pairs(second.annotations) == {("seed-hidden1", "BP005")}
    _observe(policy, 5, culled)
    third = _decide(policy, _packet(6, 0.5))  # both designs failed in seed-hidden1: the next seed
    assert (third.target_seed_id, third.seed_operation.blueprint_id) == ("seed-hidden2", "BP005")
    assert third.annotations["rule"] == "plateau"
    # A fossilised seed is no failure: its design stays the first choice for the next seed.
    other = HeuristicPolicy(patience=1, min_improvement=0.01, cooldown_epochs=2)
    _decide(other, _packet(1, 0.5, run="r2"))
    assert _decide(other, _packet(2, 0.5, run="r2")).seed_operation.blueprint_id == "BP005"
    _observe(other, 3, (pb.SEED_STAGE_FOSSILIZED, pb.SEED_STAGE_DORMANT), run="r2")
    nxt = _decide(other, _packet(4, 0.5, run="r2", stages=(pb.SEED_STAGE_FOSSILIZED, pb.SEED_STAGE_DORMANT)))
    assert (nxt.target_seed_id, nxt.seed_operation.blueprint_id) == ("seed-hidden2", "BP005")


def test_a_cull_between_the_packets_seen_still_counts() -> None:
    """With several replicas (or a short embargo) this one may never see the cull stages: a grown seed
    seen in flight and then DORMANT again was culled all the same."""
    policy = HeuristicPolicy(patience=1, min_improvement=0.01, cooldown_epochs=2)
    _decide(policy, _packet(1, 0.5))
    assert _decide(policy, _packet(2, 0.5)).seed_operation.blueprint_id == "BP005"
    assert _decide(policy, _packet(3, 0.5, stages=(pb.SEED_STAGE_TRAINING, pb.SEED_STAGE_DORMANT))
                   ).annotations["rule"] == "seed_in_flight"
    again = _decide(policy, _packet(4, 0.5))  # DORMANT again: no CULLED / EMBARGOED packet in between
    assert (again.target_seed_id, again.seed_operation.blueprint_id) == ("seed-hidden1", "BP002")


def test_every_design_culled_everywhere_pauses_and_says_so() -> None:
    policy = HeuristicPolicy(patience=1, min_improvement=0.01, cooldown_epochs=2)
    _decide(policy, _packet(1, 0.5))
    epoch = 2
    for stages in [(pb.SEED_STAGE_CULLED, pb.SEED_STAGE_DORMANT)] * 2 + [(pb.SEED_STAGE_DORMANT,
                                                                          pb.SEED_STAGE_RESETTING)] * 2:
        assert _decide(policy, _packet(epoch, 0.5)).command_type == pb.COMMAND_SEED
        _observe(policy, epoch + 1, stages)
        epoch += 2
    last = _decide(policy, _packet(epoch, 0.5))
    assert last.command_type == pb.COMMAND_PAUSE and last.annotations["rule"] == "all_culled"


async def test_service_serves_the_heuristic(make_client: ClientFactory, settings: OonaSettings,
                                            tmp_path: Path) -> None:
    trainer, urza = await make_client("tolaria"), await make_client("urza")
    async with urza_stand_in(urza), running_tamiyo(tamiyo_settings(settings, tmp_path, policy="heuristic")) as t:
        async def fetched() -> bool:
            return bool(t.catalog.view().blueprints)

        await wait_until(fetched, what="catalogue fetched")
        reply = await trainer.request("state", _packet(1, 0.9, run="run1"), timeout_ms=2000)
    cmd = reply.message_as(pb.AdaptationCommand)
    verify_command(cmd, trainer.keys)
    assert cmd.annotations["policy_version"] == HEURISTIC_VERSION and cmd.annotations["rule"] == "improving"


async def test_the_heuristic_annotates_the_configured_blend_mode(make_client: ClientFactory, settings: OonaSettings,
                                                                 tmp_path: Path) -> None:
    """With TAMIYO_ENABLE_BLEND_MODE_ANN both policies tell Kasmina how to blend (the experiment compares
    them on equal terms); CONFIDENCE needs policy logits, which rules do not have: CONVEX, said so."""
    trainer, urza = await make_client("tolaria"), await make_client("urza")
    for mode, expected in (("RESIDUAL", "RESIDUAL"), ("CONFIDENCE", "CONVEX")):
        tamiyo = tamiyo_settings(settings, tmp_path / mode, policy="heuristic", enable_blend_mode_ann=True,
                                 blend_mode_default=mode)
        async with urza_stand_in(urza), running_tamiyo(tamiyo) as t:
            async def fetched() -> bool:
                return bool(t.catalog.view().blueprints)

            await wait_until(fetched, what="catalogue fetched")
            for epoch in (1, 2, 3):  # the same loss three epochs running: a plateau at the third
                reply = await trainer.request("state", _packet(epoch, 0.9, run=f"run-{mode}"), timeout_ms=2000)
        cmd = reply.message_as(pb.AdaptationCommand)
        assert cmd.command_type == pb.COMMAND_SEED and cmd.annotations["rule"] == "plateau"
        assert cmd.annotations["blend_mode"] == expected
        assert (cmd.annotations.get("blend_mode_fallback") == "no_policy_logits") == (mode == "CONFIDENCE")
