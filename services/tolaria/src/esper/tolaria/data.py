"""Training data: scikit-learn's bundled digits by default, or a user's `.npz`; pure given a seed.

Digits (1797 8x8 images, 10 classes, shipped inside scikit-learn: no download) is split into a
stratified train/validation pair with `random_state=seed`. A `.npz` holds `x` and `y` and optionally
`x_val` and `y_val`; without the latter it is split like digits. Every problem with a file is a
`DatasetError` whose `reason` names it (see `DatasetErrorReason`), raised before any tensor is built.

Features are standardised with the *training* split's per-feature mean and std (constant features
keep std 1), and those statistics travel with the dataset so new inputs can be scaled the same way.
The data is small, so batches come from a plain index permutation (`iter_batches`), no DataLoader.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

from esper.core.errors import EsperError

__all__ = [
    "NPZ_KEYS",
    "Dataset",
    "DatasetError",
    "DatasetErrorReason",
    "DatasetMeta",
    "epoch_generator",
    "iter_batches",
    "load_dataset",
    "load_digits_dataset",
    "load_npz_dataset",
    "num_batches",
]

DatasetErrorReason = Literal[
    "missing_file",  # the path does not exist or is not a file
    "unreadable",  # not an .npz archive numpy can open
    "missing_key",  # x or y absent, or only one of x_val / y_val given
    "unexpected_key",  # a key other than x, y, x_val, y_val (a typo would otherwise be ignored)
    "bad_dtype",  # features not real numbers, labels not integers, object arrays
    "bad_shape",  # x not (N, ...), y not (N,), lengths differ, x_val features differ from x
    "empty",  # no samples
    "non_finite",  # NaN or inf in features
    "label_range",  # a label < 0 or >= num_classes, or fewer than two classes
    "split",  # no stratified split possible (a class with a single sample, validation too small)
]

NPZ_KEYS = frozenset({"x", "y", "x_val", "y_val"})


class DatasetError(EsperError, ValueError):
    """A dataset that cannot be used as given; `reason` is one of `DatasetErrorReason`."""

    def __init__(self, reason: DatasetErrorReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DatasetErrorReason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[DatasetError], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True, slots=True)
class DatasetMeta:
    name: str  # "digits" or the .npz file name
    source: Literal["digits", "npz"]
    num_features: int  # product of input_shape
    num_classes: int
    input_shape: tuple[int, ...]  # one sample's shape (digits: (64,), the 8x8 image flattened)
    train_size: int
    val_size: int
    seed: int
    val_fraction: float | None  # None when the file brought its own validation split


@dataclass(frozen=True, slots=True)
class Dataset:
    """Standardised float32 features, int64 labels, and the training statistics used to scale them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    feature_mean: torch.Tensor  # shape input_shape
    feature_std: torch.Tensor
    meta: DatasetMeta

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on `device` (it is small: move it once, not per batch)."""
        return Dataset(self.x_train.to(device), self.y_train.to(device), self.x_val.to(device),
                       self.y_val.to(device), self.feature_mean.to(device), self.feature_std.to(device), self.meta)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Scale raw inputs with the training statistics."""
        return (x - self.feature_mean) / self.feature_std


FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _split(x: FloatArray, y: IntArray, *, seed: int, val_fraction: float
           ) -> tuple[FloatArray, IntArray, FloatArray, IntArray]:
    _check_fraction(val_fraction)
    try:
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, random_state=seed, shuffle=True,
                                                  stratify=y)
    except ValueError as e:  # a class with one member, or fewer validation samples than classes
        raise DatasetError("split", f"no stratified {val_fraction:.0%} validation split: {e}") from e
    return x_tr, y_tr, x_va, y_va


def _build(name: str, source: Literal["digits", "npz"], x_tr: FloatArray, y_tr: IntArray, x_va: FloatArray,
           y_va: IntArray, *, num_classes: int, seed: int, val_fraction: float | None, standardise: bool) -> Dataset:
    x_train = torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32))
    x_val = torch.from_numpy(np.ascontiguousarray(x_va, dtype=np.float32))
    if standardise:
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant features (digits' blank border)
    else:
        mean, std = torch.zeros(x_train.shape[1:]), torch.ones(x_train.shape[1:])
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    meta = DatasetMeta(name=name, source=source, num_features=math.prod(input_shape), num_classes=num_classes,
                       input_shape=input_shape, train_size=len(x_train), val_size=len(x_val), seed=seed,
                       val_fraction=val_fraction)
    return Dataset(
        x_train=(x_train - mean) / std,
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)),
        x_val=(x_val - mean) / std,
        y_val=torch.from_numpy(np.ascontiguousarray(y_va, dtype=np.int64)),
        feature_mean=mean, feature_std=std, meta=meta,
    )


def load_digits_dataset(*, seed: int = 0, val_fraction: float = 0.2, standardise: bool = True) -> Dataset:
    """scikit-learn's digits, stratified split by `seed`: 64 features, 10 classes."""
    bunch = load_digits()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    x_tr, y_tr, x_va, y_va = _split(x, y, seed=seed, val_fraction=val_fraction)
    return _build("digits", "digits", x_tr, y_tr, x_va, y_va, num_classes=10, seed=seed,
                  val_fraction=val_fraction, standardise=standardise)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError("missing_file", f"{path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DatasetError("unreadable", f"{path} is a single .npy array, not an .npz archive")
            keys = set(archive.files)
            unexpected = sorted(keys - NPZ_KEYS)
            if unexpected:
                raise DatasetError("unexpected_key", f"{path}: unexpected keys {unexpected}; "
                                                     f"allowed {sorted(NPZ_KEYS)}")
            for required in ("x", "y"):
                if required not in keys:
                    raise DatasetError("missing_key", f"{path}: no {required!r} array")
            if ("x_val" in keys) != ("y_val" in keys):
                raise DatasetError("missing_key", f"{path}: x_val and y_val must be given together")
            try:
                return {k: archive[k] for k in sorted(keys)}
            except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
                raise DatasetError("bad_dtype", f"{path}: {e}") from e
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError("unreadable", f"{path}: {type(e).__name__}: {e}") from e


def _check_pair(name: str, x: np.ndarray, y: np.ndarray) -> None:
    xs, ys = ("x", "y") if name == "train" else ("x_val", "y_val")
    if x.dtype.kind not in "fiu":
        raise DatasetError("bad_dtype", f"{xs} must hold real numbers, got dtype {x.dtype}")
    if y.dtype.kind not in "iu":
        raise DatasetError("bad_dtype", f"{ys} must hold integer class labels, got dtype {y.dtype}")
    if x.ndim < 2:
        raise DatasetError("bad_shape", f"{xs} must be (samples, features...), got shape {x.shape}")
    if y.ndim != 1:
        raise DatasetError("bad_shape", f"{ys} must be (samples,), got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError("bad_shape", f"{xs} has {len(x)} samples, {ys} has {len(y)}")
    if len(x) == 0 or math.prod(x.shape[1:]) == 0:
        raise DatasetError("empty", f"{xs} has no samples or no features (shape {x.shape})")
    if not np.isfinite(x).all():
        raise DatasetError("non_finite", f"{xs} contains {int((~np.isfinite(x)).sum())} NaN/inf values")


def _check_labels(name: str, y: np.ndarray, num_classes: int) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DatasetError("label_range", f"{name} labels span [{lo}, {hi}], allowed [0, {num_classes - 1}]")


def load_npz_dataset(path: Path | str, *, seed: int = 0, val_fraction: float = 0.2, num_classes: int | None = None,
                     standardise: bool = True) -> Dataset:
    """A user's `.npz` (keys `x`, `y`, optional `x_val`, `y_val`), validated; see `DatasetErrorReason`.

    `num_classes` defaults to max(y) + 1 over the training labels; validation labels must fit it.
    """
    path = Path(path)
    arrays = _read_npz(path)
    x, y = arrays["x"], arrays["y"]
    _check_pair("train", x, y)
    has_val = "x_val" in arrays
    if has_val:
        x_va, y_va = arrays["x_val"], arrays["y_val"]
        _check_pair("val", x_va, y_va)
        if x_va.shape[1:] != x.shape[1:]:
            raise DatasetError("bad_shape", f"x_val samples are {x_va.shape[1:]}, x samples are {x.shape[1:]}")
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if classes < 2:
        raise DatasetError("label_range", f"need at least two classes, got {classes}")
    _check_labels("y", y, classes)
    if has_val:
        _check_labels("y_val", y_va, classes)
        x_tr, y_tr = x, y
        fraction: float | None = None
    else:
        x_tr, y_tr, x_va, y_va = _split(x, y, seed=seed, val_fraction=val_fraction)
        fraction = val_fraction
    return _build(path.name, "npz", x_tr, y_tr, x_va, y_va, num_classes=classes, seed=seed,
                  val_fraction=fraction, standardise=standardise)


def load_dataset(path: Path | str | None = None, *, seed: int = 0, val_fraction: float = 0.2) -> Dataset:
    """Digits when `path` is None (TOLARIA_DATASET_PATH unset), else the `.npz` at `path`."""
    if path is None:
        return load_digits_dataset(seed=seed, val_fraction=val_fraction)
    return load_npz_dataset(path, seed=seed, val_fraction=val_fraction)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch's shuffle: same (seed, epoch), same batches."""
    gen = torch.Generator()
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def iter_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator: torch.Generator | None = None,
                 shuffle: bool = True, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches; shuffled with `generator` (required when shuffling: no hidden RNG)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples, y has {len(y)}")
    count = num_batches(len(x), batch_size, drop_last=drop_last)
    if shuffle:
        if generator is None:
            raise ValueError("shuffling needs an explicit generator (see epoch_generator)")
        order = torch.randperm(len(x), generator=generator).to(x.device)
    else:
        order = torch.arange(len(x), device=x.device)
    for b in range(count):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield x.index_select(0, idx), y.index_select(0, idx.to(y.device))
