"""Every rejection reason: signed, tampered, replayed and dated commands; annotation checks; commands
that cannot execute. Each refusal is a CommandRejected (a DependencyViolationError for the trainer)
with a `command_rejected` event, and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from esper.core.errors import DependencyViolationError
from esper.kasmina import ANNOTATION_REASONS, SECURITY_REASONS, CommandRejected, Kasmina, parse_germination
from esper.kasmina.validation import CommandValidator
from esper.leyline import pb, sign_command
from esper.tamiyo.gnn import PolicyOutputs
from esper.tamiyo.policy import BlendModeSettings, decide
from tests.kasmina._helpers import (
    KEYS,
    NOW_MS,
    OTHER_KEYS,
    SEED,
    KarnKernelSource,
    TinyHost,
    clock,
    command,
    events,
    fast_settings,
    sign_raw,
)


@pytest.fixture
def kasmina() -> Kasmina:
    model = TinyHost()
    k = Kasmina(keys=KEYS, settings=fast_settings(), kernels=KarnKernelSource(),
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1), clock_ms=clock)
    k.register_host(model)
    return k


def _rejected(kasmina: Kasmina, cmd: pb.AdaptationCommand, reason: str) -> CommandRejected:
    before = kasmina.stage(SEED)
    with pytest.raises(DependencyViolationError) as info:
        kasmina.apply_command(cmd)
    err = info.value
    assert isinstance(err, CommandRejected) and err.reason == reason, err
    assert kasmina.stage(SEED) == before
    rejected = events(kasmina, "command_rejected")
    assert [e["reason"] for e in rejected] == [reason]
    return err


# -- security, in the prototype's order ----------------------------------------------------------------


def _tampered() -> pb.AdaptationCommand:
    cmd = command()
    cmd.seed_operation.blueprint_id = "BP045"  # swap in a hazard after signing
    return cmd


def _unsigned_id() -> pb.AdaptationCommand:
    return sign_raw(command(command_id="", keys=None), KEYS)


SECURITY_CASES: dict[str, Callable[[], pb.AdaptationCommand]] = {
    "missing_signature": lambda: command(keys=None),
    "invalid_signature": _tampered,
    "missing_command_id": _unsigned_id,
    "issued_in_future": lambda: command(issued_at_ms=NOW_MS + 5_001),
    "stale_command": lambda: command(issued_at_ms=NOW_MS - 60_001),
    "missing_timestamp": lambda: command(issued_at_ms=None),
}


@pytest.mark.parametrize("reason", sorted(SECURITY_CASES))
def test_security_rejections(kasmina: Kasmina, reason: str) -> None:
    err = _rejected(kasmina, SECURITY_CASES[reason](), reason)
    assert reason in SECURITY_REASONS and str(err)


def test_unknown_key_and_garbage_signature_are_invalid(kasmina: Kasmina) -> None:
    _rejected(kasmina, command(keys=OTHER_KEYS), "invalid_signature")
    cmd = command()
    cmd.annotations["signature"] = "!!not base64!!"
    _rejected(kasmina, cmd, "invalid_signature")


def test_verifier_unavailable_without_keys() -> None:
    k = Kasmina(keys=None, kernels=KarnKernelSource(), clock_ms=clock)
    k.register_host(TinyHost())
    _rejected(k, command(), "verifier_unavailable")


def test_a_replay_the_full_nonce_cache_forgot_is_refused_as_stale() -> None:
    """More commands than the nonce cache holds within the freshness window: an id is dropped while
    its command is still fresh. Its replay must not pass; a command issued after that is accepted."""
    now = [NOW_MS]
    v = CommandValidator(KEYS, nonce_capacity=2, max_future_ms=100, clock_ms=lambda: now[0])
    first = command(kind=pb.COMMAND_PAUSE, seed_id="", issued_at_ms=NOW_MS)
    for i, cmd in enumerate([first, *(command(kind=pb.COMMAND_PAUSE, seed_id="", issued_at_ms=NOW_MS + 1000 * k)
                                      for k in (1, 2))]):
        now[0] = NOW_MS + 1000 * i
        v.validate(cmd)  # the third drops the first's id, 2 s into its 60 s of freshness
    now[0] = NOW_MS + 2500
    with pytest.raises(CommandRejected) as info:
        v.validate(first)
    assert info.value.reason == "stale_command" and "nonce cache full" in info.value.detail
    v.validate(command(kind=pb.COMMAND_PAUSE, seed_id="", issued_at_ms=NOW_MS + 2500))


def test_nonce_replayed(kasmina: Kasmina) -> None:
    cmd = command(kind=pb.COMMAND_PAUSE, seed_id="")
    assert kasmina.apply_command(cmd).action == "acknowledged"
    _rejected(kasmina, cmd, "nonce_replayed")


def test_boundaries_are_inclusive(kasmina: Kasmina) -> None:
    for at in (NOW_MS + 5_000, NOW_MS - 60_000):
        assert kasmina.apply_command(command(pb.COMMAND_PAUSE, seed_id="", issued_at_ms=at)).action == "acknowledged"


def test_check_order(kasmina: Kasmina) -> None:
    _rejected(kasmina, command(keys=None, issued_at_ms=NOW_MS - 120_000), "missing_signature")
    stale = command(issued_at_ms=NOW_MS - 120_000)
    _rejected(kasmina, stale, "stale_command")
    _rejected(kasmina, stale, "nonce_replayed")  # the nonce check comes before the clock checks


def test_a_command_outliving_its_nonce_is_stale() -> None:
    """Nonces are forgotten after 300 s, but by then the command is long past the 60 s freshness window."""
    now = [NOW_MS]
    k = Kasmina(keys=KEYS, clock_ms=lambda: now[0])
    cmd = command(pb.COMMAND_PAUSE, seed_id="", issued_at_ms=NOW_MS + 4_000)
    k.apply_command(cmd)
    now[0] += 300_001
    with pytest.raises(CommandRejected) as info:
        k.apply_command(cmd)
    assert info.value.reason == "stale_command"


# -- annotations ---------------------------------------------------------------------------------------

ANNOTATION_CASES: dict[str, dict[str, str]] = {
    "invalid_blend_mode": {"blend_mode": "MAGIC"},
    "invalid_blending_method": {"blend_mode": "CONVEX", "blending_method": "sawtooth"},
    "missing_confidence_logits": {"blend_mode": "CONFIDENCE", "gate_k": "4", "gate_tau": "0.2"},
    "invalid_confidence_logits": {"blend_mode": "CONFIDENCE", "confidence_logits": "[1.0]"},
    "invalid_gate_parameters": {"blend_mode": "CONFIDENCE", "confidence_logits": "[1, 2]", "alpha_lo": "0.9",
                                "alpha_hi": "0.1"},
    "missing_alpha_vec": {"blend_mode": "CHANNEL"},
    "invalid_alpha_vec": {"blend_mode": "CHANNEL", "alpha_vec": "[0.1, 1.5]"},
    "invalid_mesh_layers": {"mesh_host_layers": "{\"a\": 1}"},
}


@pytest.mark.parametrize("reason", sorted(ANNOTATION_CASES))
def test_annotation_rejections(kasmina: Kasmina, reason: str) -> None:
    assert reason in ANNOTATION_REASONS
    _rejected(kasmina, command(annotations=ANNOTATION_CASES[reason]), reason)


@pytest.mark.parametrize("annotations", [
    {"blend_mode": "CONFIDENCE", "confidence_logits": "[1, \"x\"]"},
    {"blend_mode": "CONFIDENCE", "confidence_logits": "[1, NaN]"},
    {"blend_mode": "CONFIDENCE", "confidence_logits": "[1, 2]", "gate_k": "inf"},
    {"blend_mode": "CHANNEL", "alpha_vec": "[0.5, 0.5]", "alpha_vec_len": "3"},
    {"blend_mode": "CHANNEL", "alpha_vec": "[]"},
    {"blend_mode": "CHANNEL", "alpha_vec": json.dumps([0.5] * 7)},  # the slot has 8 channels
    {"blend_mode": "CHANNEL", "alpha_vec": "[" + "9" * 400 + "]"},  # an int no float holds: OverflowError
    {"blend_mode": "CONFIDENCE", "confidence_logits": "[1, 2]", "gate_k": "0"},  # NaN on extreme logits
    {"blend_mode": "CONFIDENCE", "confidence_logits": "[1, 2]", "gate_k": "-4"},  # the gate turned around
])
def test_more_bad_annotations(kasmina: Kasmina, annotations: dict[str, str]) -> None:
    """Each is a typed rejection with its event; some escaped as OverflowError or were accepted."""
    with pytest.raises(CommandRejected) as info:
        kasmina.apply_command(command(annotations=annotations))
    assert info.value.reason in {"invalid_confidence_logits", "invalid_gate_parameters", "invalid_alpha_vec"}
    assert [e["reason"] for e in events(kasmina, "command_rejected")] == [info.value.reason]


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (-(2**62), 0), (0, -5), (0, 2 * 10**9)])
def test_a_timestamp_outside_the_protobuf_range_is_a_rejection(kasmina: Kasmina, seconds: int, nanos: int) -> None:
    """`Timestamp.ToMilliseconds` raises ValueError on these: it escaped `apply_command` untyped."""
    cmd = command(kind=pb.COMMAND_PAUSE, keys=None)
    cmd.issued_at.seconds, cmd.issued_at.nanos = seconds, nanos
    sign_command(cmd, KEYS)
    _rejected_any(kasmina, cmd, "missing_timestamp")
    assert [e["reason"] for e in events(kasmina, "command_rejected")] == ["missing_timestamp"]


def test_parsed_annotations() -> None:
    g = parse_germination(command(annotations={"blend_mode": "confidence", "confidence_logits": "[2.0, 1.0, 0.5]",
                                               "blending_method": "cosine", "mesh_host_layers": "fc1, hidden"}))
    assert (g.blend.mode, g.blend.schedule, g.mesh_layers) == ("CONFIDENCE", "cosine", ("fc1", "hidden"))
    assert (g.blend.gate_k, g.blend.gate_tau) == (4.0, 0.2) and g.blend.gate == pytest.approx(0.960834, abs=1e-6)
    assert parse_germination(command(annotations={"blend_mode": "CHANNEL", "alpha_vec": "0.5,0.25"})).blend.alpha_vec \
        == (0.5, 0.25)
    plain = parse_germination(command())
    assert (plain.blend.mode, plain.blend.schedule, plain.mesh_layers) == ("CONVEX", "tanh", ())


@pytest.mark.parametrize(("text", "names"), [
    ("0", ("0",)), ("0, 3", ("0", "3")), ("decoder.7", ("decoder.7",)), ('["0"]', ("0",)), ('"fc1"', ("fc1",)),
])
def test_mesh_layers_named_by_number_are_names(text: str, names: tuple[str, ...]) -> None:
    """nn.Sequential children are named "0", "1", ...: read as JSON, "0" was the number 0 and refused."""
    assert parse_germination(command(annotations={"mesh_host_layers": text})).mesh_layers == names


# -- commands that cannot execute ---------------------------------------------------------------------

EXECUTION_CASES: dict[str, Callable[[], pb.AdaptationCommand]] = {
    "missing_seed_id": lambda: command(seed_id=""),
    "unknown_seed": lambda: command(seed_id="seed-nowhere"),
    "missing_blueprint_id": lambda: command(blueprint=""),
    "non_finite_parameters": lambda: command(params={"alpha": float("nan")}),
    "slot_mismatch": lambda: command(blueprint="BP002@v64"),
    "illegal_transition": lambda: command(op=pb.SEED_OP_CULL),
    "unsupported_operation": lambda: command(op=pb.SEED_OP_START_TRAINING),
    "unsupported_command": lambda: command(kind=pb.COMMAND_STRUCTURAL_PRUNING),
    "invalid_payload": lambda: _seed_without_payload(),
}


def _seed_without_payload() -> pb.AdaptationCommand:
    cmd = command(keys=None)
    cmd.ClearField("seed_operation")
    return sign_command(cmd, KEYS)


@pytest.mark.parametrize("reason", sorted(EXECUTION_CASES))
def test_execution_rejections(kasmina: Kasmina, reason: str) -> None:
    _rejected(kasmina, EXECUTION_CASES[reason](), reason)


def test_enum_numbers_this_schema_does_not_define_are_rejections(kasmina: Kasmina) -> None:
    """Proto3 keeps an enum number it does not know (a newer Tamiyo's, a forged command's). Naming it
    in the rejection and its event used to raise ValueError, past the trainer's `except CommandRejected`."""
    with pytest.raises(CommandRejected) as info:
        kasmina.apply_command(command(kind=99))
    assert (info.value.reason, info.value.detail) == ("unsupported_command", "UNKNOWN_99")
    assert [(e["reason"], e["command_type"]) for e in events(kasmina, "command_rejected")] == [
        ("unsupported_command", "UNKNOWN_99")]
    assert _rejected(kasmina, command(op=77, keys=KEYS), "unsupported_operation").detail == "UNKNOWN_77"
    unsigned = Kasmina(keys=None, kernels=KarnKernelSource(), clock_ms=clock)
    unsigned.register_host(TinyHost())
    _rejected(unsigned, command(kind=99), "verifier_unavailable")


def test_gate_g0_failure_is_reported(kasmina: Kasmina) -> None:
    with pytest.raises(CommandRejected):
        kasmina.apply_command(command(params={"alpha": float("inf")}))
    failures = events(kasmina, "gate_failure")
    assert [(e["gate"], e["reason"]) for e in failures] == [("G0_SANITY", "non_finite_parameters")]


def test_germinate_twice_and_fossilize_early_are_illegal(kasmina: Kasmina) -> None:
    assert kasmina.apply_command(command()).kernel_pending
    events(kasmina)
    _rejected_any(kasmina, command(), "illegal_transition")
    _rejected_any(kasmina, command(op=pb.SEED_OP_FOSSILIZE), "illegal_transition")
    # DORMANT is checked before G0: a bad germinate aimed at a live seed is no G0 failure of that seed
    _rejected_any(kasmina, command(params={"alpha": float("inf")}), "illegal_transition")
    assert events(kasmina, "gate_failure") == []


def _rejected_any(kasmina: Kasmina, cmd: pb.AdaptationCommand, reason: str) -> None:
    with pytest.raises(CommandRejected) as info:
        kasmina.apply_command(cmd)
    assert info.value.reason == reason


def test_kernel_source_unavailable() -> None:
    k = Kasmina(keys=KEYS, clock_ms=clock)
    k.register_host(TinyHost())
    _rejected(k, command(), "kernel_source_unavailable")


def test_trainer_commands_come_back(kasmina: Kasmina) -> None:
    for kind in (pb.COMMAND_OPTIMIZER, pb.COMMAND_CIRCUIT_BREAKER, pb.COMMAND_ROLLBACK, pb.COMMAND_EMERGENCY):
        cmd = command(kind=kind, seed_id="")
        outcome = kasmina.apply_command(cmd)
        assert outcome.action == "for_trainer" and outcome.for_trainer == cmd
    assert [e["event"] for e in events(kasmina)] == ["emergency_cleanup"]
    # the trainer's to carry out or refuse: not counted here as applied (a refused OPTIMIZER was counted twice)
    assert (kasmina.commands_applied, kasmina.commands_for_trainer) == (0, 4)


# -- what Tamiyo emits --------------------------------------------------------------------------------


class _Ids:
    seed_ids = (SEED,)
    blueprint_ids = ("BP002",)
    feature_coverage = 1.0


def _tamiyo_command(mode: str) -> pb.AdaptationCommand:
    """A GERMINATE built by Tamiyo's own `decide` (blend annotations on), finalised as its worker does."""
    logits = torch.full((32,), -5.0)
    logits[0] = 5.0
    outputs = PolicyOutputs(
        policy_logits=logits, policy_params=torch.tensor([0.2, 0.0, 0.0, 0.0]), param_delta=torch.tensor(0.2),
        blending_logits=torch.tensor([0.0, 3.0, 0.0]), schedule=torch.tensor([-0.5, 0.6]),
        risk_logits=torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]), value=torch.tensor(0.1),
        breaker_logits=torch.tensor([0.0, 0.0]), seed_scores=torch.tensor([1.0]),
        seed_mask=torch.tensor([True]), blueprint_scores=torch.tensor([[1.0]]), blueprint_mask=torch.tensor([True]),
        graph_embedding=torch.zeros(4))
    decision = decide(outputs, _Ids(), blend_mode_annotations=True, blend=BlendModeSettings(mode=mode),
                      channel_count=8)
    cmd = decision.command
    cmd.command_id = f"tamiyo-{mode}"
    cmd.issued_at.FromMilliseconds(NOW_MS)
    cmd.annotations["coverage_map"] = "node.seed=1.00"
    return sign_command(cmd, KEYS)


@pytest.mark.parametrize("mode", ["CONVEX", "RESIDUAL", "CHANNEL", "CONFIDENCE"])
def test_accepts_what_tamiyo_emits(kasmina: Kasmina, mode: str) -> None:
    cmd = _tamiyo_command(mode)
    assert cmd.annotations["blend_mode"] == mode and cmd.annotations["blending_method"] == "cosine"
    outcome = kasmina.apply_command(cmd)
    assert outcome.action == "germinated" and outcome.seed_id == SEED
    state = {s.seed_id: s for s in kasmina.seed_states()}[SEED]
    assert state.stage == pb.SEED_STAGE_GERMINATED and state.metrics["blend_mode_index"] == [
        "CONVEX", "RESIDUAL", "CHANNEL", "CONFIDENCE"].index(mode)


def test_confidence_without_tamiyo_logits_is_refused(kasmina: Kasmina) -> None:
    cmd = _tamiyo_command("CONFIDENCE")
    assert len(json.loads(cmd.annotations["confidence_logits"])) >= 2
    del cmd.annotations["confidence_logits"]
    _rejected(kasmina, sign_command(cmd, KEYS), "missing_confidence_logits")
