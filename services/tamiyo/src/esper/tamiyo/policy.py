"""GNN outputs → one unsigned ``AdaptationCommand`` (REFERENCE §6.3): the action table and its annotations.

Pure and synchronous: no settings, clock or bus. The service passes the knobs in, adds its own
annotations (coverage map, risk reason, blueprint/BSDS facts), runs the risk engine and signs
(``command_id``, ``issued_at`` and the signature are left empty here).

Failures are explicit (ARCHITECTURE §6): germinating with no real seed or no real blueprint, or ids
that do not line up with the graph's real rows, raise ``DependencyViolationError``; an id is never
made up.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import torch
from torch import Tensor

from esper.core.errors import ConfigurationError, DependencyViolationError
from esper.leyline import pb
from esper.tamiyo.gnn import PolicyOutputs
from esper.tamiyo.schema import BLEND_METHODS, POLICY_VERSION

__all__ = [
    "ACTION_BREAKER_CLOSE",
    "ACTION_BREAKER_OPEN",
    "ACTION_GERMINATE",
    "ACTION_OPTIMIZER",
    "ACTION_PAUSE",
    "BLEND_MODES",
    "POLICY_COMMAND_ANNOTATION",
    "BlendModeSettings",
    "GraphIds",
    "PolicyDecision",
    "annotate_blend_mode",
    "coverage_fraction",
    "decide",
    "finish_decision",
    "joint_action_logits",
    "pair_logits",
    "risk_score",
]

# The action table (prototype indices; every other index of the 32 policy classes is PAUSE).
ACTION_GERMINATE: Final[int] = 0
ACTION_OPTIMIZER: Final[int] = 1
ACTION_BREAKER_OPEN: Final[int] = 3
ACTION_BREAKER_CLOSE: Final[int] = 4
ACTION_PAUSE: Final[int] = 2  # one of the PAUSE indices: what a GERMINATE with no DORMANT seed becomes

BLEND_MODES: Final[tuple[str, ...]] = ("CONVEX", "RESIDUAL", "CHANNEL", "CONFIDENCE")
GERMINATE_BASE_ALPHA: Final[float] = 0.1  # alpha = max(0, 0.1 + param_delta), as the prototype
OPTIMIZER_ID: Final[str] = "sgd"
RATIONALE: Final[str] = "policy_action"
SCHEDULE_UNITS: Final[str] = "fraction_0_1"  # schedule start/end are fractions of Kasmina's blend window
COMMAND_VERSION: Final[int] = 1
ISSUED_BY: Final[str] = "tamiyo"
# Set by the risk engine when it replaced the policy's command (PAUSE, or a SEED turned OPTIMIZER):
# the name of the command the policy proposed. Such a command is the risk engine's choice, not the policy's.
POLICY_COMMAND_ANNOTATION: Final[str] = "policy_command"


class GraphIds(Protocol):
    """What ``decide`` needs from the graph builder's ``GraphInputs``: the ids of the real rows, in row
    order, and the feature coverage (a fraction, or a per-key map that is averaged)."""

    @property
    def seed_ids(self) -> Sequence[str]: ...

    @property
    def blueprint_ids(self) -> Sequence[str]: ...

    @property
    def feature_coverage(self) -> float | Mapping[str, float]: ...


@dataclass(frozen=True, slots=True)
class BlendModeSettings:
    """Blend-mode annotation knobs (``TAMIYO_BLEND_MODE_DEFAULT``, ``_CONF_GATE_K/_TAU``, ``_ALPHA_LO/_HI``,
    ``_ALPHA_VEC_MAX``); emitted only when ``decide(blend_mode_annotations=True)``."""

    mode: str = "CONVEX"
    gate_k: float = 1.0
    gate_tau: float = 1.0
    alpha_lo: float = 0.0
    alpha_hi: float = 1.0
    alpha_vec_max: int = 64

    def __post_init__(self) -> None:
        if self.mode not in BLEND_MODES:
            raise ConfigurationError(f"blend mode {self.mode!r} is not one of {BLEND_MODES}")
        if not 0.0 <= self.alpha_lo <= self.alpha_hi <= 1.0:
            raise ConfigurationError(f"need 0 ≤ alpha_lo ≤ alpha_hi ≤ 1, got {self.alpha_lo}, {self.alpha_hi}")
        if self.alpha_vec_max < 1:
            raise ConfigurationError(f"alpha_vec_max must be ≥ 1, got {self.alpha_vec_max}")


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The command plus the decoded numbers behind it (for telemetry and the risk engine)."""

    command: pb.AdaptationCommand
    action: int
    param_delta: float
    seed_id: str | None  # best real seed by the seed head; None when the graph has none
    blueprint_id: str | None  # best real blueprint; None when the graph has none
    blending_method: str
    blending_method_index: int
    schedule_start: float
    schedule_end: float
    value_estimate: float
    risk_index: int
    risk_score: float
    breaker_open_score: float
    breaker_close_score: float
    feature_coverage: float
    policy_version: str
    no_dormant_seed: bool = False  # the policy chose GERMINATE but no seed was DORMANT
    all_culled: bool = False  # ... a seed was DORMANT, but every design was culled there this run


def pair_logits(seed_scores: Tensor, blueprint_scores: Tensor) -> Tensor:
    """[S, P] score of growing blueprint p in seed s: the seed's score plus the blueprint's for it."""
    return seed_scores.unsqueeze(1) + blueprint_scores


def joint_action_logits(policy_logits: Tensor, seed_scores: Tensor, blueprint_scores: Tensor,
                        eligible: Tensor) -> Tensor:
    """The action logits with GERMINATE's replaced by ``logit + logsumexp`` over the eligible (seed,
    blueprint) pair scores (``seed_scores`` [S] + ``blueprint_scores`` [S, P]; ``eligible`` [S] bool per
    seed, or [S, P] per pair: a DORMANT seed's pairs less those culled there this run, see :func:`eligible_pairs`).

    Whether to grow and what to grow where are one categorical choice, ``P(germinate s, b) ∝
    exp(l_g + seed(s) + bp(s, b))``: germinating is worth as much as the pairs the state allows, so a
    policy that learned "BP003 in the hidden slot pays, anything in the input slot does not" can
    germinate when the hidden slot is DORMANT and pause when only the input slot is. As in any joint
    categorical, more options carry more mass: with all-zero scores (an untrained policy) the bonus is
    log(pairs), so a bigger catalogue or more DORMANT seeds make growing likelier until Simic has
    calibrated ``l_g`` on that catalogue. (A log-mean-exp, free of that, measured worse: the gate
    refused both of its rounds; docs/simic.md.) With no eligible pair (or no blueprint) GERMINATE keeps
    its own logit. Differentiable: Simic trains the action head
    through it (with the pair scores detached: they are fitted to Kasmina's verdicts)."""
    if seed_scores.numel() == 0 or blueprint_scores.numel() == 0 or not bool(eligible.any()):
        return policy_logits
    pairs = pair_logits(seed_scores, blueprint_scores)[eligible].reshape(-1)
    bonus = torch.logsumexp(pairs, dim=0)
    onehot = torch.zeros_like(policy_logits)
    onehot[..., ACTION_GERMINATE] = 1.0
    return policy_logits + onehot * bonus


def eligible_pairs(seed_ids: Sequence[str], blueprint_ids: Sequence[str], germinable: Collection[str] | None,
                   culled: Collection[tuple[str, str]] = ()) -> Tensor:
    """[S, P] bool: the (seed, blueprint) pairs a GERMINATE may grow: the seed is DORMANT (`germinable`,
    None = every seed) and Kasmina has not culled that design there earlier in the run (`culled`)."""
    mask = torch.tensor([[(germinable is None or s in germinable) and (s, b) not in culled for b in blueprint_ids]
                         for s in seed_ids], dtype=torch.bool)
    return mask.reshape(len(seed_ids), len(blueprint_ids))


def risk_score(risk_logits: Tensor) -> float:
    """Expected risk class scaled to [0, 1]: ``Σ_k p_k · k / (K - 1)`` with ``p = softmax(logits)``.

    Classes are ordered from least to most risky, so 0 means surely class 0 and 1 surely the last.
    (The prototype used the argmax class's probability, a confidence that is high for a confidently
    *safe* graph too, and fed it to thresholds meant for risk.)
    """
    probs = torch.softmax(risk_logits.detach().float().reshape(-1), dim=0)
    k = probs.numel()
    if k < 2:
        return 0.0
    levels = torch.arange(k, dtype=probs.dtype, device=probs.device) / (k - 1)
    return float((probs * levels).sum().clamp(0.0, 1.0))


def decide(
    outputs: PolicyOutputs,
    graph_ids: GraphIds,
    *,
    blend_mode_annotations: bool = False,
    blend: BlendModeSettings | None = None,
    channel_count: int | None = None,
    policy_version: str = POLICY_VERSION,
    blend_methods: Sequence[str] = BLEND_METHODS,
    germinable: Collection[str] | None = None,
    culled: Collection[tuple[str, str]] = (),
    explore: random.Random | None = None,
    explore_epsilon: float = 0.0,
    tried: Mapping[tuple[str, str], int] | None = None,
) -> PolicyDecision:
    """Map one forward's outputs to a command.

    :param germinable: seed ids that can take a new seed now (DORMANT in the packet). GERMINATE's logit
        rises with their (seed, blueprint) pairs' scores (:func:`joint_action_logits`) and a GERMINATE
        grows the best pair among them; with none it becomes a PAUSE annotated
        ``reason=no_dormant_seed`` (the policy's choice, constrained by the state, said out loud).
        None: every seed row is eligible.
    :param culled: (seed id, blueprint id) pairs Kasmina culled earlier in this run (:mod:`esper.tamiyo.culls`):
        never grown again, so a GERMINATE grows the best pair left; with none left it becomes a PAUSE
        annotated ``reason=all_culled``.
    :param blend_mode_annotations: emit blend-mode annotations on SEED commands
        (``TAMIYO_ENABLE_BLEND_MODE_ANN``, off by default).
    :param blend: blend-mode knobs (defaults: CONVEX, the prototype's gate and alpha defaults).
    :param channel_count: output channels of the selected blueprint, when its metadata says; CHANNEL
        needs it (≤ ``blend.alpha_vec_max``) or falls back to CONVEX with a ``blend_mode_fallback`` reason.
    :param explore: with probability ``explore_epsilon`` a GERMINATE's blueprint is drawn from the
        graph's real blueprints instead of the best-scoring one (``TAMIYO_EXPLORE_EPSILON``), and
        annotated ``explored=blueprint``: Simic learns which blueprints pay only from data that tried them.
    :param tried: how often each (seed, blueprint) pair was already grown (by this replica, over all
        its runs): the exploration draw is uniform among the seed's least-grown designs, so every pair
        gets its verdicts before any gets many (uniform draws left a pair untried in 24 runs, and the
        policy trained on them grew that one).
    :raises DependencyViolationError: action 0 without a real seed or blueprint, ids that do not match
        the real rows, or non-finite outputs.
    """
    out = outputs.detach_cpu()
    _check_finite(out)
    _check_ids(out.seed_mask, graph_ids.seed_ids, "seed")
    _check_ids(out.blueprint_mask, graph_ids.blueprint_ids, "blueprint")
    n_seed, n_bp = len(graph_ids.seed_ids), len(graph_ids.blueprint_ids)
    eligible = torch.tensor([germinable is None or sid in germinable for sid in graph_ids.seed_ids], dtype=torch.bool)
    allowed = eligible_pairs(graph_ids.seed_ids, graph_ids.blueprint_ids, germinable, culled)
    pairs = pair_logits(out.seed_scores[:n_seed], out.blueprint_scores[:n_seed, :n_bp])
    if not bool(torch.isfinite(pairs).all()):
        raise DependencyViolationError("seed or blueprint scores are not finite")
    action = int(joint_action_logits(out.policy_logits, out.seed_scores[:n_seed],
                                      out.blueprint_scores[:n_seed, :n_bp], allowed).argmax())
    param_delta = float(out.param_delta)
    if len(blend_methods) != out.blending_logits.numel():
        raise ConfigurationError(f"{len(blend_methods)} blend methods for {out.blending_logits.numel()} logits")
    blend_index = int(out.blending_logits.argmax())
    blend_method = blend_methods[blend_index]
    start, end = _schedule(out.schedule)
    # Seed and blueprint are one choice: a seed is worth its best pair (when growing, its best pair it
    # may still grow). Without a real blueprint the seed head alone decides.
    seed_scores = out.seed_scores.clone()
    if n_seed and n_bp:
        seed_scores[:n_seed] = pairs.max(dim=1).values
    no_dormant = all_culled = False
    allowed_pairs = pairs.masked_fill(~allowed, float("-inf"))
    if action == ACTION_GERMINATE:
        no_dormant = germinable is not None and not bool(eligible.any())
        all_culled = not no_dormant and n_bp > 0 and bool(eligible.any()) and not bool(allowed.any())
        if n_seed and n_bp and not (no_dormant or all_culled):
            seed_scores[:n_seed] = allowed_pairs.max(dim=1).values
        elif not n_bp and germinable is not None and not no_dormant:
            seed_scores[:n_seed] = seed_scores[:n_seed].masked_fill(~eligible, float("-inf"))
    growing = action == ACTION_GERMINATE and not (no_dormant or all_culled)
    row, seed = _select(seed_scores, out.seed_mask, graph_ids.seed_ids, "seed", allow_inf=growing)
    if action == ACTION_GERMINATE and not growing:
        action = ACTION_PAUSE
    blueprint = None
    if row is not None:  # without a real seed no blueprint has a score (nothing to grow it in)
        bp_scores = out.blueprint_scores[row].clone()
        if growing and n_bp:
            bp_scores[:n_bp] = allowed_pairs[row]
        _, blueprint = _select(bp_scores, out.blueprint_mask, graph_ids.blueprint_ids, "blueprint", allow_inf=growing)
    drawn = (_explore(explore, explore_epsilon, seed, graph_ids.blueprint_ids, culled, tried or {})
             if explore is not None and action == ACTION_GERMINATE and seed is not None else None)
    blueprint = drawn or blueprint
    breaker = torch.sigmoid(out.breaker_logits.reshape(-1)).tolist()
    decision = PolicyDecision(
        command=pb.AdaptationCommand(version=COMMAND_VERSION, issued_by=ISSUED_BY),
        action=action,
        param_delta=param_delta,
        seed_id=seed,
        blueprint_id=blueprint,
        blending_method=blend_method,
        blending_method_index=blend_index,
        schedule_start=start,
        schedule_end=end,
        value_estimate=float(out.value),
        risk_index=int(out.risk_logits.argmax()),
        risk_score=risk_score(out.risk_logits),
        breaker_open_score=float(breaker[0]),
        breaker_close_score=float(breaker[1]),
        feature_coverage=_coverage(graph_ids.feature_coverage),
        policy_version=policy_version,
        no_dormant_seed=no_dormant,
        all_culled=all_culled,
    )
    _fill_payload(decision)
    _annotate(decision)
    if drawn is not None:
        decision.command.annotations["explored"] = "blueprint"
    if blend_mode_annotations and action == ACTION_GERMINATE:
        annotate_blend_mode(decision, blend or BlendModeSettings(), channel_count,
                            policy_logits=out.policy_logits.reshape(-1).tolist())
    return decision


def _explore(rng: random.Random, epsilon: float, seed: str, blueprint_ids: Sequence[str],
             culled: Collection[tuple[str, str]], tried: Mapping[tuple[str, str], int]) -> str | None:
    """With probability `epsilon`, a design drawn uniformly among the seed's least-grown ones it may
    still grow (``decide``'s `explore` and `tried`); None otherwise, or with fewer than two to draw from."""
    open_bps = [b for b in blueprint_ids if (seed, b) not in culled]
    if len(open_bps) < 2 or rng.random() >= epsilon:
        return None
    fewest = min(tried.get((seed, b), 0) for b in open_bps)
    return rng.choice([b for b in open_bps if tried.get((seed, b), 0) == fewest])


_GRAPH_LEVEL: Final[tuple[str, ...]] = (
    "policy_logits",
    "policy_params",
    "blending_logits",
    "schedule",
    "risk_logits",
    "value",
    "breaker_logits",
)


def _check_finite(out: PolicyOutputs) -> None:
    """A NaN would argmax to an arbitrary action; the model broke its contract, so say so."""
    for name in _GRAPH_LEVEL:
        if not bool(torch.isfinite(getattr(out, name)).all()):
            raise DependencyViolationError(f"policy output {name} is not finite")


def _schedule(schedule: Tensor) -> tuple[float, float]:
    """tanh outputs in [-1, 1] → ordered fractions in [0, 1] (prototype's mapping)."""
    raw = schedule.reshape(-1).tolist()
    start, end = (min(1.0, max(0.0, 0.5 * (v + 1.0))) for v in raw[:2])
    return (start, end) if start <= end else (end, start)


def _select(scores: Tensor, mask: Tensor, ids: Sequence[str], what: str, *,
            allow_inf: bool = False) -> tuple[int | None, str | None]:
    """Best real row's (index, id), or (None, None) when there is no real row. Placeholder rows can
    never win. `allow_inf`: rows masked out with -inf (ineligible) are allowed; NaN never is."""
    n_real = _check_ids(mask, ids, what)
    if n_real == 0:
        return None, None
    real = scores[:n_real]
    if bool(torch.isnan(real).any()) or not (allow_inf or bool(torch.isfinite(real).all())):
        raise DependencyViolationError(f"{what} scores are not finite")
    best = int(scores[:n_real].argmax())
    chosen = ids[best]
    if not chosen:
        raise DependencyViolationError(f"{what}: real row {best} has an empty id")
    return best, chosen


def _check_ids(mask: Tensor, ids: Sequence[str], what: str) -> int:
    """The real rows are the first ones, one per id; returns their number."""
    n_real = int(mask.sum())
    if n_real != len(ids) or not bool(mask[:n_real].all()):
        raise DependencyViolationError(f"{what}: {n_real} real rows (first rows) but {len(ids)} ids")
    return n_real


def _coverage(coverage: float | Mapping[str, float]) -> float:
    """A fraction, or the mean of a per-key map (an empty map means nothing was covered)."""
    if isinstance(coverage, Mapping):
        values = [float(v) for v in coverage.values()]
        return sum(values) / len(values) if values else 0.0
    return float(coverage)


def _require(value: str | None, what: str) -> str:
    if value is None:
        raise DependencyViolationError(f"policy chose GERMINATE but the graph has no real {what}")
    return value


def _fill_payload(d: PolicyDecision) -> None:
    cmd = d.command
    if d.action == ACTION_GERMINATE:
        cmd.command_type = pb.COMMAND_SEED
        cmd.target_seed_id = _require(d.seed_id, "seed")
        op = cmd.seed_operation
        op.operation = pb.SEED_OP_GERMINATE
        op.blueprint_id = _require(d.blueprint_id, "blueprint")
        op.parameters["alpha"] = max(0.0, GERMINATE_BASE_ALPHA + d.param_delta)
        op.parameters["blending_method_index"] = float(d.blending_method_index)
        op.parameters["blending_schedule_start"] = d.schedule_start
        op.parameters["blending_schedule_end"] = d.schedule_end
    elif d.action == ACTION_OPTIMIZER:
        cmd.command_type = pb.COMMAND_OPTIMIZER
        cmd.optimizer_adjustment.optimizer_id = OPTIMIZER_ID
        cmd.optimizer_adjustment.hyperparameters["lr_delta"] = d.param_delta
    elif d.action in (ACTION_BREAKER_OPEN, ACTION_BREAKER_CLOSE):
        cmd.command_type = pb.COMMAND_CIRCUIT_BREAKER
        open_ = d.action == ACTION_BREAKER_OPEN
        cmd.circuit_breaker.desired_state = pb.CIRCUIT_STATE_OPEN if open_ else pb.CIRCUIT_STATE_CLOSED
        cmd.circuit_breaker.rationale = RATIONALE
    else:
        cmd.command_type = pb.COMMAND_PAUSE
        cmd.annotations["reason"] = ("no_dormant_seed" if d.no_dormant_seed else "all_culled" if d.all_culled
                                     else "policy")


def finish_decision(d: PolicyDecision) -> PolicyDecision:
    """Fill the command's payload and annotations from a decision made without the GNN's outputs
    (the rule-based policy): the same command shape Kasmina and the risk engine always see."""
    _fill_payload(d)
    _annotate(d)
    return d


def coverage_fraction(coverage: float | Mapping[str, float]) -> float:
    return _coverage(coverage)


def _f(value: float, digits: int = 6) -> str:
    return f"{value:.{digits}f}"


def _annotate(d: PolicyDecision) -> None:
    ann = d.command.annotations
    ann["policy_action"] = str(d.action)
    ann["policy_param_delta"] = _f(d.param_delta)
    ann["policy_version"] = d.policy_version
    ann["blending_method"] = d.blending_method
    ann["blending_method_index"] = str(d.blending_method_index)
    ann["policy_value_estimate"] = _f(d.value_estimate)
    ann["policy_risk_index"] = str(d.risk_index)
    ann["policy_risk_score"] = _f(d.risk_score)
    ann["feature_coverage"] = _f(d.feature_coverage, 4)
    if d.seed_id is not None:
        ann["selected_seed"] = d.seed_id
    if d.blueprint_id is not None:
        ann["selected_blueprint"] = d.blueprint_id
    ann["breaker_open_score"] = _f(d.breaker_open_score, 4)
    ann["breaker_close_score"] = _f(d.breaker_close_score, 4)
    ann["blending_schedule_units"] = SCHEDULE_UNITS
    ann["blending_schedule_start"] = _f(d.schedule_start, 4)
    ann["blending_schedule_end"] = _f(d.schedule_end, 4)


def annotate_blend_mode(d: PolicyDecision, blend: BlendModeSettings, channel_count: int | None, *,
                        policy_logits: list[float]) -> None:
    """P8: tell Kasmina how to blend. CHANNEL needs a known, small channel count; without one it falls
    back to CONVEX and says why, rather than sending a vector nobody computed. CONFIDENCE carries the
    policy's action logits: Kasmina gates alpha on their top-1/top-2 margin (how sure the policy was);
    a policy without logits (the rule-based one) falls back to CONVEX."""
    ann = d.command.annotations
    mode = blend.mode
    if mode == "CONFIDENCE" and not policy_logits:
        mode, ann["blend_mode_fallback"] = "CONVEX", "no_policy_logits"
    if mode == "CHANNEL":
        if channel_count is None or channel_count < 1:
            mode, ann["blend_mode_fallback"] = "CONVEX", "channel_count_unknown"
        elif channel_count > blend.alpha_vec_max:
            mode, ann["blend_mode_fallback"] = "CONVEX", "channel_count_exceeds_max"
        else:
            # The policy has one alpha, not a per-channel head: the vector is that alpha per channel.
            alpha = d.command.seed_operation.parameters["alpha"]
            ann["alpha_vec"] = json.dumps([round(alpha, 6)] * channel_count)
            ann["alpha_vec_len"] = str(channel_count)
            ann["alpha_vec_source"] = "policy_alpha"
    if mode == "CONFIDENCE":
        ann["gate_k"] = _f(blend.gate_k, 4)
        ann["gate_tau"] = _f(blend.gate_tau, 4)
        ann["alpha_lo"] = _f(blend.alpha_lo, 4)
        ann["alpha_hi"] = _f(blend.alpha_hi, 4)
        ann["confidence_logits"] = json.dumps([round(float(v), 6) for v in policy_logits])
    ann["blend_mode"] = mode
