"""Training data: scikit-learn's bundled digits by default, or a user's `.npz`; pure given a seed.

Digits (1797 8x8 images, 10 classes, shipped inside scikit-learn: no download) is split into a
stratified train/validation pair with `random_state=seed`. A `.npz` holds `x` and `y` and optionally
`x_val` and `y_val`; without the latter it is split like digits. Every problem with a file is a
`DatasetError` whose `reason` names it (see `DatasetErrorReason`), raised before a `Dataset` exists.

Features are standardised with the *training* split's per-feature mean and std (constant features
keep std 1), and those statistics travel with the dataset so new inputs can be scaled the same way.
The data is small, so batches come from a plain index permutation (`iter_batches`), no DataLoader.
"""

from __future__ import annotations

import lzma
import math
import zipfile
import zlib
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
    "MAX_CLASSES",
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
    "unreadable",  # not an .npz archive of .npy arrays numpy can read (corrupt, truncated, a bare .npy)
    "missing_key",  # x or y absent, or only one of x_val / y_val given
    "unexpected_key",  # a key other than x, y, x_val, y_val (a typo would otherwise be ignored)
    "bad_dtype",  # features not real numbers, labels not integers, object arrays
    "bad_shape",  # x not (N, ...), y not (N,), lengths differ, x_val features differ from x
    "empty",  # no samples
    "non_finite",  # NaN or inf in features, or values that overflow float32 (as stored or once standardised)
    "label_range",  # a label < 0 or >= num_classes, fewer than two distinct labels, over MAX_CLASSES classes
    "split",  # no stratified split possible (a class with a single sample, validation too small)
]

NPZ_KEYS = frozenset({"x", "y", "x_val", "y_val"})

MAX_CLASSES = 65_536
"""Most classes a dataset may have: num_classes = max(y) + 1 sizes the output layer, so one stray huge
label would otherwise ask for a billion-way head and die in torch's allocator instead of here."""

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive (as np.load checks)
_UNREADABLE_ERRORS = (OSError, ValueError, EOFError, MemoryError, NotImplementedError, zipfile.BadZipFile, zlib.error,
                      lzma.LZMAError)
"""What a corrupt, truncated or odd archive raises while numpy reads it (MemoryError: a header that
declares more data than any machine holds)."""


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
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    for label, t in (("training mean", mean), ("training std", std), ("standardised x", x_train),
                     ("standardised validation x", x_val)):
        if not torch.isfinite(t).all():  # e.g. a float32 mean of values near 3e38 overflows
            raise DatasetError("non_finite", f"{name}: {label} overflows float32; rescale the features")
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    meta = DatasetMeta(name=name, source=source, num_features=math.prod(input_shape), num_classes=num_classes,
                       input_shape=input_shape, train_size=len(x_train), val_size=len(x_val), seed=seed,
                       val_fraction=val_fraction)
    return Dataset(
        x_train=x_train,
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)),
        x_val=x_val,
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


def _member_fits(zf: zipfile.ZipFile, key: str) -> str | None:
    """Why `key`'s .npy header cannot be right (None if it can): checked before numpy allocates its shape."""
    name = f"{key}.npy" if f"{key}.npy" in zf.namelist() else key
    info = zf.getinfo(name)
    if info.flag_bits & 0x1:  # zipfile would raise RuntimeError for want of a password
        return f"member {name!r} is encrypted"
    with zf.open(info) as fh:
        if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            return f"member {name!r} is not a .npy array"
        fh.seek(0)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            return None  # another .npy version: numpy validates it (and a MemoryError is caught)
        held = info.file_size - fh.tell()
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and declared > held:  # object arrays: refused as bad_dtype when read
        return f"member {name!r} declares shape {shape} of {dtype} ({declared} bytes) but holds {held} bytes"
    return None


def _read_members(path: Path, archive: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    """The archive's arrays, by key, each header checked before numpy allocates what it declares."""
    keys = set(archive.files)
    unexpected = sorted(keys - NPZ_KEYS)
    if unexpected:
        raise DatasetError("unexpected_key", f"{path}: unexpected keys {unexpected}; allowed {sorted(NPZ_KEYS)}")
    for required in ("x", "y"):
        if required not in keys:
            raise DatasetError("missing_key", f"{path}: no {required!r} array")
    if ("x_val" in keys) != ("y_val" in keys):
        raise DatasetError("missing_key", f"{path}: x_val and y_val must be given together")
    if archive.zip is None:  # only after close
        raise DatasetError("unreadable", f"{path}: archive closed")
    arrays: dict[str, np.ndarray] = {}
    for k in sorted(keys):
        problem = _member_fits(archive.zip, k)
        if problem is not None:
            raise DatasetError("unreadable", f"{path}: {problem}")
        try:
            value = archive[k]
        except ValueError as e:
            if "allow_pickle" not in str(e):
                raise  # truncated data and the like: unreadable
            raise DatasetError("bad_dtype", f"{path}: {k}: {e}") from e
        if not isinstance(value, np.ndarray):  # a member numpy hands back as raw bytes
            raise DatasetError("unreadable", f"{path}: member {k!r} is not a .npy array")
        arrays[k] = value
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError("missing_file", f"{path} does not exist or is not a file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
        if magic == _NPY_MAGIC:  # np.load would read the whole array first
            raise DatasetError("unreadable", f"{path} is a single .npy array, not an .npz archive")
        if not magic.startswith(_ZIP_MAGICS):  # np.load would try it as a pickle and blame allow_pickle
            raise DatasetError("unreadable", f"{path} is not an .npz (zip) archive")
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError("unreadable", f"{path} is not an .npz archive")
        with loaded as archive:
            return _read_members(path, archive)
    except DatasetError:
        raise
    except _UNREADABLE_ERRORS as e:
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise DatasetError("unreadable", f"{path}: {kind}: {e}") from e


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
    with np.errstate(over="ignore"):  # the model trains in float32: 1e39 would become inf there
        overflow = int((~np.isfinite(x.astype(np.float32))).sum())
    if overflow:
        raise DatasetError("non_finite", f"{xs} has {overflow} values beyond float32's range "
                                         f"(|x| > {float(np.finfo(np.float32).max):.3g})")


def _check_labels(name: str, y: np.ndarray, num_classes: int) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DatasetError("label_range", f"{name} labels span [{lo}, {hi}], allowed [0, {num_classes - 1}]")


def _num_classes(y: np.ndarray, num_classes: int | None) -> int:
    """max(y) + 1 unless given; at least two distinct training labels and at most MAX_CLASSES classes."""
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DatasetError("label_range", f"y labels span [{lo}, {hi}]; labels must be >= 0")
    if lo == hi:  # max(y) + 1 counts classes that never occur: a lone label 7 is not 8 classes
        raise DatasetError("label_range", f"y holds a single distinct label ({lo}); need at least two classes")
    classes = hi + 1 if num_classes is None else num_classes
    if not 2 <= classes <= MAX_CLASSES:
        raise DatasetError("label_range", f"{classes} classes (y labels span [{lo}, {hi}]); "
                                          f"allowed 2 to {MAX_CLASSES}")
    return classes


def load_npz_dataset(path: Path | str, *, seed: int = 0, val_fraction: float = 0.2, num_classes: int | None = None,
                     standardise: bool = True) -> Dataset:
    """A user's `.npz` (keys `x`, `y`, optional `x_val`, `y_val`), validated; see `DatasetErrorReason`.

    `num_classes` defaults to max(y) + 1 over the training labels (at most `MAX_CLASSES`); validation
    labels must fit it.
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
    classes = _num_classes(y, num_classes)
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
