"""Offline training of Tamiyo's GNN on logged decisions, and the validation gate.

Objective (REFERENCE §11's settings: Adam lr 5e-4, gamma 0.99, lambda 0.95), in two phases over the training
split:

1. **imitation** of decisions with good outcomes: cross-entropy on the action taken (GERMINATE's logit
   plus the logsumexp of the state's DORMANT (seed, blueprint) pairs, as Tamiyo decides), for the samples
   whose advantage is positive (weight 1, others 0);
2. **advantage-weighted regression** (AWR, the offline counterpart of PPO's policy step): the same
   cross-entropy with weights ``exp(A / (beta·std(A)))`` clipped to ``max_weight`` and normalised to mean 1
   per batch, so better-than-baseline decisions are pulled up and worse ones fade out.

Beside the action, each phase trains the value head on the return (``value_weight`` · MSE), the param
head on the ``param_delta`` an OPTIMIZER / GERMINATE command carried — all with the same sample
weights — and the seed and blueprint heads on the seed's fate: a logistic loss of the pair score
of each germination (seed score + the blueprint's score for that seed) against FOSSILIZED on enough
evidence 1 / CULLED, EMBARGOED or kept on too little evidence 0 (the sample's ``fate``, see
:mod:`esper.simic.dataset`), over every germination with a verdict, not weighted by advantage
(:func:`_fate_loss`). The action loss sees the pair scores only detached (:func:`joint_logits`).

**Balanced actions** (``balance_actions``): germinations are a handful among hundreds of pauses, so an
unweighted cross-entropy learns "always pause" whatever the advantages say. Each action's samples
share 1/K of the action loss (K actions present, weights ``n / (K·n_a)``, capped at
``max_balance``), as in class-balanced classification; the other heads keep the plain weights.

Graphs are batched as one disjoint union: message passing is per edge, so the union embeds every
graph exactly as alone; the heads then read each graph's global node and seed rows
(:func:`forward_batch`, checked against the serving forward in the tests).

**Validation gate**: on held-out runs a policy's score is ``Σ A_i·[π(s_i) = a_i] / Σ |A_i|`` (in
[-1, 1]): agreeing with decisions that beat the baseline counts for it, agreeing with ones that fell
short counts against it. ``π(s)`` is what Tamiyo would do: the argmax action, a GERMINATE with no
DORMANT seed is a PAUSE, every index past the action table is a PAUSE, an OPTIMIZER only agrees
when its ``lr_delta`` has the logged sign, and a GERMINATE only when it picks the logged seed and
blueprint (which design is grown where matters as much as when). The gate computes both policies' scores over the
*decisive* held-out decisions, those where exactly one of them agrees with the log (elsewhere the two
scores move together); a candidate is accepted only if it beats the current policy there by more
than ``margin``, with at least ``min_holdout`` held-out decisions.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from esper.core.errors import EsperError
from esper.simic.dataset import Sample
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.policy import (
    ACTION_BREAKER_CLOSE,
    ACTION_GERMINATE,
    ACTION_OPTIMIZER,
    ACTION_PAUSE,
    joint_action_logits,
    pair_logits,
)
from esper.tamiyo.schema import NODE_TYPES, RELATIONS

__all__ = [
    "Batch",
    "EffectiveAction",
    "GateResult",
    "TrainConfig",
    "TrainReport",
    "agreements",
    "collate",
    "effective_actions",
    "forward_batch",
    "gate",
    "joint_logits",
    "policy_score",
    "sample_weights",
    "train_policy",
    "train_step",
]

_T = {t: i for i, t in enumerate(NODE_TYPES)}


class TrainingCancelled(EsperError):
    """The round's cancel event was set (the service is shutting down): no candidate, nothing changed."""


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise TrainingCancelled("training round cancelled")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    learning_rate: float = 5e-4
    fate_steps: int = 0  # fit_fates before imitation (the service's SIMIC_FATE_STEPS: 40; docs/simic.md)
    fate_polish_steps: int = 0  # and on the pair layers alone after AWR
    imitation_epochs: int = 2
    awr_epochs: int = 4
    batch_size: int = 64
    awr_beta: float = 1.0
    max_weight: float = 20.0
    value_weight: float = 0.5
    grad_clip: float = 1.0
    balance_actions: bool = True
    max_balance: float = 50.0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    """A disjoint union of graphs plus, per graph, where its global node and real seed rows are."""

    x: dict[str, Tensor]
    edge_index: dict[tuple[str, str, str], Tensor]
    edge_attr: dict[tuple[str, str, str], Tensor]
    counts: dict[str, int]
    global_rows: Tensor  # [B]
    seed_rows: Tensor  # [S] rows of every real seed (type "seed")
    seed_graph: Tensor  # [S] graph of each
    seed_germinable: Tensor  # [S] bool
    blueprint_rows: Tensor  # [P] rows of every real blueprint (type "blueprint")


def collate(samples: Sequence[Sample]) -> Batch:
    xs: dict[str, list[Tensor]] = {t: [] for t in NODE_TYPES}
    eis: dict[tuple[str, str, str], list[Tensor]] = {r: [] for r in RELATIONS}
    eas: dict[tuple[str, str, str], list[Tensor]] = {r: [] for r in RELATIONS}
    offset = dict.fromkeys(NODE_TYPES, 0)
    global_rows: list[int] = []
    seed_rows: list[int] = []
    seed_graph: list[int] = []
    germinable: list[bool] = []
    blueprint_rows: list[int] = []
    for b, s in enumerate(samples):
        g = s.graph
        global_rows.append(offset["global"])
        blueprint_rows.extend(range(offset["blueprint"], offset["blueprint"] + g.counts["blueprint"]))
        n_seed = g.counts["seed"]
        seed_rows.extend(range(offset["seed"], offset["seed"] + n_seed))
        seed_graph.extend([b] * n_seed)
        germinable.extend(s.germinable[:n_seed])
        for r in RELATIONS:
            src, _, dst = r
            ei = g.edge_index[r]
            if ei.numel():
                shift = torch.tensor([[offset[src]], [offset[dst]]], dtype=ei.dtype)
                eis[r].append(ei + shift)
                eas[r].append(g.edge_attr[r])
        for t in NODE_TYPES:
            xs[t].append(g.x[t])
            offset[t] += g.x[t].size(0)
    empty_ei, empty_ea = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3)
    return Batch(
        x={t: torch.cat(v) for t, v in xs.items()},
        edge_index={r: torch.cat(v, 1) if v else empty_ei for r, v in eis.items()},
        edge_attr={r: torch.cat(v) if v else empty_ea for r, v in eas.items()},
        counts=dict(offset), global_rows=torch.tensor(global_rows, dtype=torch.long),
        seed_rows=torch.tensor(seed_rows, dtype=torch.long), seed_graph=torch.tensor(seed_graph, dtype=torch.long),
        seed_germinable=torch.tensor(germinable, dtype=torch.bool),
        blueprint_rows=torch.tensor(blueprint_rows, dtype=torch.long))


@dataclass(frozen=True, slots=True)
class BatchOutputs:
    policy_logits: Tensor  # [B, C]
    param_delta: Tensor  # [B]
    value: Tensor  # [B]
    seed_scores: Tensor  # [S]
    blueprint_scores: Tensor  # [S, P]: every seed's score of every blueprint (use each graph's block)


def forward_batch(model: TamiyoGNN, batch: Batch) -> BatchOutputs:
    """The heads of every graph of the batch (what ``model(...)`` gives for each graph alone)."""
    g = model.pack(batch.x, batch.edge_index, batch.edge_attr, batch.counts)
    h = model.embed(g)
    emb = h[_T["global"]].index_select(0, batch.global_rows)
    seeds = h[_T["seed"]].index_select(0, batch.seed_rows)
    blueprints = h[_T["blueprint"]].index_select(0, batch.blueprint_rows)
    return BatchOutputs(
        policy_logits=model.policy_head(emb), param_delta=torch.tanh(model.param_head(emb))[:, 0],
        value=model.value_head(emb).squeeze(-1), seed_scores=model.seed_score_head(seeds).squeeze(-1),
        blueprint_scores=model.pair_scores(seeds, blueprints))


def sample_weights(samples: Sequence[Sample], *, phase: str, beta: float, max_weight: float,
                   adv_scale: float) -> Tensor:
    """Imitation: 1 for a positive advantage, else 0. AWR: exp(A / (beta·scale)) clipped, mean 1."""
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    if phase == "imitation":
        return (adv > 0).float()
    w = torch.exp(torch.clamp(adv / (beta * adv_scale), max=math.log(max_weight)))
    return w / w.mean().clamp_min(1e-12)


def action_balance(samples: Sequence[Sample], *, cap: float) -> dict[int, float]:
    """Per-action factor ``n / (K·n_a)`` (K actions present), capped at `cap`: each action's samples
    carry the same share of the action loss, however rare the action."""
    counts: dict[int, int] = {}
    for s in samples:
        counts[s.action] = counts.get(s.action, 0) + 1
    n, k = len(samples), len(counts)
    return {a: min(cap, n / (k * c)) for a, c in counts.items()}


def _loss(model: TamiyoGNN, samples: Sequence[Sample], weights: Tensor, value_weight: float,
          balance: dict[int, float] | None = None) -> Tensor:
    out = forward_batch(model, collate(samples))
    actions = torch.tensor([s.action for s in samples], dtype=torch.long)
    action_w = weights if balance is None else weights * torch.tensor([balance.get(s.action, 1.0) for s in samples])
    loss = (F.cross_entropy(joint_logits(samples, out), actions, reduction="none") * action_w).sum() \
        / action_w.sum().clamp_min(1e-12)
    returns = torch.tensor([s.ret for s in samples], dtype=torch.float32)
    loss = loss + value_weight * F.mse_loss(out.value, returns)
    with_param = [i for i, s in enumerate(samples) if s.param_target is not None]
    if with_param:
        idx = torch.tensor(with_param, dtype=torch.long)
        target = torch.tensor([samples[i].param_target or 0.0 for i in with_param]).clamp(-0.999, 0.999)
        w = weights.index_select(0, idx)
        err = (out.param_delta.index_select(0, idx) - target) ** 2
        loss = loss + (err * w).sum() / w.sum().clamp_min(1e-12)
    # Which seed and which blueprint are learned from Kasmina's verdict on the seed (its measured
    # benefit), not from the run's return, which credits a bad design in a run that went well.
    return loss + _fate_loss(samples, out)


def _blocks(samples: Sequence[Sample]) -> list[tuple[slice, slice]]:
    """Each graph's (seed rows, blueprint rows) in the batch's seed and blueprint outputs."""
    out: list[tuple[slice, slice]] = []
    first_seed = first_bp = 0
    for s in samples:
        n_seed, n_bp = s.graph.counts["seed"], s.graph.counts["blueprint"]
        out.append((slice(first_seed, first_seed + n_seed), slice(first_bp, first_bp + n_bp)))
        first_seed, first_bp = first_seed + n_seed, first_bp + n_bp
    return out


def allowed_pairs(s: Sample) -> Tensor:
    """[S, P] bool: the (seed, blueprint) pairs the policy could grow in this state: a DORMANT seed's,
    less those culled there earlier in the run (Tamiyo's ``eligible_pairs``)."""
    n_seed, n_bp = s.graph.counts["seed"], s.graph.counts["blueprint"]
    mask = torch.tensor(s.germinable[:n_seed], dtype=torch.bool).unsqueeze(1).repeat(1, n_bp)
    for row, col in s.culled:
        mask[row, col] = False
    return mask


def joint_logits(samples: Sequence[Sample], out: BatchOutputs) -> Tensor:
    """[B, C] action logits as Tamiyo decides them: GERMINATE's plus the logsumexp of the pairs it
    could grow (:func:`allowed_pairs`; policy.joint_action_logits).

    The pair scores enter detached: they are fitted to Kasmina's verdicts (:func:`_fate_loss`), and
    the action loss, thousands of pauses against a few germinations, would otherwise reshape them
    (pushing every pair down shifts their ranking by the blueprints' feature geometry, not evidence)."""
    rows: list[Tensor] = []
    for b, (s, (seeds, bps)) in enumerate(zip(samples, _blocks(samples), strict=True)):
        rows.append(joint_action_logits(out.policy_logits[b], out.seed_scores[seeds].detach(),
                                        out.blueprint_scores[seeds, bps].detach(), allowed_pairs(s)))
    return torch.stack(rows)


def _fate_loss(samples: Sequence[Sample], out: BatchOutputs) -> Tensor:
    """Logistic loss of each germination's pair score against its seed's fate (1 when positive, else 0;
    unknown fates are left out), averaged over those germinations.

    So a pair's score is the log-odds that Kasmina keeps that design grown in that seed on real
    evidence of benefit, learned from
    culls as much as from fossils (a softmax toward fossilised pairs alone ignored every cull, most of
    the evidence), and GERMINATE's logit rises with the odds of the pairs a state allows."""
    logits: list[Tensor] = []
    labels: list[float] = []
    for s, (seeds, bps) in zip(samples, _blocks(samples), strict=True):
        if s.action != ACTION_GERMINATE or s.seed_target is None or s.blueprint_target is None or s.fate == 0:
            continue
        logits.append(pair_logits(out.seed_scores[seeds], out.blueprint_scores[seeds, bps])[s.seed_target,
                                                                                              s.blueprint_target])
        labels.append(1.0 if s.fate > 0 else 0.0)
    if not logits:
        return out.seed_scores.sum() * 0.0 + out.blueprint_scores.sum() * 0.0
    return F.binary_cross_entropy_with_logits(torch.stack(logits), torch.tensor(labels))


def train_step(model: TamiyoGNN, optimizer: torch.optim.Optimizer, samples: Sequence[Sample], weights: Tensor, *,
               value_weight: float = 0.5, grad_clip: float = 1.0, balance: dict[int, float] | None = None) -> float:
    """One optimizer step on `samples`; returns the loss before the step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = _loss(model, samples, weights, value_weight, balance)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def pair_head_parameters(model: TamiyoGNN) -> list[torch.nn.Parameter]:
    """The layers that turn seed and blueprint embeddings into pair scores (and nothing else reads)."""
    return [p for m in (model.seed_score_head, model.blueprint_score_head, model.pair_seed_proj,
                        model.pair_blueprint_proj) for p in m.parameters()]


def germinable_states(samples: Sequence[Sample], *, rng: random.Random, limit: int = 512) -> list[Sample]:
    """Up to `limit` states (a seeded draw) where a GERMINATE has a pair to grow: a DORMANT seed and a
    blueprint."""
    out = [s for s in samples if s.graph.counts["blueprint"] > 0 and bool(allowed_pairs(s).any())]
    return rng.sample(out, limit) if len(out) > limit else out


@torch.no_grad()
def germinate_margins(model: TamiyoGNN, samples: Sequence[Sample], *, batch_size: int = 256) -> Tensor:
    """Per sample, GERMINATE's joint logit (`joint_action_logits`) minus the best other action's, in
    eval mode: > 0 where Tamiyo's argmax would grow."""
    training = model.training
    model.eval()
    parts = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        joint = joint_logits(chunk, forward_batch(model, collate(chunk)))
        others = torch.cat([joint[:, :ACTION_GERMINATE], joint[:, ACTION_GERMINATE + 1:]], dim=1)
        parts.append(joint[:, ACTION_GERMINATE] - others.max(dim=1).values)
    model.train(training)
    return torch.cat(parts) if parts else torch.zeros(0)


def count_preserving_shift(margins: Tensor, k: int) -> float:
    """The shift `s` for which exactly `k` of `margins - s` are positive (midway between the k-th and
    (k+1)-th largest margin), so that as many states grow as before."""
    m: list[float] = sorted(margins.tolist(), reverse=True)
    if not m:
        return 0.0
    hi = m[k - 1] if k > 0 else m[0] + 1.0
    lo = m[k] if k < len(m) else m[-1] - 1.0
    return (hi + lo) / 2.0


def fit_fates(model: TamiyoGNN, optimizer: torch.optim.Optimizer, samples: Sequence[Sample], *, steps: int,
              grad_clip: float = 1.0, cancel: threading.Event | None = None) -> list[float]:
    """`steps` full-batch steps of :func:`_fate_loss` on every germination with a known fate.

    Why: in the mixed batches a germination is about one graph in sixty, so the pair scores saw each
    verdict a handful of times and stayed near the base rate (a design kept 3 times in 7 scored below
    one kept 2 times in 17). Fitted first, on all verdicts at once, they rank the designs by their record;
    imitation and AWR then learn *when* to grow against those scores (they enter the action logits)."""
    verdicts = [s for s in samples if s.action == ACTION_GERMINATE and s.seed_target is not None
                and s.blueprint_target is not None and s.fate != 0]
    if not verdicts or steps <= 0:
        return []
    batch = collate(verdicts)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        check_cancel(cancel)
        optimizer.zero_grad(set_to_none=True)
        loss = _fate_loss(verdicts, forward_batch(model, batch))
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass(frozen=True, slots=True)
class TrainReport:
    steps: int  # imitation and AWR steps; `first_loss` / `last_loss` are theirs
    first_loss: float
    last_loss: float
    samples: int
    fate_losses: tuple[float, ...] = ()  # fate loss of each `fit_fates` step, before and after them


def train_policy(model: TamiyoGNN, samples: Sequence[Sample], config: TrainConfig | None = None, *,
                 cancel: threading.Event | None = None) -> TrainReport:
    """Imitation then AWR, in place on `model` (start it from the current policy's weights). `cancel`
    is checked before every optimizer step (`TrainingCancelled`): a round runs in a worker thread,
    which nothing else can interrupt, and a shutdown should not wait minutes for it."""
    cfg = config or TrainConfig()
    if not samples:
        return TrainReport(0, math.nan, math.nan, 0)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    adv = torch.tensor([s.advantage for s in samples])
    scale = float(adv.std()) if len(samples) > 1 and float(adv.std()) > 0 else 1.0
    losses: list[float] = []
    order = list(samples)
    balance = action_balance(samples, cap=cfg.max_balance) if cfg.balance_actions else None
    fate_losses = fit_fates(model, optimizer, samples, steps=cfg.fate_steps, grad_clip=cfg.grad_clip, cancel=cancel)
    for phase, epochs in (("imitation", cfg.imitation_epochs), ("awr", cfg.awr_epochs)):
        for _ in range(epochs):
            rng.shuffle(order)
            for i in range(0, len(order), cfg.batch_size):
                check_cancel(cancel)
                chunk = order[i:i + cfg.batch_size]
                w = sample_weights(chunk, phase=phase, beta=cfg.awr_beta, max_weight=cfg.max_weight,
                                   adv_scale=scale)
                if float(w.sum()) <= 0:
                    continue
                losses.append(train_step(model, optimizer, chunk, w, value_weight=cfg.value_weight,
                                         grad_clip=cfg.grad_clip, balance=balance))
    # The action and value losses move the shared layers under the pair scores; refit the pair heads
    # alone (the rest frozen) so the served ranking of designs is the verdicts' again, then shift
    # GERMINATE's own logit so that it wins the argmax in as many states as before: the refit changes
    # *what* is grown, not how often (refitted scores are higher: unshifted, one experiment grew 5-6
    # seeds a run; shifting by the mean change of the bonus, another grew none).
    probe = germinable_states(samples, rng=random.Random(cfg.seed))
    growing = int((germinate_margins(model, probe) > 0).sum())
    heads = pair_head_parameters(model)
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in heads)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        fate_losses += fit_fates(model, torch.optim.Adam(heads, lr=cfg.learning_rate), samples,
                                 steps=cfg.fate_polish_steps, grad_clip=cfg.grad_clip, cancel=cancel)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if probe and cfg.fate_polish_steps > 0:
        shift = count_preserving_shift(germinate_margins(model, probe), growing)
        with torch.no_grad():
            model.policy_head.bias[ACTION_GERMINATE] -= shift
    model.eval()
    return TrainReport(len(losses), losses[0] if losses else math.nan, losses[-1] if losses else math.nan,
                       len(samples), tuple(fate_losses))


@torch.no_grad()
def effective_actions(model: TamiyoGNN, samples: Sequence[Sample], *,
                      batch_size: int = 256) -> list[EffectiveAction]:
    """What Tamiyo would do on each sample's graph (module docstring): the action, its param_delta
    and, when a seed is DORMANT and the graph has blueprints, the (seed row, blueprint row) pair it
    would grow."""
    model.eval()
    out: list[EffectiveAction] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        res = forward_batch(model, collate(chunk))
        actions = joint_logits(chunk, res).argmax(-1).tolist()
        for s, a, p, (seeds, bps) in zip(chunk, actions, res.param_delta.tolist(), _blocks(chunk), strict=True):
            act = int(a)
            n_bp = s.graph.counts["blueprint"]
            pair: tuple[int, int] | None = None
            mask = allowed_pairs(s)
            if n_bp and bool(mask.any()):
                pairs = pair_logits(res.seed_scores[seeds], res.blueprint_scores[seeds, bps])
                best = int(pairs.masked_fill(~mask, -math.inf).reshape(-1).argmax())
                pair = divmod(best, n_bp)
            growable = bool(mask.any()) if n_bp else any(s.germinable)
            if act > ACTION_BREAKER_CLOSE or (act == ACTION_GERMINATE and not growable):
                act = ACTION_PAUSE
            out.append(EffectiveAction(act, float(p), pair))
    return out


@dataclass(frozen=True, slots=True)
class EffectiveAction:
    action: int
    param_delta: float
    pair: tuple[int, int] | None  # (seed row, blueprint row) a GERMINATE would grow


def agreements(model: TamiyoGNN, samples: Sequence[Sample]) -> list[bool]:
    """Per sample: would `model` take the logged action (module docstring's ``π(s_i) = a_i``)?"""
    out = []
    for s, eff in zip(samples, effective_actions(model, samples), strict=True):
        same = eff.action == s.action
        if same and eff.action == ACTION_OPTIMIZER and s.param_target is not None:
            same = (eff.param_delta >= 0) == (s.param_target >= 0)
        if same and eff.action == ACTION_GERMINATE and s.blueprint_target is not None and eff.pair is not None:
            same = eff.pair[1] == s.blueprint_target and (s.seed_target is None or eff.pair[0] == s.seed_target)
        out.append(same)
    return out


def policy_score(model: TamiyoGNN, samples: Sequence[Sample]) -> float:
    """``Σ A_i·[π(s_i) = a_i] / Σ |A_i|`` over `samples` (module docstring); 0.0 when there are none."""
    return _score(samples, agreements(model, samples))


def _score(samples: Sequence[Sample], agree: Sequence[bool]) -> float:
    total = sum(abs(s.advantage) for s in samples)
    if not samples or total <= 0:
        return 0.0
    return sum(s.advantage for s, same in zip(samples, agree, strict=True) if same) / total


@dataclass(frozen=True, slots=True)
class GateResult:
    accepted: bool
    candidate_score: float
    current_score: float
    holdout: int
    reason: str
    decisive: int = 0  # held-out decisions on which exactly one of the two policies agrees with the log


def gate(candidate: TamiyoGNN, current: TamiyoGNN, holdout: Sequence[Sample], *, margin: float = 0.0,
         min_holdout: int = 20) -> GateResult:
    """Accept `candidate` only if it beats `current` on the held-out decisions (module docstring).

    Both are scored on the *decisive* decisions, where one agrees with the log and the other does
    not: where both agree or both differ the two scores move together, and normalising over them
    (hundreds of shared pauses) would shrink a real difference on a few germinations below any margin."""
    if len(holdout) < min_holdout:
        return GateResult(False, math.nan, math.nan, len(holdout),
                          f"only {len(holdout)} held-out decisions (need {min_holdout})")
    cand_agree, cur_agree = agreements(candidate, holdout), agreements(current, holdout)
    idx = [i for i, (a, b) in enumerate(zip(cand_agree, cur_agree, strict=True)) if a != b]
    if not idx:
        return GateResult(False, 0.0, 0.0, len(holdout), "no held-out decision tells the two policies apart")
    decisive = [holdout[i] for i in idx]
    cand = _score(decisive, [cand_agree[i] for i in idx])
    cur = _score(decisive, [cur_agree[i] for i in idx])
    where = f"on {len(idx)} decisive of {len(holdout)} held-out decisions"
    if cand > cur + margin:
        return GateResult(True, cand, cur, len(holdout), f"candidate {cand:.4f} > current {cur:.4f} + {margin:g} "
                                                         f"{where}", len(idx))
    return GateResult(False, cand, cur, len(holdout), f"candidate {cand:.4f} does not beat current {cur:.4f} "
                                                      f"+ {margin:g} {where}", len(idx))
