"""The transition table, exhaustively: every ordered pair of stages is legal or raises."""

from __future__ import annotations

import itertools

import pytest

from esper.kasmina import TRANSITIONS, IllegalTransitionError, SeedLifecycle, is_legal, stage_name
from esper.kasmina.lifecycle import ALL_STAGES
from esper.leyline import pb

S = pb  # brevity below
# Written out independently of the implementation: the prototype's table plus our two additions.
EXPECTED = {
    (S.SEED_STAGE_DORMANT, S.SEED_STAGE_GERMINATED),
    (S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING),
    (S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING),
    (S.SEED_STAGE_BLENDING, S.SEED_STAGE_SHADOWING),
    (S.SEED_STAGE_SHADOWING, S.SEED_STAGE_PROBATIONARY),
    (S.SEED_STAGE_PROBATIONARY, S.SEED_STAGE_FOSSILIZED),
    (S.SEED_STAGE_FOSSILIZED, S.SEED_STAGE_TERMINATED),
    (S.SEED_STAGE_GERMINATED, S.SEED_STAGE_CULLED),
    (S.SEED_STAGE_TRAINING, S.SEED_STAGE_CULLED),
    (S.SEED_STAGE_BLENDING, S.SEED_STAGE_CULLED),
    (S.SEED_STAGE_SHADOWING, S.SEED_STAGE_CULLED),
    (S.SEED_STAGE_PROBATIONARY, S.SEED_STAGE_CULLED),
    (S.SEED_STAGE_CULLED, S.SEED_STAGE_EMBARGOED),
    (S.SEED_STAGE_EMBARGOED, S.SEED_STAGE_RESETTING),
    (S.SEED_STAGE_RESETTING, S.SEED_STAGE_DORMANT),
    (S.SEED_STAGE_DORMANT, S.SEED_STAGE_TERMINATED),
    (S.SEED_STAGE_RESETTING, S.SEED_STAGE_TERMINATED),  # ours: a reset that fails G5 retires the slot
}
EVERY_VALUE = (pb.SEED_STAGE_UNKNOWN, *ALL_STAGES)


def test_all_eleven_stages_are_in_the_table() -> None:
    assert len(ALL_STAGES) == 11 and set(TRANSITIONS) == set(ALL_STAGES)
    assert {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts} == EXPECTED


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(EVERY_VALUE, EVERY_VALUE)),
                         ids=lambda v: stage_name(v))
def test_every_pair(src: int, dst: int) -> None:
    legal = (src, dst) in EXPECTED
    assert is_legal(src, dst) is legal
    if src == pb.SEED_STAGE_UNKNOWN:
        with pytest.raises(ValueError):
            SeedLifecycle("seed-x", src)
        return
    life = SeedLifecycle("seed-x", src)
    if legal:
        t = life.transition(dst, step=7, epoch=2, reason="test")
        assert life.stage == dst and (t.from_stage, t.to_stage, t.step, t.epoch) == (src, dst, 7, 2)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            life.transition(dst)
        assert life.stage == src and life.history == ()
        assert (info.value.from_stage, info.value.to_stage) == (src, dst)


def test_terminal_stages_and_history() -> None:
    assert TRANSITIONS[pb.SEED_STAGE_TERMINATED] == frozenset()
    assert TRANSITIONS[pb.SEED_STAGE_FOSSILIZED] == {pb.SEED_STAGE_TERMINATED}
    life = SeedLifecycle("seed-a")
    path = [pb.SEED_STAGE_GERMINATED, pb.SEED_STAGE_CULLED, pb.SEED_STAGE_EMBARGOED, pb.SEED_STAGE_RESETTING,
            pb.SEED_STAGE_DORMANT]
    for i, stage in enumerate(path):
        life.transition(stage, step=i)
    assert [t.to_stage for t in life.history] == path and [t.step for t in life.history] == list(range(5))
    assert stage_name(pb.SEED_STAGE_PROBATIONARY) == "PROBATIONARY"
