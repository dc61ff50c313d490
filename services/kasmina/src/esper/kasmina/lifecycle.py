"""The seed lifecycle: the prototype's eleven Leyline stages and only its legal transitions.

::

    DORMANT ──G0──▶ GERMINATED ──G1──▶ TRAINING ──G2──▶ BLENDING ──G3──▶ SHADOWING ──G4──▶ PROBATIONARY
       │                 │                 │                │                 │                 │    │
       │                 └────────┬────────┴────────────────┴─────────────────┴─────────────────┘    │ evidence
       │                          ▼                                                                  ▼ of benefit
       │                       CULLED ──▶ EMBARGOED ──▶ RESETTING ──G5──▶ DORMANT                FOSSILIZED
       │                                                    │                                        │
       └──────────────────────────────▶ TERMINATED ◀────────┘ (G5 failed)  ◀─────────────────────────┘

Unlike the prototype, seeds really finish: at the end of probation a seed with evidence of benefit
is FOSSILIZED (merged into the host for good), any other is CULLED and its slot goes back to DORMANT
through the embargo (cooldown) and a clean reset (G5).

Decisions beyond the prototype's table:
- FOSSILIZED is terminal for the seed *and* its slot: the fossil stays in the host, the slot never
  hosts another seed (a host that wants more capacity there declares another slot). Its only exit is
  TERMINATED, when the trainer retires the slot.
- RESETTING → TERMINATED: a slot whose reset fails G5 (a kernel, optimizer state or hook left
  behind) is retired instead of being reused dirty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from esper.kasmina.errors import IllegalTransitionError
from esper.leyline import pb

__all__ = [
    "ACTIVE_STAGES",
    "ALL_STAGES",
    "BLENDING",
    "CULLED",
    "DORMANT",
    "EMBARGOED",
    "FOSSILIZED",
    "GERMINATED",
    "ISOLATED_STAGES",
    "PROBATIONARY",
    "RESETTING",
    "SHADOWING",
    "TERMINATED",
    "TRAINING",
    "TRANSITIONS",
    "IllegalTransitionError",
    "SeedLifecycle",
    "Transition",
    "check_transition",
    "is_legal",
    "stage_name",
]

DORMANT: Final[int] = pb.SEED_STAGE_DORMANT
GERMINATED: Final[int] = pb.SEED_STAGE_GERMINATED
TRAINING: Final[int] = pb.SEED_STAGE_TRAINING
BLENDING: Final[int] = pb.SEED_STAGE_BLENDING
SHADOWING: Final[int] = pb.SEED_STAGE_SHADOWING
PROBATIONARY: Final[int] = pb.SEED_STAGE_PROBATIONARY
FOSSILIZED: Final[int] = pb.SEED_STAGE_FOSSILIZED
CULLED: Final[int] = pb.SEED_STAGE_CULLED
EMBARGOED: Final[int] = pb.SEED_STAGE_EMBARGOED
RESETTING: Final[int] = pb.SEED_STAGE_RESETTING
TERMINATED: Final[int] = pb.SEED_STAGE_TERMINATED

#: Every real stage (UNKNOWN excluded), in number order.
ALL_STAGES: Final[tuple[int, ...]] = tuple(v for v in pb.SeedLifecycleStage.values() if v != pb.SEED_STAGE_UNKNOWN)

#: Stages in which a seed is alive (may be culled): GERMINATED through PROBATIONARY.
ACTIVE_STAGES: Final[frozenset[int]] = frozenset({GERMINATED, TRAINING, BLENDING, SHADOWING, PROBATIONARY})

#: Stages in which gradient isolation is enforced and measured (the kernel runs, but is not host yet).
ISOLATED_STAGES: Final[frozenset[int]] = ACTIVE_STAGES

TRANSITIONS: Final[Mapping[int, frozenset[int]]] = MappingProxyType({
    DORMANT: frozenset({GERMINATED, TERMINATED}),
    GERMINATED: frozenset({TRAINING, CULLED}),
    TRAINING: frozenset({BLENDING, CULLED}),
    BLENDING: frozenset({SHADOWING, CULLED}),
    SHADOWING: frozenset({PROBATIONARY, CULLED}),
    PROBATIONARY: frozenset({FOSSILIZED, CULLED}),
    FOSSILIZED: frozenset({TERMINATED}),
    CULLED: frozenset({EMBARGOED}),
    EMBARGOED: frozenset({RESETTING}),
    RESETTING: frozenset({DORMANT, TERMINATED}),
    TERMINATED: frozenset(),
})
"""Legal transitions: ``TRANSITIONS[src]`` is the set of stages ``src`` may move to; anything else is illegal."""


def stage_name(stage: int) -> str:
    """``pb.SEED_STAGE_TRAINING`` → ``"TRAINING"`` (``"UNKNOWN"`` for values outside the enum)."""
    try:
        return pb.SeedLifecycleStage.Name(pb.SeedLifecycleStage.ValueType(stage)).removeprefix("SEED_STAGE_")
    except ValueError:
        return f"UNKNOWN({stage})"


def is_legal(src: int, dst: int) -> bool:
    return dst in TRANSITIONS.get(src, frozenset())


def check_transition(seed_id: str, src: int, dst: int) -> None:
    """Raise :class:`IllegalTransitionError` unless ``src → dst`` is in the table."""
    if not is_legal(src, dst):
        raise IllegalTransitionError(seed_id, src, dst)


@dataclass(frozen=True, slots=True)
class Transition:
    """One recorded stage change (for ``seed_stage`` telemetry and post-mortems)."""

    seed_id: str
    from_stage: int
    to_stage: int
    step: int
    epoch: int
    reason: str = ""


class SeedLifecycle:
    """The stage of one seed slot plus its recent transitions (bounded history)."""

    __slots__ = ("_history", "_stage", "seed_id")

    def __init__(self, seed_id: str, stage: int = DORMANT, *, history: int = 64) -> None:
        if stage not in TRANSITIONS:
            raise ValueError(f"{seed_id}: {stage_name(stage)} is not a lifecycle stage")
        self.seed_id = seed_id
        self._stage = stage
        self._history: deque[Transition] = deque(maxlen=history)

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def history(self) -> tuple[Transition, ...]:
        return tuple(self._history)

    def can(self, dst: int) -> bool:
        return is_legal(self._stage, dst)

    def transition(self, dst: int, *, step: int = 0, epoch: int = 0, reason: str = "") -> Transition:
        """Move to ``dst`` or raise :class:`IllegalTransitionError` (the stage is then unchanged)."""
        check_transition(self.seed_id, self._stage, dst)
        record = Transition(self.seed_id, self._stage, dst, step, epoch, reason)
        self._stage = dst
        self._history.append(record)
        return record

    def __repr__(self) -> str:
        return f"SeedLifecycle({self.seed_id!r}, {stage_name(self._stage)})"
