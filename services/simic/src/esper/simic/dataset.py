"""Field reports → training samples: the graph a decision saw, the action taken, and how it turned out.

A decision report (`fr-<command_id>`) carries the `SystemStatePacket` Tamiyo decided on
(`observation`) and the command it sent (`command`, after the risk engine: what really ran). The graph
is rebuilt with Tamiyo's own `GraphBuilder` (same features, same registries; packets are replayed in
the order they were issued, so the EWMA normaliser sees what Tamiyo's saw). Reports without an
observation (synthesised observation windows, old reports) are evidence, not samples; so are commands
the risk engine put in place of the policy's (annotated `policy_command`: a PAUSE in conservative mode,
a GERMINATE turned OPTIMIZER under a loss warning): the policy did not choose them, and learning them
as its own taught an earlier GNN to ask for OPTIMIZER whenever the loss was noisy.

Rewards (REFERENCE §11: "-loss_delta or ±1 by outcome"), per decision t of one training run, ordered by
step, with t+1 the run's next decision:

- ``-(loss_{t+1} - loss_t)``, loss being the trainer's EWMA of the training loss (`loss_ewma`, else
  the step loss): what happened to the loss after the decision;
- ``-(val_{t+1} - val_t)`` when a validation finished in between (the goal is validation, not fit);
- ``± outcome_reward`` by outcome: the decision report's REGRESSION (risk engine: loss spike,
  quarantine...) and the SEED command's observation-window report (SUCCESS +, REGRESSION -);
- ``± fate_reward`` for a GERMINATE by what became of its seed, read from the run's later packets:
  FOSSILIZED (Kasmina measured a benefit: the validation loss rises when the seed is ablated) +,
  CULLED or EMBARGOED -. It is the one per-seed measurement of benefit: the loss changes around a
  germination mix the seed's effect with everything else the run does meanwhile. A FOSSILIZED seed
  whose mean ablation evidence (`SeedState.metrics["evidence_mean"]`, validation loss without it
  minus with it) is below ``fate_min_improvement`` counts as -: Kasmina keeps any seed whose removal
  raises the loss at all, and the host co-adapts to whatever it trained with, so a tiny rise is not
  benefit. On the bottleneck host (one experiment, 9 fossilised seeds) the kept seeds with evidence
  0.004-0.014 ended runs at 0.80-0.90 accuracy (mean 0.856), those with 0.057-0.167 at 0.86-0.91
  (mean 0.886). Packets without the metric (before Kasmina exported it) keep the plain verdict.

Returns are discounted (gamma) to the run's end; the baseline V is the mean return of all decisions at the
same epoch (model-free, so the validation gate judges every policy on the same numbers); advantages
are GAE(gamma, lambda) over that baseline (the prototype's PPO settings: gamma 0.99, lambda 0.95).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from esper.core.errors import DependencyViolationError
from esper.leyline import pb
from esper.tamiyo.culls import culled_pairs
from esper.tamiyo.graph import DEFAULT_MAX_BLUEPRINTS, GraphBuilder, GraphInputs
from esper.tamiyo.metadata import BlueprintInfo
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.policy import (
    ACTION_BREAKER_CLOSE,
    ACTION_BREAKER_OPEN,
    ACTION_GERMINATE,
    ACTION_OPTIMIZER,
    ACTION_PAUSE,
    GERMINATE_BASE_ALPHA,
    POLICY_COMMAND_ANNOTATION,
)
from esper.tamiyo.registry import RegistrySet

__all__ = ["RewardConfig", "Sample", "action_of", "build_samples", "split_by_run"]

_OUTCOME_SIGN: dict[int, float] = {pb.FIELD_REPORT_OUTCOME_SUCCESS: 1.0, pb.FIELD_REPORT_OUTCOME_REGRESSION: -1.0}


@dataclass(frozen=True, slots=True)
class RewardConfig:
    gamma: float = 0.99
    gae_lambda: float = 0.95
    outcome_reward: float = 0.1
    fate_reward: float = 1.0
    fate_min_improvement: float = 0.03  # evidence a FOSSILIZED seed needs to count as a benefit (module doc)


@dataclass(frozen=True, slots=True)
class Sample:
    """One logged decision, ready for the model: its graph, the action taken and its advantage."""

    report_id: str
    run_id: str
    step: int
    epoch: int
    graph: GraphInputs
    germinable: tuple[bool, ...]  # per real seed row: DORMANT (a GERMINATE may target it)
    action: int  # canonical action index (policy.ACTION_*)
    param_target: float | None  # param_delta the command carried (OPTIMIZER lr_delta, SEED alpha - 0.1)
    seed_target: int | None  # real seed row a GERMINATE targeted
    blueprint_target: int | None  # real blueprint row it used
    culled: frozenset[tuple[int, int]] = frozenset()  # (seed row, blueprint row) pairs culled earlier in the
    # run, which the policy could not grow (the command's culled_pairs annotation, esper.tamiyo.culls)
    reward: float = 0.0
    ret: float = 0.0  # discounted return
    advantage: float = 0.0
    outcome: int = pb.FIELD_REPORT_OUTCOME_UNSPECIFIED
    fate: float = 0.0  # GERMINATE: +1 its seed was later FOSSILIZED with evidence, -1 CULLED / EMBARGOED or
    # kept on too little evidence, 0 not known


def action_of(command: pb.AdaptationCommand) -> int | None:
    """The action-table index a command corresponds to; None for commands the policy never issues."""
    kind = command.command_type
    if kind == pb.COMMAND_SEED:
        return ACTION_GERMINATE if command.seed_operation.operation == pb.SEED_OP_GERMINATE else None
    if kind == pb.COMMAND_OPTIMIZER:
        return ACTION_OPTIMIZER
    if kind == pb.COMMAND_CIRCUIT_BREAKER:
        return ACTION_BREAKER_OPEN if command.circuit_breaker.desired_state == pb.CIRCUIT_STATE_OPEN \
            else ACTION_BREAKER_CLOSE
    if kind == pb.COMMAND_PAUSE:
        return ACTION_PAUSE
    return None


def _param_target(command: pb.AdaptationCommand, action: int) -> float | None:
    if action == ACTION_OPTIMIZER:
        value = command.optimizer_adjustment.hyperparameters.get("lr_delta")
        return float(value) if value is not None and math.isfinite(value) else None
    if action == ACTION_GERMINATE:
        alpha = command.seed_operation.parameters.get("alpha")
        return float(alpha) - GERMINATE_BASE_ALPHA if alpha is not None and math.isfinite(alpha) else None
    return None


def _row(ids: Sequence[str], wanted: str) -> int | None:
    try:
        return list(ids).index(wanted)
    except ValueError:
        return None


def _rows(graph: GraphInputs, pairs: Iterable[tuple[str, str]]) -> frozenset[tuple[int, int]]:
    """(seed row, blueprint row) of each (seed id, blueprint id) pair the graph holds."""
    out = set()
    for seed_id, blueprint_id in pairs:
        i, j = _row(graph.seed_ids, seed_id), _row(graph.blueprint_ids, blueprint_id)
        if i is not None and j is not None:
            out.add((i, j))
    return frozenset(out)


def _loss(packet: pb.SystemStatePacket) -> float | None:
    m = packet.training_metrics
    value = m.get("loss_ewma", m.get("loss", packet.training_loss))
    return float(value) if math.isfinite(value) and value > 0 else None


def build_samples(reports: Iterable[pb.FieldReport], *, blueprints: Sequence[BlueprintInfo] = (),
                  registries: RegistrySet | None = None, normaliser: FeatureNormaliser | None = None,
                  rewards: RewardConfig | None = None, max_blueprints: int = DEFAULT_MAX_BLUEPRINTS) -> list[Sample]:
    """Samples for every decision report that carries its observation and command, with rewards,
    returns and advantages (see the module docstring). `reports` may come in any order.
    `max_blueprints` must be Tamiyo's (`TAMIYO_MAX_BLUEPRINTS`): the graph is the one it decided on."""
    cfg = rewards or RewardConfig()
    all_reports = sorted(reports, key=lambda r: (r.issued_at.ToMilliseconds(), r.report_id))
    window_outcome: dict[str, int] = {r.command_id: int(r.outcome) for r in all_reports
                      if r.report_id.startswith("fr-synth-") and r.command_id}
    builder = GraphBuilder(normaliser or FeatureNormaliser(), registries or RegistrySet.new(),
                           max_blueprints=max_blueprints)
    samples: list[Sample] = []
    packets: dict[str, pb.SystemStatePacket] = {}
    for report in all_reports:
        if not (report.HasField("observation") and report.HasField("command")):
            continue
        command, packet = report.command, report.observation
        action = action_of(command)
        if action is None or not packet.training_run_id:
            continue
        try:
            graph = builder.build(packet, blueprints)  # every packet, so the normaliser sees what Tamiyo's saw
        except DependencyViolationError:
            continue  # Tamiyo refused this packet too: no decision to learn from
        if POLICY_COMMAND_ANNOTATION in command.annotations:
            continue  # the risk engine's replacement of the policy's command: not the policy's decision
        try:
            culled = culled_pairs(command.annotations)
        except ValueError:
            continue  # not a command our Tamiyo wrote: which choice it had is unknown
        dormant = {s.seed_id for s in packet.seed_states if s.stage == pb.SEED_STAGE_DORMANT}
        seed_target = _row(graph.seed_ids, command.target_seed_id) if action == ACTION_GERMINATE else None
        bp_target = (_row(graph.blueprint_ids, command.seed_operation.blueprint_id)
                     if action == ACTION_GERMINATE else None)
        samples.append(Sample(
            report_id=report.report_id, run_id=packet.training_run_id, step=int(packet.global_step),
            epoch=int(packet.current_epoch), graph=graph, germinable=tuple(s in dormant for s in graph.seed_ids),
            action=action, param_target=_param_target(command, action), seed_target=seed_target,
            blueprint_target=bp_target, outcome=report.outcome,
            culled=_rows(graph, culled)))
        packets[report.report_id] = packet
    return _with_advantages(samples, packets, {r.report_id: r for r in all_reports}, window_outcome, cfg)


def _rewards(run: list[Sample], packets: dict[str, pb.SystemStatePacket], reports: dict[str, pb.FieldReport],
             window_outcome: dict[str, int], cfg: RewardConfig) -> list[float]:
    out = []
    for i, s in enumerate(run):
        report = reports[s.report_id]
        r = 0.0
        if s.outcome == pb.FIELD_REPORT_OUTCOME_REGRESSION:
            r -= cfg.outcome_reward
        r += cfg.outcome_reward * _OUTCOME_SIGN.get(window_outcome.get(report.command_id, 0), 0.0)
        r += cfg.fate_reward * s.fate
        if i + 1 < len(run):
            now, nxt = packets[s.report_id], packets[run[i + 1].report_id]
            a, b = _loss(now), _loss(nxt)
            if a is not None and b is not None:
                r -= b - a
            if now.validation_loss > 0 and nxt.validation_loss > 0 and nxt.current_epoch != now.current_epoch:
                r -= float(nxt.validation_loss - now.validation_loss)
        out.append(r)
    return out


_FATE: dict[int, float] = {pb.SEED_STAGE_FOSSILIZED: 1.0, pb.SEED_STAGE_CULLED: -1.0, pb.SEED_STAGE_EMBARGOED: -1.0}


def _seed_fate(seed_id: str, later: Iterable[pb.SystemStatePacket], min_improvement: float) -> float:
    """+1 if the seed is next seen FOSSILIZED (with `evidence_mean` ≥ `min_improvement` when the packet
    carries it), -1 if CULLED / EMBARGOED or kept on less evidence, 0 if the run ended first."""
    for packet in later:
        for st in packet.seed_states:
            if st.seed_id == seed_id and st.stage in _FATE:
                evidence = st.metrics.get("evidence_mean") if st.stage == pb.SEED_STAGE_FOSSILIZED else None
                if evidence is not None and not evidence >= min_improvement:
                    return -1.0
                return _FATE[st.stage]
    return 0.0


def _with_advantages(samples: list[Sample], packets: dict[str, pb.SystemStatePacket],
                     reports: dict[str, pb.FieldReport], window_outcome: dict[str, int],
                     cfg: RewardConfig) -> list[Sample]:
    runs: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        runs[s.run_id].append(s)
    staged: list[tuple[list[Sample], list[float], list[float]]] = []
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for run in runs.values():
        run.sort(key=lambda s: s.step)
        run[:] = [replace(s, fate=_seed_fate(reports[s.report_id].command.target_seed_id,
                                             (packets[later.report_id] for later in run[i + 1:]),
                                             cfg.fate_min_improvement))
                  if s.action == ACTION_GERMINATE else s for i, s in enumerate(run)]
        rewards = _rewards(run, packets, reports, window_outcome, cfg)
        returns = [0.0] * len(run)
        acc = 0.0
        for i in range(len(run) - 1, -1, -1):
            acc = rewards[i] + cfg.gamma * acc
            returns[i] = acc
        for s, g in zip(run, returns, strict=True):
            by_epoch[s.epoch].append(g)
        staged.append((run, rewards, returns))
    baseline = {e: sum(v) / len(v) for e, v in by_epoch.items()}
    out: list[Sample] = []
    for run, rewards, returns in staged:
        values = [baseline[s.epoch] for s in run]
        adv = [0.0] * len(run)
        gae = 0.0
        for i in range(len(run) - 1, -1, -1):
            next_value = values[i + 1] if i + 1 < len(run) else 0.0
            delta = rewards[i] + cfg.gamma * next_value - values[i]
            gae = delta + cfg.gamma * cfg.gae_lambda * gae
            adv[i] = gae
        out.extend(replace(s, reward=r, ret=g, advantage=a)
                   for s, r, g, a in zip(run, rewards, returns, adv, strict=True))
    return out


def split_by_run(samples: Sequence[Sample], holdout_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): whole runs are held out (neighbouring decisions of one run are near
    duplicates, so a split inside a run would leak). The newest runs are held out, at least one when
    there are two or more runs; with one run nothing is held out (the gate then refuses)."""
    first_seen: dict[str, int] = {}
    for s in samples:
        first_seen.setdefault(s.run_id, len(first_seen))
    order = sorted(first_seen, key=first_seen.__getitem__)
    if len(order) < 2:
        return list(samples), []
    n_hold = min(len(order) - 1, max(1, round(len(order) * holdout_fraction)))
    held = set(order[-n_hold:])
    return [s for s in samples if s.run_id not in held], [s for s in samples if s.run_id in held]
