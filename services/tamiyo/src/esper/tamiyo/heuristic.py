"""A transparent rule-based policy (`TAMIYO_POLICY=heuristic`): the yardstick the GNN must beat.

Rules, in order (one seed at a time; every decision says which rule fired in `annotations["rule"]`):
1. a seed is in flight (germinated .. probationary) → PAUSE (`seed_in_flight`): let Kasmina finish it;
2. the validation loss has not improved by `min_improvement` (relative) over the last `patience`
   epochs, at least `cooldown_epochs` after the last germination, and a seed is DORMANT → GERMINATE
   the shallowest dormant seed with the best candidate blueprint (graph order: not quarantined, fits
   the trainer's slot kind, best score) that Kasmina has not culled in that seed during this run
   (`plateau`): repeating a design that just failed there would only pay for the cull again;
3. otherwise PAUSE (`improving`, `cooldown`, `no_dormant_seed`, `no_blueprint`, or `all_culled` when
   every candidate was culled in every dormant seed).
The risk engine still runs after it, exactly as for the GNN.

State (validation loss per epoch, last germination epoch, what it grew in each seed and which of
those Kasmina culled, read off the seeds' stages) is kept per training run in this process:
with several replicas each sees only the packets it decides, which delays, never breaks, a plateau.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from esper.leyline import pb
from esper.tamiyo.culls import CULLED_PAIRS_ANNOTATION, CullRecord, PerRun, encode_culled
from esper.tamiyo.policy import (
    ACTION_GERMINATE,
    ACTION_PAUSE,
    COMMAND_VERSION,
    ISSUED_BY,
    PolicyDecision,
    coverage_fraction,
    finish_decision,
)

HEURISTIC_VERSION: Final[str] = "tamiyo_heuristic_v2"  # v2: no regrowing a design culled in that seed
_ACTIVE: Final[frozenset[int]] = frozenset({pb.SEED_STAGE_GERMINATED, pb.SEED_STAGE_TRAINING, pb.SEED_STAGE_BLENDING,
                                            pb.SEED_STAGE_SHADOWING, pb.SEED_STAGE_PROBATIONARY})


@dataclass(slots=True)
class _RunState:
    val_loss: dict[int, float] = field(default_factory=dict)  # epoch → validation loss seen
    last_germinate_epoch: int | None = None
    culls: CullRecord = field(default_factory=CullRecord)  # what we grew where, and what Kasmina culled


@dataclass(slots=True)
class HeuristicPolicy:
    patience: int = 2
    min_improvement: float = 0.01
    cooldown_epochs: int = 2
    _runs: PerRun[_RunState] = field(default_factory=lambda: PerRun(_RunState))

    def decide(self, packet: pb.SystemStatePacket, *, seed_ids: list[str], blueprint_ids: list[str],
               feature_coverage: float | Mapping[str, float]) -> PolicyDecision:
        """`seed_ids` / `blueprint_ids` are the graph's (blueprints already in candidate order)."""
        run = self._runs(packet.training_run_id)
        epoch = int(packet.current_epoch)
        if packet.validation_loss > 0:  # proto3 float: 0 means no validation yet
            run.val_loss[epoch] = float(packet.validation_loss)
        run.culls.observe(packet.seed_states)
        rule, seed, blueprint = self._rule(packet, run, epoch, seed_ids, blueprint_ids)
        action = ACTION_GERMINATE if rule == "plateau" else ACTION_PAUSE
        if action == ACTION_GERMINATE and seed is not None and blueprint is not None:
            run.last_germinate_epoch = epoch
            run.culls.germinated(seed, blueprint)
        decision = PolicyDecision(
            command=pb.AdaptationCommand(version=COMMAND_VERSION, issued_by=ISSUED_BY), action=action,
            param_delta=0.0, seed_id=seed, blueprint_id=blueprint, blending_method="linear", blending_method_index=0,
            schedule_start=0.0, schedule_end=1.0, value_estimate=0.0, risk_index=0, risk_score=0.0,
            breaker_open_score=0.0, breaker_close_score=0.0, feature_coverage=coverage_fraction(feature_coverage),
            policy_version=HEURISTIC_VERSION, no_dormant_seed=rule == "no_dormant_seed")
        finish_decision(decision)
        decision.command.annotations["rule"] = rule
        if run.culls.culled:
            decision.command.annotations[CULLED_PAIRS_ANNOTATION] = encode_culled(run.culls.culled)
        if action == ACTION_PAUSE:
            decision.command.annotations["reason"] = rule
        return decision

    def _rule(self, packet: pb.SystemStatePacket, run: _RunState, epoch: int, seed_ids: list[str],
              blueprint_ids: list[str]) -> tuple[str, str | None, str | None]:
        if any(s.stage in _ACTIVE for s in packet.seed_states):
            return "seed_in_flight", None, None
        if run.last_germinate_epoch is not None and epoch - run.last_germinate_epoch < self.cooldown_epochs:
            return "cooldown", None, None
        if not self._plateau(run, epoch):
            return "improving", None, None
        in_graph = set(seed_ids)
        dormant = sorted((s for s in packet.seed_states if s.stage == pb.SEED_STAGE_DORMANT and s.seed_id in in_graph),
                         key=lambda s: (s.layer_depth, s.seed_id))
        if not dormant:
            return "no_dormant_seed", None, None
        if not blueprint_ids:
            return "no_blueprint", None, None
        for s in dormant:
            fresh = [bp for bp in blueprint_ids if (s.seed_id, bp) not in run.culls.culled]
            if fresh:
                return "plateau", s.seed_id, fresh[0]
        return "all_culled", None, None

    def _plateau(self, run: _RunState, epoch: int) -> bool:
        """The best validation loss of the last `patience` epochs is no better (by the relative margin)
        than the best before them. (A packet carries the loss of the last finished validation.)"""
        done = sorted(e for e in run.val_loss if e <= epoch)
        if len(done) <= self.patience:
            return False
        recent = min(run.val_loss[e] for e in done[-self.patience:])
        before = min(run.val_loss[e] for e in done[:-self.patience])
        return recent > before * (1.0 - self.min_improvement)
