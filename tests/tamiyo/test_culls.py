"""The per-run cull record's plumbing: one state per run with a bound, and the annotation Simic reads
(the record's own stage logic is exercised through the rule-based policy and the service)."""

from __future__ import annotations

import pytest

from esper.leyline import pb
from esper.tamiyo.culls import CULLED_PAIRS_ANNOTATION, CullRecord, PerRun, culled_pairs, encode_culled


def test_one_record_per_run_the_least_recently_seen_dropped() -> None:
    runs: PerRun[CullRecord] = PerRun(CullRecord, max_runs=2)
    a = runs("a")
    a.germinated("seed-0", "BP001")
    a.observe([pb.SeedState(seed_id="seed-0", stage=pb.SEED_STAGE_CULLED)])
    assert runs("a") is a and a.culled == {("seed-0", "BP001")} and not a.grown
    runs("b")
    runs("a")  # seen again: "b" is now the oldest
    runs("c")
    assert len(runs) == 2 and runs("a") is a and runs("b").culled == set()


def test_a_fossilised_seed_is_no_cull_and_an_unseen_seed_is_ignored() -> None:
    record = CullRecord()
    record.germinated("seed-0", "BP001")
    record.observe([pb.SeedState(seed_id="seed-0", stage=pb.SEED_STAGE_TRAINING),
                    pb.SeedState(seed_id="seed-1", stage=pb.SEED_STAGE_CULLED)])
    record.observe([pb.SeedState(seed_id="seed-0", stage=pb.SEED_STAGE_FOSSILIZED)])
    record.observe([pb.SeedState(seed_id="seed-0", stage=pb.SEED_STAGE_DORMANT)])
    assert record.culled == set() and not record.grown


def test_the_annotation_round_trips_and_a_malformed_one_is_refused() -> None:
    pairs = {("seed-1", "BP002"), ("seed-0", "BP010")}
    assert culled_pairs({CULLED_PAIRS_ANNOTATION: encode_culled(pairs)}) == pairs
    assert culled_pairs({}) == frozenset()
    for bad in ("nope", '{"seed-0": "BP001"}', '[["seed-0"]]', '[["seed-0", 3]]'):
        with pytest.raises(ValueError, match=CULLED_PAIRS_ANNOTATION):
            culled_pairs({CULLED_PAIRS_ANNOTATION: bad})
