"""Simic's offline training: samples from field reports, the batched forward, a training step, the gate."""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest
import torch

from esper.leyline import pb
from esper.simic.dataset import RewardConfig, Sample, action_of, build_samples, split_by_run
from esper.simic.pipeline import run_round
from esper.simic.settings import SimicSettings
from esper.simic.training import (
    TrainConfig,
    TrainingCancelled,
    action_balance,
    allowed_pairs,
    collate,
    count_preserving_shift,
    effective_actions,
    fit_fates,
    forward_batch,
    gate,
    germinable_states,
    germinate_margins,
    joint_logits,
    pair_head_parameters,
    policy_score,
    sample_weights,
    train_policy,
    train_step,
)
from esper.tamiyo.checkpoint import decode_checkpoint
from esper.tamiyo.culls import CULLED_PAIRS_ANNOTATION, encode_culled
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.policy import ACTION_BREAKER_CLOSE, ACTION_GERMINATE, ACTION_OPTIMIZER, ACTION_PAUSE, decide
from esper.tamiyo.registry import RegistrySet
from tests.simic._data import SMALL, blueprints, decision_report, runs, two_blueprints


def _small(seed: int = 0) -> TamiyoGNN:
    torch.manual_seed(seed)
    return TamiyoGNN(SMALL).eval()


def test_samples_carry_action_targets_and_advantages() -> None:
    reports = runs(n_runs=2, steps=12)
    reports.append(decision_report("run9", 1, "seed", 1.0, run_index=9))
    synth = pb.FieldReport(report_id="fr-synth-x", command_id="run9-c1", outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS)
    synth.issued_at.FromMilliseconds(1)
    no_observation = pb.FieldReport(report_id="fr-old", command_id="c-old", training_run_id="run0")
    no_observation.issued_at.FromMilliseconds(2)
    samples = build_samples([*reports, synth, no_observation], blueprints=blueprints())
    assert len(samples) == 25  # every decision report; the synthetic and observation-less ones are evidence only
    by_id = {s.report_id: s for s in samples}
    opt, pause, seed = by_id["fr-run0-c1"], by_id["fr-run0-c2"], by_id["fr-run9-c1"]
    assert (opt.action, opt.param_target) == (ACTION_OPTIMIZER, pytest.approx(-0.5))
    assert (pause.action, pause.param_target) == (ACTION_PAUSE, None)
    assert seed.action == ACTION_GERMINATE and seed.param_target == pytest.approx(0.2)
    assert seed.graph.seed_ids[seed.seed_target or 0] == "seed-1" and seed.blueprint_target == 0
    assert seed.reward == pytest.approx(0.1)  # its observation window ended in SUCCESS; no next decision
    assert opt.reward == pytest.approx(0.05, abs=1e-6) and pause.reward == pytest.approx(-0.02, abs=1e-6)
    run0 = [s for s in samples if s.run_id == "run0"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([s.advantage for s in run0 if s.action == ACTION_OPTIMIZER]) > \
        mean([s.advantage for s in run0 if s.action == ACTION_PAUSE])
    assert action_of(pb.AdaptationCommand(command_type=pb.COMMAND_ROLLBACK)) is None


def test_graphs_are_rebuilt_with_tamiyos_candidate_cap() -> None:
    """A germination of a design past the cap has no blueprint row in the rebuilt graph (as in the one Tamiyo
    decided on with the same cap); with Tamiyo's larger cap it has."""
    report = decision_report("run9", 1, "seed", 1.0, run_index=9)
    report.command.seed_operation.blueprint_id = "BP002"  # riskier than BP001: ranked second
    capped = build_samples([report], blueprints=two_blueprints(), max_blueprints=1)
    wide = build_samples([report], blueprints=two_blueprints(), max_blueprints=2)
    assert capped[0].graph.blueprint_ids == ["BP001"] and capped[0].blueprint_target is None
    assert wide[0].graph.blueprint_ids == ["BP001", "BP002"] and wide[0].blueprint_target == 1


@pytest.mark.parametrize(("stage", "fate"), [(pb.SEED_STAGE_FOSSILIZED, 1.0), (pb.SEED_STAGE_CULLED, -1.0),
                                             (pb.SEED_STAGE_EMBARGOED, -1.0), (pb.SEED_STAGE_BLENDING, 0.0)])
def test_a_germination_is_credited_with_its_seeds_fate(stage: int, fate: float) -> None:
    """Kasmina's verdict on the seed (read from the run's later packets) is the GERMINATE's reward:
    fossilised = measured benefit, culled = none; a seed still in flight when the run ends counts 0."""
    reports = [decision_report("r", 1, "seed", 1.0), decision_report("r", 2, "pause", 1.0),
               decision_report("r", 3, "pause", 1.0)]
    for later in reports[1:]:
        target = next(s for s in later.observation.seed_states if s.seed_id == "seed-1")
        target.stage = stage  # type: ignore[assignment]
    other = next(s for s in reports[1].observation.seed_states if s.seed_id == "seed-0")
    other.stage = pb.SEED_STAGE_CULLED  # another seed's fate is not this germination's
    samples = {s.step: s for s in build_samples(reports, blueprints=blueprints())}
    assert samples[1].reward == pytest.approx(fate, abs=1e-6)
    assert samples[2].reward == pytest.approx(0.0, abs=1e-6)  # pauses get no fate
    unweighted = build_samples(reports, blueprints=blueprints(), rewards=RewardConfig(fate_reward=0.0))
    assert unweighted[0].reward == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("evidence", "fate"), [(0.5, 1.0), (0.031, 1.0), (0.029, -1.0), (-0.2, -1.0), (None, 1.0)])
def test_a_seed_kept_on_too_little_evidence_counts_as_a_cull(evidence: float | None, fate: float) -> None:
    """FOSSILIZED needs `evidence_mean` ≥ `fate_min_improvement` (0.03) to count as a benefit; a packet
    without the metric (before Kasmina exported it) keeps the plain verdict."""
    reports = [decision_report("r", 1, "seed", 1.0), decision_report("r", 2, "pause", 1.0)]
    target = next(s for s in reports[1].observation.seed_states if s.seed_id == "seed-1")
    target.stage = pb.SEED_STAGE_FOSSILIZED
    if evidence is not None:
        target.metrics["evidence_mean"] = evidence
    samples = {s.step: s for s in build_samples(reports, blueprints=blueprints())}
    assert samples[1].fate == fate
    assert samples[1].reward == pytest.approx(fate, abs=1e-6)
    lenient = build_samples(reports, blueprints=blueprints(), rewards=RewardConfig(fate_min_improvement=-1.0))
    assert lenient[0].fate == 1.0  # the same report under a threshold every finite evidence passes


def test_a_set_cancel_event_stops_training_before_the_next_step() -> None:
    samples = build_samples(runs(n_runs=2, steps=8), blueprints=blueprints())
    model = TamiyoGNN(SMALL)
    before = [p.detach().clone() for p in model.parameters()]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TrainingCancelled):
        train_policy(model, samples, TrainConfig(imitation_epochs=1, awr_epochs=1), cancel=cancel)
    assert all(bool((a == p).all()) for a, p in zip(before, model.parameters(), strict=True))  # not one step
    report = train_policy(model, samples, TrainConfig(imitation_epochs=1, awr_epochs=1), cancel=threading.Event())
    assert report.steps > 0


def test_risk_engine_replacements_are_not_learned_as_the_policys_choice() -> None:
    """A GERMINATE the risk engine turned into OPTIMIZER ran as OPTIMIZER, but the policy did not
    choose it: it is no sample (and the loss it spanned still reaches the decision before it)."""
    reports = runs(n_runs=1, steps=6)
    downgraded = reports[2]  # step 3: an OPTIMIZER in the data
    downgraded.command.annotations["policy_command"] = "COMMAND_SEED"
    samples = build_samples(reports, blueprints=blueprints())
    assert [s.step for s in samples] == [1, 2, 4, 5, 6]
    kept = build_samples(runs(n_runs=1, steps=6), blueprints=blueprints())
    by_step = {s.step: s for s in kept}
    step2 = next(s for s in samples if s.step == 2)
    assert step2.reward == pytest.approx(by_step[2].reward + by_step[3].reward, abs=1e-6)


def test_a_sample_knows_the_pairs_culled_earlier_in_its_run() -> None:
    """The command's culled_pairs annotation becomes (seed row, blueprint row) pairs the policy could not
    grow: they leave GERMINATE's bonus, and with every pair of the DORMANT seeds culled GERMINATE keeps
    its own logit. A design not in the graph is dropped; an unreadable annotation is no sample."""
    reports = runs(n_runs=1, steps=4)
    reports[1].command.annotations[CULLED_PAIRS_ANNOTATION] = encode_culled({("seed-1", "BP002"), ("seed-0", "BP999")})
    reports[2].command.annotations[CULLED_PAIRS_ANNOTATION] = "not json"
    samples = build_samples(reports, blueprints=two_blueprints())
    assert [s.step for s in samples] == [1, 2, 4]
    first, second = samples[0], samples[1]
    seed_row, bp_row = list(second.graph.seed_ids).index("seed-1"), list(second.graph.blueprint_ids).index("BP002")
    assert first.culled == frozenset() and second.culled == {(seed_row, bp_row)}
    assert not bool(allowed_pairs(second)[seed_row, bp_row]) and int(allowed_pairs(second).sum()) == 5
    everything = replace(second, culled=frozenset((i, j) for i in range(3) for j in range(2)))
    out = forward_batch(_small(), collate([everything]))
    assert torch.equal(joint_logits([everything], out)[0].detach(), out.policy_logits[0].detach())


def test_split_holds_out_whole_newest_runs() -> None:
    samples = build_samples(runs(n_runs=4, steps=6), blueprints=blueprints())
    train, held = split_by_run(samples, 0.25)
    assert {s.run_id for s in held} == {"run3"} and "run3" not in {s.run_id for s in train}
    assert split_by_run([s for s in samples if s.run_id == "run0"], 0.25)[1] == []


def test_batched_forward_matches_the_serving_forward() -> None:
    samples = build_samples(runs(n_runs=1, steps=5), blueprints=blueprints())
    samples += build_samples(runs(n_runs=1, steps=3))  # graphs without blueprint nodes mixed in
    model = _small(3)
    out = forward_batch(model, collate(samples))
    first = first_bp = 0
    for i, s in enumerate(samples):
        g = s.graph
        alone = model(g.x, g.edge_index, g.edge_attr, g.counts)
        n = g.counts["seed"]
        torch.testing.assert_close(out.policy_logits[i], alone.policy_logits)
        torch.testing.assert_close(out.value[i], alone.value)
        torch.testing.assert_close(out.param_delta[i], alone.param_delta)
        torch.testing.assert_close(out.seed_scores[first:first + n], alone.seed_scores[:n])
        n_bp = g.counts["blueprint"]
        torch.testing.assert_close(out.blueprint_scores[first:first + n, first_bp:first_bp + n_bp],
                                   alone.blueprint_scores[:n, :n_bp])
        first += n
        first_bp += n_bp
    assert (first, first_bp) == tuple(out.blueprint_scores.shape) and first_bp > 0


def test_a_training_step_decreases_the_loss_on_a_fixed_batch() -> None:
    samples = build_samples(runs(n_runs=2, steps=16), blueprints=blueprints())
    model = _small()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    weights = sample_weights(samples, phase="awr", beta=1.0, max_weight=20.0, adv_scale=0.05)
    losses = [train_step(model, optimizer, samples, weights) for _ in range(6)]
    assert losses[-1] < losses[0], losses


def _fixed_policy(action: int, delta_sign: float) -> TamiyoGNN:
    """A policy that always picks `action` with a param_delta of sign `delta_sign`."""
    model = _small()
    with torch.no_grad():
        model.policy_head.weight.zero_()
        model.policy_head.bias.fill_(-1.0)
        model.policy_head.bias[action] = 1.0
        last = model.param_head[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.zero_()
        last.bias.fill_(delta_sign)
    return model.eval()


def test_gate_refuses_a_worse_policy_and_accepts_a_better_one() -> None:
    held = build_samples(runs(n_runs=2, steps=24), blueprints=blueprints())
    lowers_lr = _fixed_policy(ACTION_OPTIMIZER, -1.0)
    raises_lr = _fixed_policy(ACTION_OPTIMIZER, 1.0)  # same action, the other sign: never agrees
    pauses = _fixed_policy(ACTION_PAUSE, 0.0)
    assert policy_score(lowers_lr, held) > policy_score(pauses, held)
    assert policy_score(raises_lr, held) == 0.0
    assert gate(lowers_lr, pauses, held).accepted
    refused = gate(pauses, lowers_lr, held)
    assert not refused.accepted and refused.candidate_score < refused.current_score
    assert not gate(raises_lr, lowers_lr, held).accepted
    assert not gate(lowers_lr, lowers_lr, held).accepted  # equal is not better
    too_few = gate(lowers_lr, pauses, held[:5], min_holdout=20)
    assert not too_few.accepted and "held-out" in too_few.reason


def test_gate_judges_on_the_decisions_that_tell_the_policies_apart() -> None:
    """Hundreds of decisions both policies get wrong (or right) must not drown the few where they
    differ: two OPTIMIZER policies differ only on the lr_delta sign, worth 0.01 a decision here."""
    held = build_samples(runs(n_runs=2, steps=24), blueprints=blueprints())
    held = [replace(s, advantage=0.01 if s.action == ACTION_OPTIMIZER else (5.0 if s.step % 4 else -5.0))
            for s in held]
    lowers_lr, raises_lr = _fixed_policy(ACTION_OPTIMIZER, -1.0), _fixed_policy(ACTION_OPTIMIZER, 1.0)
    assert policy_score(lowers_lr, held) < 0.01  # over all decisions: below the margin
    result = gate(lowers_lr, raises_lr, held, margin=0.01)
    n_opt = sum(s.action == ACTION_OPTIMIZER for s in held)
    assert result.accepted and result.decisive == n_opt
    assert (result.candidate_score, result.current_score) == (pytest.approx(1.0), pytest.approx(0.0))
    assert not gate(raises_lr, lowers_lr, held, margin=0.01).accepted
    same = gate(lowers_lr, lowers_lr, held)
    assert not same.accepted and same.decisive == 0 and "apart" in same.reason


def test_actions_are_balanced_so_rare_germinations_count() -> None:
    samples = build_samples(runs(n_runs=1, steps=24), blueprints=blueprints())
    seeds = build_samples([decision_report("run7", i, "seed", 1.0, run_index=7) for i in (1, 2)],
                          blueprints=blueprints())
    balance = action_balance([*samples, *seeds], cap=50.0)
    n = len(samples) + 2
    assert balance[ACTION_GERMINATE] == pytest.approx(n / (3 * 2))
    assert balance[ACTION_PAUSE] == pytest.approx(n / (3 * 12))
    counts = {a: sum(1 for x in [*samples, *seeds] if x.action == a) for a in balance}
    shares = {a: balance[a] * counts[a] for a in balance}
    assert max(shares.values()) == pytest.approx(min(shares.values()))  # each action: the same total weight
    assert action_balance([*samples, *seeds], cap=2.0)[ACTION_GERMINATE] == 2.0


def _germinations(blueprint_ids: list[str], advantages: list[float], fates: list[float] | None = None, *,
                  dormant: tuple[str, ...] = ("seed-1",)) -> list[Sample]:
    """GERMINATE samples of seed-1 with the given blueprints, advantages and seed fates (default: the
    advantage's sign); the seeds not `dormant` are FOSSILIZED (only seed-1 can be grown, by default)."""
    reports = []
    for i, bp in enumerate(blueprint_ids):
        r = decision_report(f"g{i}", 1, "seed", 1.0, run_index=i)
        r.command.seed_operation.blueprint_id = bp
        for st in r.observation.seed_states:
            if st.seed_id not in dormant:
                st.stage = pb.SEED_STAGE_FOSSILIZED
        reports.append(r)
    out = build_samples(reports, blueprints=two_blueprints())
    fates = fates if fates is not None else [1.0 if a > 0 else -1.0 for a in advantages]
    return [replace(x, advantage=a, fate=f) for x, a, f in zip(out, advantages, fates, strict=True)]


def test_the_blueprint_head_learns_the_blueprint_that_paid_and_the_gate_checks_it() -> None:
    ids = list(_germinations(["BP001"], [0.0])[0].graph.blueprint_ids)
    assert len(ids) == 2
    good, bad = ids[1], ids[0]
    samples = _germinations([good] * 4 + [bad] * 4, [1.0] * 4 + [-1.0] * 4)
    model = TamiyoGNN(SMALL)
    torch.manual_seed(0)
    model.reset_parameters()
    with torch.no_grad():  # always GERMINATE, so only the blueprint decides agreement
        model.policy_head.weight.zero_()
        model.policy_head.bias.fill_(-1.0)
        model.policy_head.bias[ACTION_GERMINATE] = 1.0
    before = policy_score(model, samples)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    weights = sample_weights(samples, phase="imitation", beta=1.0, max_weight=20.0, adv_scale=1.0)
    for _ in range(40):
        train_step(model, optimizer, samples, weights)
    model.eval()
    pair = effective_actions(model, samples[:1])[0].pair
    assert pair is not None and ids[pair[1]] == good
    assert policy_score(model, samples) == pytest.approx(0.5)  # agrees with the 4 good, not the 4 bad
    assert policy_score(model, samples) > before or before == pytest.approx(0.5)
    # The same action with the bad blueprint is a disagreement: it scores against, not for.
    flipped = [replace(x, advantage=-x.advantage) for x in samples]
    assert policy_score(model, flipped) == pytest.approx(-0.5)


def test_the_blueprint_is_learned_from_fossilised_seeds_not_from_the_runs_return() -> None:
    """A design whose seeds were culled, grown in runs that went well anyway (higher advantage), must
    not be learned over one whose seeds Kasmina fossilised."""
    ids = list(_germinations(["BP001"], [0.0])[0].graph.blueprint_ids)
    culled_in_good_runs, fossilised = ids[0], ids[1]
    samples = _germinations([culled_in_good_runs] * 4 + [fossilised] * 4, [1.0] * 4 + [0.5] * 4,
                            fates=[-1.0] * 4 + [1.0] * 4)
    model = TamiyoGNN(SMALL)
    torch.manual_seed(0)
    model.reset_parameters()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    weights = sample_weights(samples, phase="awr", beta=0.2, max_weight=20.0, adv_scale=1.0)  # favours the culled
    for _ in range(40):
        train_step(model, optimizer, samples, weights)
    model.eval()
    for x in (samples[0], samples[-1]):
        pair = effective_actions(model, [x])[0].pair
        assert pair is not None and ids[pair[1]] == fossilised


def test_the_blueprint_is_learned_per_seed() -> None:
    """One state, three DORMANT seeds: BP001 fossilised in seed-0 and was culled in seed-2, BP002 the
    reverse. A blueprint score that ignored the seed (architecture v1) could not learn both."""
    base = _germinations(["BP001"], [1.0], dormant=("seed-0", "seed-1", "seed-2"))[0]
    seed_ids, ids = list(base.graph.seed_ids), list(base.graph.blueprint_ids)
    plan = [("seed-0", 0, 1.0), ("seed-0", 1, -1.0), ("seed-2", 1, 1.0), ("seed-2", 0, -1.0)] * 3
    samples = [replace(base, seed_target=seed_ids.index(sid), blueprint_target=bp, advantage=fate, fate=fate)
               for sid, bp, fate in plan]
    model = TamiyoGNN(SMALL)
    torch.manual_seed(0)
    model.reset_parameters()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    weights = sample_weights(samples, phase="imitation", beta=1.0, max_weight=20.0, adv_scale=1.0)
    for _ in range(60):
        train_step(model, optimizer, samples, weights)
    model.eval()
    scores = forward_batch(model, collate(samples[:1])).blueprint_scores
    assert ids[int(scores[seed_ids.index("seed-0")].argmax())] == ids[0]
    assert ids[int(scores[seed_ids.index("seed-2")].argmax())] == ids[1]
    # What Tamiyo grows is one of the two fossilised pairs, never a culled one.
    pair = effective_actions(model, samples[:1])[0].pair
    assert pair is not None and (seed_ids[pair[0]], ids[pair[1]]) in {("seed-0", ids[0]), ("seed-2", ids[1])}


def test_the_action_simic_scores_is_the_one_tamiyo_takes_with_the_pairs_in_its_logit() -> None:
    """GERMINATE competes with its logit plus the logsumexp of the DORMANT pairs (as Tamiyo decides):
    strong pairs make a policy whose PAUSE logit is higher grow; with no DORMANT seed it pauses."""
    base = _germinations(["BP001"], [1.0])[0]
    model = TamiyoGNN(SMALL).eval()
    with torch.no_grad():
        model.policy_head.weight.zero_()
        model.policy_head.bias.fill_(-5.0)
        model.policy_head.bias[ACTION_PAUSE] = 2.0
        model.policy_head.bias[ACTION_GERMINATE] = 0.0
        model.blueprint_score_head.bias.fill_(3.0)  # every pair scores 3: logsumexp ≈ 3 + log(pairs)
    assert effective_actions(model, [base])[0].action == ACTION_GERMINATE
    none_dormant = replace(base, germinable=(False,) * len(base.germinable))
    assert effective_actions(model, [none_dormant])[0].action == ACTION_PAUSE
    # The action loss leaves the pair scores alone (they enter detached) ...
    model.train()
    model.zero_grad()
    out = forward_batch(model, collate([base]))
    torch.nn.functional.cross_entropy(joint_logits([base], out), torch.tensor([ACTION_GERMINATE])).backward()
    assert model.policy_head.bias.grad is not None and float(model.policy_head.bias.grad.abs().sum()) > 0
    assert model.blueprint_score_head.bias.grad is None or float(model.blueprint_score_head.bias.grad) == 0.0


def test_pair_scores_learn_the_odds_that_kasmina_keeps_the_seed() -> None:
    """A fossilised germination raises its pair's score, a culled one lowers it; an unknown fate
    (the run ended first) teaches nothing."""
    ids = list(_germinations(["BP001"], [0.0])[0].graph.blueprint_ids)

    @torch.no_grad()
    def pair_score(model: TamiyoGNN, x: Sample) -> float:
        out = forward_batch(model, collate([x]))
        return float(out.seed_scores[x.seed_target or 0] + out.blueprint_scores[x.seed_target or 0,
                                                                                 x.blueprint_target or 0])

    moved = {}
    for fate in (1.0, -1.0, 0.0):
        x = _germinations([ids[0]], [0.0], fates=[fate])[0]
        model = TamiyoGNN(SMALL)
        torch.manual_seed(0)
        model.reset_parameters()
        for p in model.parameters():  # only the fate loss may move the pair: freeze everything else
            p.requires_grad_(False)
        heads = [model.seed_score_head, model.blueprint_score_head]
        for head in heads:
            for p in head.parameters():
                p.requires_grad_(True)
        model.eval()
        before = pair_score(model, x)
        optimizer = torch.optim.SGD([p for h in heads for p in h.parameters()], lr=0.1)
        train_step(model, optimizer, [x], torch.ones(1), value_weight=0.0)
        model.eval()
        moved[fate] = pair_score(model, x) - before
    assert moved[1.0] > 0 and moved[-1.0] < 0 and moved[0.0] == 0.0, moved


def test_fit_fates_ranks_designs_by_their_record_and_polishing_keeps_the_model_trainable() -> None:
    """Kept 3 times in 4 beats kept once in 4; the fate loss falls; a state with no verdict teaches
    nothing. `train_policy` refits the pair layers alone at the end and leaves every parameter trainable."""
    ids = list(_germinations(["BP001"], [0.0])[0].graph.blueprint_ids)
    good, bad = ids[1], ids[0]
    verdicts = _germinations([good] * 4 + [bad] * 4, [0.0] * 8, fates=[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0])
    model = TamiyoGNN(SMALL)
    torch.manual_seed(0)
    model.reset_parameters()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert fit_fates(model, optimizer, verdicts, steps=0) == []
    assert fit_fates(model, optimizer, [replace(x, fate=0.0) for x in verdicts], steps=5) == []
    losses = fit_fates(model, optimizer, verdicts, steps=30)
    assert len(losses) == 30 and losses[-1] < losses[0]
    model.eval()
    pair = effective_actions(model, verdicts[:1])[0].pair
    assert pair is not None and ids[pair[1]] == good
    heads = pair_head_parameters(model)
    assert heads and all(any(p is h for p in model.parameters()) for h in heads)
    pauses = build_samples(runs(2), blueprints=two_blueprints())
    report = train_policy(model, [*pauses, *verdicts], TrainConfig(imitation_epochs=1, awr_epochs=1, fate_steps=3,
                                                                      fate_polish_steps=3))
    assert report.steps >= 2 and len(report.fate_losses) == 6 and all(p.requires_grad for p in model.parameters())
    pair = effective_actions(model, verdicts[:1])[0].pair
    assert pair is not None and ids[pair[1]] == good


def test_refitting_the_pair_layers_changes_what_is_grown_not_how_often() -> None:
    """Two trainings alike but for the final refit of the pair layers: the margins moved, and
    GERMINATE wins the argmax in as many probe states as without the refit."""
    ids = list(_germinations(["BP001"], [0.0])[0].graph.blueprint_ids)
    verdicts = _germinations([ids[1]] * 4 + [ids[0]] * 4, [0.5] * 8, fates=[1.0] * 4 + [-1.0] * 4)
    data = [*build_samples(runs(2), blueprints=two_blueprints()), *verdicts]
    probe = germinable_states(data, rng=random.Random(0))
    assert probe and all(any(x.germinable) for x in probe)

    def trained(polish: int) -> TamiyoGNN:
        model = TamiyoGNN(SMALL)
        torch.manual_seed(0)
        model.reset_parameters()
        train_policy(model, data, TrainConfig(imitation_epochs=1, awr_epochs=1, fate_steps=2,
                                              fate_polish_steps=polish))
        return model

    plain, refitted = germinate_margins(trained(0), probe), germinate_margins(trained(30), probe)
    assert float((plain - refitted).abs().max()) > 1e-3
    assert int((refitted > 0).sum()) == int((plain > 0).sum())


def test_the_count_preserving_shift_leaves_k_margins_positive() -> None:
    margins = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
    for k in range(6):
        assert int((margins - count_preserving_shift(margins, k) > 0).sum()) == k
    assert count_preserving_shift(torch.zeros(0), 0) == 0.0


def test_a_round_trains_a_candidate_that_passes_the_gate(tmp_path: object) -> None:
    current = _fixed_policy(ACTION_PAUSE, 0.0)
    settings = SimicSettings(imitation_epochs=2, awr_epochs=6, batch_size=32, learning_rate=5e-3, gate_min_holdout=10,
                             leyline_secret="s" * 32)
    registries = RegistrySet.new()
    result = run_round(runs(n_runs=4, steps=24), current, settings, blueprints=blueprints(), registries=registries,
                       policy_version="simic-test")
    assert result.samples == 96 and result.holdout == 24
    assert result.train.last_loss < result.train.first_loss
    assert result.gate.accepted, result.gate
    decoded = decode_checkpoint(result.checkpoint)
    assert decoded.policy_version == "simic-test" and decoded.gnn_config["hidden_dim"] == SMALL.hidden_dim
    assert decoded.registry_schema == registries.schema_digest()


def test_simic_judges_the_action_tamiyo_would_take() -> None:
    """`effective_actions` (what the gate scores) and Tamiyo's `decide` agree on the action and, for a
    GERMINATE, the (seed, blueprint) pair, over random score heads, random DORMANT sets and random
    pairs culled earlier in the run."""
    samples = build_samples(runs(n_runs=2, steps=12), blueprints=two_blueprints())
    checked = {ACTION_GERMINATE: 0, ACTION_PAUSE: 0}
    for trial in range(4):
        torch.manual_seed(trial)
        model = TamiyoGNN(SMALL).eval()
        with torch.no_grad():
            for head in (model.seed_score_head, model.blueprint_score_head, model.pair_blueprint_proj,
                         model.policy_head):
                head.reset_parameters()
            model.policy_head.bias[ACTION_GERMINATE] += 1.0
        rng = random.Random(trial)
        varied = [replace(s, germinable=tuple(rng.random() < 0.5 for _ in s.germinable),
                          culled=frozenset((i, j) for i in range(len(s.germinable))
                                           for j in range(s.graph.counts["blueprint"]) if rng.random() < 0.3))
                  for s in samples]
        for s, eff in zip(varied, effective_actions(model, varied), strict=True):
            g = s.graph
            with torch.no_grad():
                out = model(g.x, g.edge_index, g.edge_attr, g.counts)
            d = decide(out, g, germinable=frozenset(i for i, ok in zip(g.seed_ids, s.germinable, strict=True) if ok),
                       culled=frozenset((g.seed_ids[i], g.blueprint_ids[j]) for i, j in s.culled))
            action = d.action if d.action <= ACTION_BREAKER_CLOSE else ACTION_PAUSE
            assert action == eff.action
            if action == ACTION_GERMINATE:
                assert eff.pair == (list(g.seed_ids).index(d.seed_id), list(g.blueprint_ids).index(d.blueprint_id))
            if action in checked:
                checked[action] += 1
    assert min(checked.values()) > 0, checked  # both kinds of decision were compared
