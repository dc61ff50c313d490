"""EWMA normaliser: the update maths, clipping, and atomic save/restore with typed corruption errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from esper.core.errors import EsperError
from esper.tamiyo.normaliser import NORMALISER_DEFAULTS, FeatureNormaliser, NormaliserStateError


def test_defaults_are_the_prototype_starting_points() -> None:
    norm = FeatureNormaliser()
    assert norm.stats("loss") == pytest.approx((0.8, 0.09, 0))
    assert norm.stats("samples_per_s") == pytest.approx((4500.0, 250000.0, 0))
    assert norm.alpha == 0.1


def test_observe_scores_against_prior_stats_then_applies_the_ewma() -> None:
    norm = FeatureNormaliser()
    assert norm.observe("loss", 1.1) == pytest.approx(1.0)  # (1.1 - 0.8) / 0.3
    mean, var, count = norm.stats("loss") or (0.0, 0.0, 0)
    assert mean == pytest.approx(0.8 + 0.1 * 0.3)  # 0.83
    assert var == pytest.approx(0.9 * (0.09 + 0.1 * 0.09))  # 0.0891
    assert count == 1
    z = norm.observe("loss", 0.83)
    assert z == pytest.approx(0.0)
    assert norm.stats("loss") == pytest.approx((0.83, 0.9 * 0.0891, 2))


def test_normalise_is_pure_and_update_matches_observe() -> None:
    a, b = FeatureNormaliser(), FeatureNormaliser()
    assert a.normalise("loss", 1.1) == pytest.approx(1.0)
    assert a.stats("loss") == pytest.approx((0.8, 0.09, 0))
    a.update("loss", 1.1)
    b.observe("loss", 1.1)
    assert a.stats("loss") == b.stats("loss")


def test_clipping_and_unknown_keys() -> None:
    norm = FeatureNormaliser(clip=10.0)
    assert norm.normalise("loss", 1e6) == 10.0
    assert norm.observe("loss", -1e6) == -10.0
    assert norm.normalise("never_seen", 3.0) == 0.0
    assert norm.observe("never_seen", 3.0) == 0.0  # first sight initialises (3.0, 1.0)
    assert norm.stats("never_seen") == (3.0, 1.0, 1)
    assert norm.observe("never_seen", 5.0) == pytest.approx(2.0)


def test_variance_never_collapses_to_zero() -> None:
    norm = FeatureNormaliser(defaults={"k": (1.0, 0.0)})
    for _ in range(500):
        norm.observe("k", 1.0)
    _, var, _ = norm.stats("k") or (0.0, 0.0, 0)
    assert var > 0.0
    assert math.isfinite(norm.normalise("k", 2.0))


def test_save_restore_round_trip(tmp_path: Path) -> None:
    norm = FeatureNormaliser()
    for v in (0.5, 0.7, 2.0, 0.1):
        norm.observe("loss", v)
    norm.observe("custom", 42.0)
    path = tmp_path / "tamiyo" / "gnn_norms.json"
    norm.save(path)
    assert not norm.dirty
    assert [p.name for p in path.parent.iterdir()] == ["gnn_norms.json"]
    restored = FeatureNormaliser.load(path)
    for key in norm.known_keys():
        assert restored.stats(key) == norm.stats(key)
    assert restored.normalise("loss", 0.9) == norm.normalise("loss", 0.9)


def test_load_merges_defaults_for_keys_added_later(tmp_path: Path) -> None:
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"format": 1, "alpha": 0.1, "stats": {"loss": {"mean": 1.0, "var": 4.0, "count": 3}}}))
    norm = FeatureNormaliser.load(path)
    assert norm.stats("loss") == (1.0, 4.0, 3)
    assert set(NORMALISER_DEFAULTS) <= set(norm.known_keys())


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"format": 2, "stats": {}}),
        json.dumps({"format": 1, "stats": {"loss": {"mean": "x", "var": 1.0}}}),
        json.dumps({"format": 1, "stats": {"loss": {"mean": 0.0, "var": -1.0}}}),
        '{"format": 1, "stats": {"loss": {"mean": NaN, "var": 1.0}}}',
        json.dumps({"format": 1, "stats": {"loss": 3}}),
    ],
)
def test_corrupt_state_is_a_typed_error_not_a_silent_reset(tmp_path: Path, content: str) -> None:
    path = tmp_path / "n.json"
    path.write_text(content)
    with pytest.raises(NormaliserStateError) as info:
        FeatureNormaliser.load(path)
    assert isinstance(info.value, EsperError)
    with pytest.raises(NormaliserStateError):
        FeatureNormaliser.load_or_default(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FeatureNormaliser.load(tmp_path / "absent.json")
    assert FeatureNormaliser.load_or_default(tmp_path / "absent.json").stats("loss") == pytest.approx((0.8, 0.09, 0))
