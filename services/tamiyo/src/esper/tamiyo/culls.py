"""What a training run grew in each seed, and which of those designs Kasmina culled there.

Every policy Tamiyo serves reads it: a (seed, blueprint) pair Kasmina culled earlier in the run is not
grown again (`TAMIYO_CULL_MEMORY`; the rule-based policy always keeps it). Regrowing a design that just
failed in that seed only pays for the cull again: a GNN that ranks one pair first grew it after every
cull, three times a run (docs/simic.md), while the rule-based policy moved on to its next design.

The record is read off the packets a replica decides on, so with several replicas each sees fewer of
them: a cull is then noticed late (the seed is DORMANT again after it left DORMANT), never missed. The
pairs a decision excluded travel with its command (`annotations["culled_pairs"]`, JSON), so Simic
scores the choice the policy really had.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import orjson

from esper.leyline import pb

CULLED_PAIRS_ANNOTATION: Final[str] = "culled_pairs"
_CULL_STAGES: Final[frozenset[int]] = frozenset({pb.SEED_STAGE_CULLED, pb.SEED_STAGE_EMBARGOED,
                                                 pb.SEED_STAGE_RESETTING})
MAX_RUNS: Final[int] = 256

T = TypeVar("T")


@dataclass(slots=True)
class CullRecord:
    grown: dict[str, str] = field(default_factory=dict)  # seed id → blueprint grown there, no verdict yet
    left_dormant: set[str] = field(default_factory=set)  # grown seeds seen past DORMANT
    culled: set[tuple[str, str]] = field(default_factory=set)  # (seed id, blueprint id) Kasmina culled

    def observe(self, seeds: Iterable[pb.SeedState]) -> None:
        """A seed we grew that reaches a cull stage, or is DORMANT again after it left DORMANT (its cull
        fell between the packets seen), was culled with that blueprint; a fossilised one keeps its slot.
        (A germination Kasmina refused stays in `grown` until the next one in that seed.)"""
        for s in seeds:
            sid = s.seed_id
            if s.stage == pb.SEED_STAGE_FOSSILIZED:
                self.grown.pop(sid, None)
                self.left_dormant.discard(sid)
            elif sid not in self.grown:
                continue
            elif s.stage in _CULL_STAGES or (s.stage == pb.SEED_STAGE_DORMANT and sid in self.left_dormant):
                self.culled.add((sid, self.grown.pop(sid)))
                self.left_dormant.discard(sid)
            elif s.stage != pb.SEED_STAGE_DORMANT:
                self.left_dormant.add(sid)

    def germinated(self, seed_id: str, blueprint_id: str) -> None:
        self.grown[seed_id] = blueprint_id
        self.left_dormant.discard(seed_id)


class PerRun(Generic[T]):
    """One state per training run, the least recently seen dropped past `max_runs` (a long-lived
    replica serves many runs; a run that went quiet needs no memory)."""

    def __init__(self, factory: Callable[[], T], max_runs: int = MAX_RUNS) -> None:
        self._factory = factory
        self._max = max_runs
        self._runs: OrderedDict[str, T] = OrderedDict()

    def __call__(self, run_id: str) -> T:
        state = self._runs.get(run_id)
        if state is None:
            state = self._runs[run_id] = self._factory()
            while len(self._runs) > self._max:
                self._runs.popitem(last=False)
        self._runs.move_to_end(run_id)
        return state

    def __len__(self) -> int:
        return len(self._runs)


def encode_culled(pairs: Iterable[tuple[str, str]]) -> str:
    return orjson.dumps(sorted([s, b] for s, b in pairs)).decode()


def culled_pairs(annotations: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The (seed, blueprint) pairs a command's decision excluded; empty when it names none. A value
    that is not a JSON list of [seed, blueprint] string pairs raises ValueError."""
    raw = annotations.get(CULLED_PAIRS_ANNOTATION)
    if not raw:
        return frozenset()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{CULLED_PAIRS_ANNOTATION} is not JSON: {raw[:80]!r}") from e
    if not isinstance(data, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in data):
        raise ValueError(f"{CULLED_PAIRS_ANNOTATION} is not a list of [seed, blueprint] pairs: {raw[:80]!r}")
    return frozenset((p[0], p[1]) for p in data)
