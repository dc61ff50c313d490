"""decide(): the action table, selection of real seeds/blueprints, explicit failures, annotations and
blend-mode gating; CompiledPolicy's CPU path and eager fallbacks. Logits are forced through the
heads' biases (their weights zeroed), so the tests need no training."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
import torch

from esper.core.errors import ConfigurationError, DependencyViolationError
from esper.leyline import pb
from esper.tamiyo.compile import ENV_ENABLE_COMPILE, CompiledPolicy, compile_requested, warmup_inputs
from esper.tamiyo.gnn import GNNConfig, PolicyOutputs, TamiyoGNN
from esper.tamiyo.policy import (
    ACTION_GERMINATE,
    ACTION_PAUSE,
    BLEND_MODES,
    BlendModeSettings,
    GraphIds,
    PolicyDecision,
    decide,
    eligible_pairs,
    joint_action_logits,
    risk_score,
)
from esper.tamiyo.schema import BLEND_METHODS, POLICY_CLASSES, POLICY_VERSION, NodeType
from tests.tamiyo.test_gnn import random_graph

SMALL = GNNConfig(hidden_dim=16, gat_dim=8, gat_heads=2)
COUNTS = {"global": 1, "seed": 3, "blueprint": 2, "layer": 3, "activation": 1, "parameter": 1}
ALWAYS = (
    "policy_action",
    "policy_param_delta",
    "policy_version",
    "blending_method",
    "blending_method_index",
    "policy_value_estimate",
    "policy_risk_index",
    "policy_risk_score",
    "feature_coverage",
    "breaker_open_score",
    "breaker_close_score",
    "blending_schedule_units",
    "blending_schedule_start",
    "blending_schedule_end",
)
BLEND_KEYS = ("blend_mode", "gate_k", "gate_tau", "alpha_lo", "alpha_hi", "alpha_vec", "alpha_vec_len",
              "confidence_logits")


@dataclass
class Ids:
    """Stands in for the builder's GraphInputs (the ids and coverage decide() reads)."""

    seed_ids: list[str] = field(default_factory=lambda: ["seed-a", "seed-b", "seed-c"])
    blueprint_ids: list[str] = field(default_factory=lambda: ["BP001", "BP002"])
    feature_coverage: float = 0.75


def _forced(action: int, counts: dict[NodeType, int] | None = None, **head_bias: list[float]) -> PolicyOutputs:
    """One forward of a small model whose graph-level heads output exactly the given biases, and whose
    seed and blueprint scores (zero, i.e. all tied, in an untrained model) are random, as trained ones."""
    torch.manual_seed(0)
    model = TamiyoGNN(SMALL).eval()
    for head in (model.seed_score_head, model.blueprint_score_head, model.pair_blueprint_proj):
        head.reset_parameters()
    head_bias["policy_head"] = [5.0 if i == action else 0.0 for i in range(32)]
    with torch.no_grad():
        for name, bias in head_bias.items():
            last = [m for m in getattr(model, name).modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
    out: PolicyOutputs = model(*random_graph(counts or COUNTS))
    return out


def _ids_for(counts: dict[NodeType, int]) -> Ids:
    return Ids([f"seed-{i}" for i in range(counts["seed"])], [f"BP{i:03d}" for i in range(counts["blueprint"])])


def test_germinate_targets_the_best_dormant_seed() -> None:
    out = _forced(0)
    ids = ["seed-a", "seed-b", "seed-c"]
    # A seed's worth is its score plus its best blueprint's score for it (the pair is one choice).
    scores = (out.seed_scores[:3] + out.blueprint_scores[:3, :2].max(dim=1).values).detach().tolist()
    best = ids[scores.index(max(scores))]
    others = [i for i in ids if i != best]
    d = decide(out, Ids(), germinable=frozenset(others))
    ranked = sorted(others, key=lambda i: scores[ids.index(i)], reverse=True)
    assert d.command.command_type == pb.COMMAND_SEED and d.command.target_seed_id == ranked[0]


def test_germinate_with_no_dormant_seed_is_an_annotated_pause() -> None:
    d = decide(_forced(0), Ids(), germinable=frozenset())
    assert d.command.command_type == pb.COMMAND_PAUSE and d.no_dormant_seed
    assert d.command.annotations["reason"] == "no_dormant_seed"
    assert decide(_forced(1), Ids(), germinable=frozenset()).command.command_type == pb.COMMAND_OPTIMIZER


def test_graph_inputs_shape_satisfies_protocol() -> None:
    ids: GraphIds = Ids()
    assert ids.feature_coverage == 0.75


def test_action_0_germinates_best_real_seed_and_blueprint() -> None:
    out = _forced(0, param_head=[0.2, 0.0, 0.0, 0.0], schedule_head=[0.5, -0.5], blending_head=[0.0, 3.0, 0.0])
    pairs = out.seed_scores[:3].unsqueeze(1) + out.blueprint_scores[:3, :2]  # seed score + blueprint's for it
    seed_row, bp_row = divmod(int(pairs.argmax()), 2)
    d = decide(out, Ids())
    cmd = d.command
    assert d.action == 0 and cmd.command_type == pb.COMMAND_SEED
    assert cmd.seed_operation.operation == pb.SEED_OP_GERMINATE
    assert cmd.target_seed_id == ["seed-a", "seed-b", "seed-c"][seed_row]
    assert cmd.seed_operation.blueprint_id == ["BP001", "BP002"][bp_row]
    params = cmd.seed_operation.parameters
    assert params["alpha"] == pytest.approx(0.1 + math.tanh(0.2), abs=1e-6)
    assert params["blending_method_index"] == 1.0 and d.blending_method == BLEND_METHODS[1]
    start, end = 0.5 * (math.tanh(-0.5) + 1), 0.5 * (math.tanh(0.5) + 1)  # ordered start ≤ end
    assert (params["blending_schedule_start"], params["blending_schedule_end"]) == pytest.approx((start, end))
    assert cmd.annotations["selected_seed"] == cmd.target_seed_id
    assert cmd.annotations["selected_blueprint"] == cmd.seed_operation.blueprint_id
    # Unsigned: the service's signer owns command_id, issued_at and the signature.
    assert cmd.command_id == "" and not cmd.HasField("issued_at") and "signature" not in cmd.annotations
    assert cmd.version == 1 and cmd.issued_by == "tamiyo"


def test_exploration_draws_germinate_blueprints_at_random_and_says_so() -> None:
    counts = {**COUNTS, "blueprint": 6}
    ids = _ids_for(counts)
    out = _forced(0, counts)
    seed_row = list(ids.seed_ids).index(decide(out, ids).seed_id)
    best = ids.blueprint_ids[int(out.blueprint_scores[seed_row, :6].argmax())]
    assert decide(out, ids, explore=random.Random(0), explore_epsilon=0.0).blueprint_id == best
    plain = decide(out, ids)
    assert plain.blueprint_id == best and "explored" not in plain.command.annotations
    picks = []
    rng = random.Random(7)
    for _ in range(60):
        d = decide(out, ids, explore=rng, explore_epsilon=1.0)
        assert d.command.annotations["explored"] == "blueprint"
        assert d.command.seed_operation.blueprint_id == d.blueprint_id == d.command.annotations["selected_blueprint"]
        picks.append(d.blueprint_id)
    assert set(picks) == set(ids.blueprint_ids)  # every candidate gets tried, not just the best
    # Only a GERMINATE explores: other actions are untouched.
    pause = decide(_forced(2, counts), ids, explore=random.Random(0), explore_epsilon=1.0)
    assert pause.command.command_type == pb.COMMAND_PAUSE and "explored" not in pause.command.annotations


def test_alpha_never_negative() -> None:
    d = decide(_forced(0, param_head=[-9.0, 0.0, 0.0, 0.0]), Ids())
    assert d.param_delta == pytest.approx(-1.0, abs=1e-6)
    assert d.command.seed_operation.parameters["alpha"] == 0.0


def test_action_1_adjusts_the_optimizer() -> None:
    d = decide(_forced(1, param_head=[-0.3, 0.0, 0.0, 0.0]), Ids())
    cmd = d.command
    assert cmd.command_type == pb.COMMAND_OPTIMIZER and cmd.WhichOneof("payload") == "optimizer_adjustment"
    assert cmd.optimizer_adjustment.optimizer_id == "sgd"
    assert cmd.optimizer_adjustment.hyperparameters["lr_delta"] == pytest.approx(math.tanh(-0.3), abs=1e-6)
    assert cmd.target_seed_id == ""


@pytest.mark.parametrize(("action", "state"), [(3, pb.CIRCUIT_STATE_OPEN), (4, pb.CIRCUIT_STATE_CLOSED)])
def test_actions_3_and_4_drive_the_breaker(action: int, state: int) -> None:
    cmd = decide(_forced(action), Ids()).command
    assert cmd.command_type == pb.COMMAND_CIRCUIT_BREAKER
    assert cmd.circuit_breaker.desired_state == state and cmd.circuit_breaker.rationale == "policy_action"


@pytest.mark.parametrize("action", [2, 5, 17, 31])
def test_other_actions_pause_for_policy(action: int) -> None:
    cmd = decide(_forced(action), Ids()).command
    assert cmd.command_type == pb.COMMAND_PAUSE and cmd.annotations["reason"] == "policy"
    assert cmd.annotations["policy_action"] == str(action) and cmd.WhichOneof("payload") is None


@pytest.mark.parametrize("action", [0, 1, 2, 3, 4, 31])
def test_annotations_always_present(action: int) -> None:
    d = decide(_forced(action), Ids(), policy_version=POLICY_VERSION)
    ann = d.command.annotations
    assert all(k in ann for k in ALWAYS), [k for k in ALWAYS if k not in ann]
    assert ann["policy_version"] == POLICY_VERSION == "tamiyo_gnn_v2"
    assert ann["blending_method"] in BLEND_METHODS
    assert ann["blending_method"] == BLEND_METHODS[int(ann["blending_method_index"])]
    assert ann["blending_schedule_units"] == "fraction_0_1"
    assert 0.0 <= float(ann["blending_schedule_start"]) <= float(ann["blending_schedule_end"]) <= 1.0
    assert 0.0 <= float(ann["policy_risk_score"]) <= 1.0 and 0 <= int(ann["policy_risk_index"]) < 5
    assert 0.0 <= float(ann["breaker_open_score"]) <= 1.0 and 0.0 <= float(ann["breaker_close_score"]) <= 1.0
    assert float(ann["feature_coverage"]) == 0.75
    assert float(ann["policy_value_estimate"]) == pytest.approx(d.value_estimate, abs=1e-6)
    assert ann["selected_seed"] in Ids().seed_ids and ann["selected_blueprint"] in Ids().blueprint_ids
    assert not any(k in ann for k in BLEND_KEYS)  # blend-mode annotations are off by default


def test_selection_ignores_placeholder_rows() -> None:
    out = _forced(0)
    # A placeholder seed row (mask False) with the highest raw score must still lose.
    rigged = replace(
        out,
        seed_scores=torch.tensor([0.1, 0.9, 0.3, 99.0]),
        seed_mask=torch.tensor([True, True, True, False]),
        blueprint_scores=torch.tensor([[0.2, 99.0]] * 4),
        blueprint_mask=torch.tensor([True, False]),
    )
    d = decide(rigged, Ids(blueprint_ids=["BP007"]))
    assert d.seed_id == "seed-b" and d.blueprint_id == "BP007"
    assert d.command.target_seed_id == "seed-b" and d.command.seed_operation.blueprint_id == "BP007"


def test_whether_to_germinate_depends_on_the_pairs_the_state_allows() -> None:
    """GERMINATE's logit is its own plus the logsumexp of the eligible pairs' scores: a good pair in a
    DORMANT seed makes growing win over a stronger PAUSE; with only poor pairs left it pauses."""
    rigged = replace(_forced(ACTION_PAUSE).detach_cpu(), seed_scores=torch.tensor([0.0, 0.0, 0.0]),
                     blueprint_scores=torch.tensor([[-9.0, -9.0], [9.0, 0.0], [-9.0, -9.0]]),
                     seed_mask=torch.tensor([True, True, True]), blueprint_mask=torch.tensor([True, True]))
    grow = decide(rigged, Ids())
    assert grow.action == ACTION_GERMINATE and (grow.seed_id, grow.blueprint_id) == ("seed-b", "BP001")
    rest = decide(rigged, Ids(), germinable=frozenset({"seed-a", "seed-c"}))
    assert rest.action == ACTION_PAUSE and rest.command.command_type == pb.COMMAND_PAUSE
    logits = joint_action_logits(rigged.policy_logits, rigged.seed_scores, rigged.blueprint_scores,
                                 torch.tensor([True, False, True]))
    expected = rigged.policy_logits[ACTION_GERMINATE] + torch.logsumexp(torch.tensor([-9.0] * 4), 0)
    assert float(logits[ACTION_GERMINATE]) == pytest.approx(float(expected))
    assert torch.equal(logits[1:], rigged.policy_logits[1:])  # the other actions keep their logits


def test_seed_and_blueprint_are_chosen_as_a_pair() -> None:
    """The best pair wins, not the best seed then the best blueprint: seed-b scores highest alone,
    but BP002 in seed-a beats anything in seed-b; and each seed reads its own row of blueprint scores."""
    rigged = replace(_forced(0), seed_scores=torch.tensor([0.1, 0.9, 0.3]),
                     blueprint_scores=torch.tensor([[0.0, 2.0], [0.5, 0.0], [1.0, -1.0]]),
                     seed_mask=torch.tensor([True, True, True]), blueprint_mask=torch.tensor([True, True]))
    d = decide(rigged, Ids())
    assert (d.seed_id, d.blueprint_id) == ("seed-a", "BP002")
    only_c = decide(rigged, Ids(), germinable=frozenset({"seed-c"}))
    assert (only_c.seed_id, only_c.blueprint_id) == ("seed-c", "BP001")


def test_a_design_culled_in_a_seed_this_run_is_not_grown_there_again() -> None:
    """The best pair overall is BP002 in seed-a (2.1); once Kasmina culled it there, the best pair the
    policy may still grow wins (BP001 in seed-b, 1.4, then BP001 in seed-c, 1.3); the culled pairs also
    leave GERMINATE's logsumexp bonus."""
    rigged = replace(_forced(0).detach_cpu(), seed_scores=torch.tensor([0.1, 0.9, 0.3]),
                     blueprint_scores=torch.tensor([[0.0, 2.0], [0.5, 0.0], [1.0, -1.0]]),
                     seed_mask=torch.tensor([True, True, True]), blueprint_mask=torch.tensor([True, True]))
    d = decide(rigged, Ids(), culled=frozenset({("seed-a", "BP002")}))
    assert d.action == ACTION_GERMINATE and (d.seed_id, d.blueprint_id) == ("seed-b", "BP001")
    d = decide(rigged, Ids(), culled=frozenset({("seed-a", "BP002"), ("seed-b", "BP001")}))
    assert (d.seed_id, d.blueprint_id) == ("seed-c", "BP001")
    # A cull elsewhere (another seed, or a design not in the graph) changes nothing.
    elsewhere = decide(rigged, Ids(), culled=frozenset({("seed-b", "BP002"), ("seed-a", "BP999")}))
    assert (elsewhere.seed_id, elsewhere.blueprint_id) == ("seed-a", "BP002")
    allowed = eligible_pairs(Ids().seed_ids, Ids().blueprint_ids, frozenset({"seed-a", "seed-c"}),
                             frozenset({("seed-a", "BP002")}))
    assert allowed.tolist() == [[True, False], [False, False], [True, True]]
    logits = joint_action_logits(rigged.policy_logits, rigged.seed_scores, rigged.blueprint_scores, allowed)
    expected = rigged.policy_logits[ACTION_GERMINATE] + torch.logsumexp(torch.tensor([0.1, 1.3, 0.3 - 1.0]), 0)
    assert float(logits[ACTION_GERMINATE]) == pytest.approx(float(expected))


def test_every_design_culled_in_every_dormant_seed_is_an_annotated_pause() -> None:
    culled = frozenset((s, b) for s in ("seed-a", "seed-b", "seed-c") for b in ("BP001", "BP002"))
    d = decide(_forced(0), Ids(), culled=culled)
    assert d.action == ACTION_PAUSE and d.command.command_type == pb.COMMAND_PAUSE and d.all_culled
    assert d.command.annotations["reason"] == "all_culled" and not d.no_dormant_seed
    # Culls in seeds that are not DORMANT do not count: seed-c is dormant with its designs open.
    partly = frozenset(p for p in culled if p[0] != "seed-c")
    assert decide(_forced(0), Ids(), culled=partly).seed_id == "seed-c"
    assert decide(_forced(0), Ids(), germinable=frozenset({"seed-a"}), culled=partly).all_culled


def test_exploration_never_draws_a_design_culled_in_that_seed() -> None:
    counts = {**COUNTS, "seed": 1, "blueprint": 4}
    ids = _ids_for(counts)
    culled = frozenset({("seed-0", "BP000"), ("seed-0", "BP002")})
    rng = random.Random(3)
    picks = {decide(_forced(0, counts), ids, culled=culled, explore=rng, explore_epsilon=1.0).blueprint_id
             for _ in range(40)}
    assert picks == {"BP001", "BP003"}


def test_exploration_draws_among_the_least_grown_designs_first() -> None:
    """Counts are per (seed, design): BP001 and BP003 were grown once in seed-0, BP000 and BP002 never
    there (BP000 twice in another seed), so only those two are drawn; with every count equal, all are."""
    counts = {**COUNTS, "seed": 1, "blueprint": 4}
    ids = _ids_for(counts)
    out = _forced(0, counts)
    tried = {("seed-0", "BP001"): 1, ("seed-0", "BP003"): 1, ("seed-9", "BP000"): 2}
    rng = random.Random(5)
    picks = {decide(out, ids, explore=rng, explore_epsilon=1.0, tried=tried).blueprint_id for _ in range(40)}
    assert picks == {"BP000", "BP002"}
    even = {("seed-0", f"BP{i:03d}"): 3 for i in range(4)}
    assert {decide(out, ids, explore=rng, explore_epsilon=1.0, tried=even).blueprint_id
            for _ in range(60)} == set(ids.blueprint_ids)
    # A design culled in the seed is out even when it is the least grown.
    culled = decide(out, ids, explore=rng, explore_epsilon=1.0, tried=tried, culled={("seed-0", "BP000")})
    assert culled.blueprint_id == "BP002"


@pytest.mark.parametrize("missing", ["seed", "blueprint"])
def test_germinate_without_real_seed_or_blueprint_is_a_dependency_violation(missing: str) -> None:
    counts = dict(COUNTS, **{missing: 0})
    out = _forced(0, counts)
    assert out.seed_mask.sum() == counts["seed"] and out.blueprint_mask.sum() == counts["blueprint"]
    with pytest.raises(DependencyViolationError, match=missing):
        decide(out, _ids_for(counts))


def test_no_real_seed_is_fine_for_other_actions_and_invents_no_ids() -> None:
    counts = dict(COUNTS, seed=0, blueprint=0)
    d = decide(_forced(2, counts), _ids_for(counts))
    assert d.seed_id is None and d.blueprint_id is None
    assert "selected_seed" not in d.command.annotations and "selected_blueprint" not in d.command.annotations
    assert d.command.target_seed_id == ""


def test_ids_that_do_not_match_the_real_rows_are_a_dependency_violation() -> None:
    with pytest.raises(DependencyViolationError, match="seed"):
        decide(_forced(1), Ids(seed_ids=["only-one"]))
    with pytest.raises(DependencyViolationError, match="empty id"):
        decide(_forced(0), Ids(seed_ids=["", "", ""]))


def test_non_finite_outputs_are_refused() -> None:
    out = _forced(1)
    with pytest.raises(DependencyViolationError, match="policy_logits"):
        decide(replace(out, policy_logits=torch.full((32,), math.nan)), Ids())


def test_feature_coverage_map_is_averaged() -> None:
    @dataclass
    class MapIds:
        seed_ids: list[str] = field(default_factory=lambda: Ids().seed_ids)
        blueprint_ids: list[str] = field(default_factory=lambda: Ids().blueprint_ids)
        feature_coverage: dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 0.5})

    assert decide(_forced(2), MapIds()).feature_coverage == 0.75


def test_risk_score_is_expected_severity() -> None:
    assert risk_score(torch.zeros(5)) == pytest.approx(0.5)
    assert risk_score(torch.tensor([20.0, 0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-6)
    assert risk_score(torch.tensor([0, 0, 0, 0, 20.0])) == pytest.approx(1.0, abs=1e-6)
    d = decide(_forced(2, risk_head=[0.0, 0.0, 0.0, 9.0, 0.0]), Ids())
    assert d.risk_index == 3 and d.risk_score == pytest.approx(0.75, abs=0.01)


# --- blend-mode annotations (P8) ---------------------------------------------------------------


def _blend(blend: BlendModeSettings, channels: int | None = None) -> PolicyDecision:
    return decide(
        _forced(0, param_head=[0.3, 0, 0, 0]), Ids(), blend_mode_annotations=True, blend=blend, channel_count=channels
    )


@pytest.mark.parametrize("mode", ["CONVEX", "RESIDUAL"])
def test_blend_mode_plain(mode: str) -> None:
    ann = _blend(BlendModeSettings(mode=mode)).command.annotations
    assert ann["blend_mode"] == mode
    assert not any(k in ann for k in ("gate_k", "alpha_vec", "blend_mode_fallback"))


def test_blend_mode_confidence_adds_gate() -> None:
    blend = BlendModeSettings(mode="CONFIDENCE", gate_k=4.0, gate_tau=0.2, alpha_lo=0.1, alpha_hi=0.9)
    ann = _blend(blend).command.annotations
    assert ann["blend_mode"] == "CONFIDENCE"
    assert [float(ann[k]) for k in ("gate_k", "gate_tau", "alpha_lo", "alpha_hi")] == [4.0, 0.2, 0.1, 0.9]
    assert len(json.loads(ann["confidence_logits"])) == POLICY_CLASSES  # the action logits the gate reads


def test_blend_mode_channel_with_known_channels() -> None:
    d = _blend(BlendModeSettings(mode="CHANNEL"), channels=8)
    ann = d.command.annotations
    vec = json.loads(ann["alpha_vec"])
    assert ann["blend_mode"] == "CHANNEL" and ann["alpha_vec_len"] == "8" and len(vec) == 8
    assert vec == pytest.approx([d.command.seed_operation.parameters["alpha"]] * 8, abs=1e-6)


@pytest.mark.parametrize(("channels", "reason"), [(None, "channel_count_unknown"), (65, "channel_count_exceeds_max")])
def test_blend_mode_channel_falls_back_without_a_vector(channels: int | None, reason: str) -> None:
    ann = _blend(BlendModeSettings(mode="CHANNEL"), channels=channels).command.annotations
    assert ann["blend_mode"] == "CONVEX" and ann["blend_mode_fallback"] == reason
    assert "alpha_vec" not in ann and "alpha_vec_len" not in ann


def test_blend_mode_only_on_seed_commands() -> None:
    d = decide(_forced(1), Ids(), blend_mode_annotations=True, blend=BlendModeSettings(mode="CONFIDENCE"))
    assert not any(k in d.command.annotations for k in BLEND_KEYS)


def test_blend_settings_validated() -> None:
    assert BLEND_MODES == ("CONVEX", "RESIDUAL", "CHANNEL", "CONFIDENCE")
    with pytest.raises(ConfigurationError):
        BlendModeSettings(mode="LINEAR")
    with pytest.raises(ConfigurationError):
        BlendModeSettings(alpha_lo=0.8, alpha_hi=0.2)


# --- CompiledPolicy ------------------------------------------------------------------------------


def _small_model() -> TamiyoGNN:
    torch.manual_seed(0)
    return TamiyoGNN(SMALL)


def test_compile_env_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not compile_requested({})
    assert compile_requested({ENV_ENABLE_COMPILE: "true"}) and compile_requested({ENV_ENABLE_COMPILE: "1"})
    assert not compile_requested({ENV_ENABLE_COMPILE: "0"})
    monkeypatch.setenv(ENV_ENABLE_COMPILE, "yes")
    assert compile_requested()


def test_cpu_runs_eager_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_ENABLE_COMPILE, "1")
    model = _small_model()
    policy = CompiledPolicy(model)
    assert (policy.compile_enabled, policy.compile_reason, policy.compile_fallback_total) == (0, "cpu", 0)
    assert policy.compile_warm_ms == 0.0 and not model.training
    graph = random_graph()
    out = policy(*graph)
    assert torch.equal(out.policy_logits, model(*graph).policy_logits)
    assert policy.telemetry()["compile_reason"] == "cpu"


def test_compile_error_falls_back_to_eager() -> None:
    def broken(_: TamiyoGNN) -> Callable[..., PolicyOutputs]:
        raise RuntimeError("inductor exploded")

    policy = CompiledPolicy(_small_model(), enabled=True, require_cuda=False, compiler=broken)
    assert policy.compile_enabled == 0 and policy.compile_fallback_total == 1
    assert policy.compile_reason == "compile_error:RuntimeError"
    assert policy(*random_graph()).policy_logits.shape == (32,)


def test_warm_up_failure_and_runtime_failure_fall_back_once() -> None:
    calls = {"n": 0}

    def flaky(model: TamiyoGNN) -> Callable[..., PolicyOutputs]:
        def run(*args: object) -> PolicyOutputs:
            calls["n"] += 1
            raise RuntimeError("guard failure")

        return run

    warm = CompiledPolicy(_small_model(), enabled=True, require_cuda=False, compiler=flaky)
    assert (warm.compile_enabled, warm.compile_fallback_total, warm.compile_reason) == (
        0,
        1,
        "compile_error:RuntimeError",
    )

    lazy = CompiledPolicy(_small_model(), enabled=True, require_cuda=False, compiler=flaky, warmup=False)
    assert lazy.compile_enabled == 1
    graph = random_graph()
    first, second = lazy(*graph), lazy(*graph)
    assert torch.equal(first.policy_logits, second.policy_logits)
    assert (lazy.compile_enabled, lazy.compile_fallback_total) == (0, 1)
    assert lazy.compile_reason == "runtime_error:RuntimeError" and calls["n"] == 2  # one in warm, one in lazy


def test_working_compiler_is_warmed_once() -> None:
    seen: list[int] = []

    def identity(model: TamiyoGNN) -> Callable[..., PolicyOutputs]:
        def run(*args: object) -> PolicyOutputs:
            seen.append(1)
            out: PolicyOutputs = model(*args)
            return out

        return run

    policy = CompiledPolicy(_small_model(), enabled=True, require_cuda=False, compiler=identity)
    assert (policy.compile_enabled, policy.compile_reason, policy.compile_fallback_total) == (1, "compiled", 0)
    assert policy.compile_warm_ms > 0.0 and len(seen) == 1
    policy(*random_graph())
    assert len(seen) == 2


def test_warmup_inputs_have_every_type_and_relation() -> None:
    x, ei, ea, counts = warmup_inputs()
    out = _small_model().eval()(x, ei, ea, counts)
    assert out.seed_mask.all() and min(v.size(0) for v in x.values()) >= 2
    assert all(v.size(1) >= 2 for v in ei.values()) and all(v.shape == (ei[r].size(1), 3) for r, v in ea.items())
