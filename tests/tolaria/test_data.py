"""Data: digits split determinism and stratification, .npz validation errors, the batch iterator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from esper.tolaria.data import (
    DatasetError,
    epoch_generator,
    iter_batches,
    load_dataset,
    load_digits_dataset,
    load_npz_dataset,
    num_batches,
)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits_dataset(seed=7)


def test_digits_split_is_deterministic_stratified_and_standardised(digits: Any) -> None:
    again = load_digits_dataset(seed=7)
    for name in ("x_train", "y_train", "x_val", "y_val", "feature_mean", "feature_std"):
        assert torch.equal(getattr(digits, name), getattr(again, name)), name
    other = load_digits_dataset(seed=8)
    assert not torch.equal(digits.y_val, other.y_val)

    meta = digits.meta
    assert (meta.num_features, meta.num_classes, meta.input_shape) == (64, 10, (64,))
    assert (meta.train_size, meta.val_size) == (1437, 360) and meta.source == "digits"
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    # stratified: every class's validation share is within one sample of 20 %
    total = torch.bincount(torch.cat([digits.y_train, digits.y_val]), minlength=10)
    val = torch.bincount(digits.y_val, minlength=10)
    assert torch.all((val - total.double() * 0.2).abs() <= 1.0)
    # standardised with training statistics: train features have mean 0, std 1 (constant ones std 0)
    assert digits.x_train.mean(0).abs().max() < 1e-5
    std = digits.x_train.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))
    assert torch.allclose(digits.standardise(digits.x_train * digits.feature_std + digits.feature_mean),
                          digits.x_train, atol=1e-5)


def test_load_dataset_defaults_to_digits() -> None:
    assert load_dataset(None, seed=7).meta.name == "digits"


def test_batches_cover_the_data_once_and_repeat_per_epoch_seed(digits: Any) -> None:
    x, y = digits.x_train, digits.y_train
    batches = list(iter_batches(x, y, 100, generator=epoch_generator(3, 1)))
    assert len(batches) == num_batches(len(x), 100) == 15 and len(batches[-1][0]) == 37
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(torch.sort(seen).values, torch.sort(y).values)
    same = list(iter_batches(x, y, 100, generator=epoch_generator(3, 1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, same, strict=True))
    nxt = next(iter_batches(x, y, 100, generator=epoch_generator(3, 2)))
    assert not torch.equal(nxt[0], batches[0][0])
    assert len(list(iter_batches(x, y, 100, generator=epoch_generator(3, 1), drop_last=True))) == 14
    ordered = next(iter_batches(x, y, 5, shuffle=False))
    assert torch.equal(ordered[0], x[:5])
    with pytest.raises(ValueError, match="generator"):
        next(iter_batches(x, y, 5))


def _npz(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def _good(n: int = 40, classes: int = 4) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 3, 2)).astype(np.float32), "y": np.arange(n) % classes}


def test_npz_with_and_without_validation_arrays(tmp_path: Path) -> None:
    data = _good()
    ds = load_npz_dataset(_npz(tmp_path, **data), seed=1, val_fraction=0.25)
    assert (ds.meta.num_features, ds.meta.num_classes, ds.meta.input_shape) == (6, 4, (3, 2))
    assert (ds.meta.train_size, ds.meta.val_size, ds.meta.val_fraction) == (30, 10, 0.25)
    assert torch.equal(ds.y_val, load_npz_dataset(tmp_path / "data.npz", seed=1, val_fraction=0.25).y_val)

    data["x_val"], data["y_val"] = data["x"][:5], data["y"][:5]
    ds = load_npz_dataset(_npz(tmp_path, **data), num_classes=6)
    assert (ds.meta.train_size, ds.meta.val_size, ds.meta.num_classes, ds.meta.val_fraction) == (40, 5, 6, None)


def _with(**changes: Any) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        data = _good()
        data.update(changes)
        return {k: v for k, v in data.items() if v is not None}

    return make


BAD_FILES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("no y", _with(y=None), "missing_key"),
    ("x_val alone", _with(x_val=np.zeros((4, 3, 2))), "missing_key"),
    ("typo key", _with(X_val=np.zeros((4, 3, 2))), "unexpected_key"),
    ("string features", _with(x=np.array([["a"] * 6] * 40)), "bad_dtype"),
    ("float labels", _with(y=np.linspace(0, 3, 40)), "bad_dtype"),
    ("1-d features", _with(x=np.zeros(40)), "bad_shape"),
    ("2-d labels", _with(y=np.zeros((40, 1), dtype=np.int64)), "bad_shape"),
    ("length mismatch", _with(y=np.arange(39) % 4), "bad_shape"),
    ("val feature shape", _with(x_val=np.zeros((4, 6)), y_val=np.zeros(4, dtype=np.int64)), "bad_shape"),
    ("empty", _with(x=np.zeros((0, 6)), y=np.zeros(0, dtype=np.int64)), "empty"),
    ("nan", _with(x=np.where(np.arange(240).reshape(40, 6) == 7, np.nan, 1.0)), "non_finite"),
    ("inf in val", _with(x_val=np.full((4, 3, 2), np.inf), y_val=np.zeros(4, dtype=np.int64)), "non_finite"),
    ("negative label", _with(y=np.arange(40) % 4 - 1), "label_range"),
    ("val label unseen", _with(x_val=np.zeros((2, 3, 2)), y_val=np.array([0, 9])), "label_range"),
    ("one class", _with(y=np.zeros(40, dtype=np.int64)), "label_range"),
    ("singleton class", _with(y=np.concatenate([np.arange(39) % 3, [3]])), "split"),
]


@pytest.mark.parametrize(("make", "reason"), [(m, r) for _, m, r in BAD_FILES], ids=[i for i, _, _ in BAD_FILES])
def test_bad_npz_files_are_refused_with_a_reason(tmp_path: Path, make: Callable[[], dict[str, Any]],
                                                 reason: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(_npz(tmp_path, **make()))
    assert info.value.reason == reason


def test_unreadable_missing_and_pickled_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(tmp_path / "absent.npz")
    assert info.value.reason == "missing_file"
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip archive")
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(junk)
    assert info.value.reason == "unreadable"
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(pickled)
    assert info.value.reason == "bad_dtype"
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(_npz(tmp_path, **_good()), num_classes=3)  # labels go up to 3
    assert info.value.reason == "label_range"
