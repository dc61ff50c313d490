"""Data: files that used to pass validation or escape it untyped are a `DatasetError` with a reason.

Features beyond float32 (the model's dtype), degenerate or huge label sets, and malformed archives:
a bare .npy, members that are not .npy, a corrupt deflate stream, a header declaring more data than
the member holds, an encrypted member.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.lib import format as npf

from esper.tolaria.data import MAX_CLASSES, DatasetError, load_npz_dataset


def _npz(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _x(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 6))


def _reason(path: Path, **kwargs: Any) -> str:
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path, **kwargs)
    return info.value.reason


# -- features -------------------------------------------------------------------------------------

def test_float64_features_beyond_float32_are_non_finite(tmp_path: Path) -> None:
    x = _x()
    x[3, 2] = 1e39  # finite in float64, inf once cast to float32 (then NaN after standardising)
    assert _reason(_npz(tmp_path, x=x, y=np.arange(40) % 4)) == "non_finite"
    x_val = _x(8)
    x_val[0, 0] = -1e39
    assert _reason(_npz(tmp_path, x=_x(), y=np.arange(40) % 4, x_val=x_val, y_val=np.arange(8) % 4)) == "non_finite"


def test_features_whose_float32_statistics_overflow_are_non_finite(tmp_path: Path) -> None:
    x = np.full((40, 2), 3e38, dtype=np.float32)  # every value fits float32; their mean's sum does not
    x[::2] = 2e38
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(_npz(tmp_path, x=x, y=np.arange(40) % 4))
    assert info.value.reason == "non_finite" and "overflows float32" in info.value.detail


def test_large_but_representable_features_still_load(tmp_path: Path) -> None:
    ds = load_npz_dataset(_npz(tmp_path, x=_x() * 1e37, y=np.arange(40) % 4))
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_val).all()


# -- labels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", [1, 7])
def test_a_single_distinct_label_is_not_two_classes(tmp_path: Path, label: int) -> None:
    path = _npz(tmp_path, x=_x(), y=np.full(40, label, dtype=np.int64))
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert info.value.reason == "label_range" and "single distinct label" in info.value.detail
    assert _reason(path, num_classes=10) == "label_range"


def test_num_classes_is_bounded(tmp_path: Path) -> None:
    y = np.arange(40) % 4
    y[-2:] = 2_000_000_000  # one stray label would otherwise size a 2e9-way output layer
    huge = _npz(tmp_path, "huge.npz", x=_x(), y=y, x_val=_x(8), y_val=np.arange(8) % 4)
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(huge)
    assert info.value.reason == "label_range" and str(MAX_CLASSES) in info.value.detail
    ok = _npz(tmp_path, "ok.npz", x=_x(), y=np.arange(40) % 4)
    assert _reason(ok, num_classes=MAX_CLASSES + 1) == "label_range"
    edge = _npz(tmp_path, "edge.npz", x=_x(4), y=np.array([0, MAX_CLASSES - 1] * 2), x_val=_x(2),
                y_val=np.array([0, 1]))
    assert load_npz_dataset(edge).meta.num_classes == MAX_CLASSES


# -- malformed archives ---------------------------------------------------------------------------

def _npy(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _unreadable(path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert info.value.reason == "unreadable", info.value
    return info.value.detail


def test_a_bare_npy_named_npz_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "array.npz"
    with path.open("wb") as fh:
        np.save(fh, np.zeros((4, 3)))
    assert "single .npy array" in _unreadable(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"x,y\n1,0\n")
    assert "pickle" not in _unreadable(junk)


def test_members_that_are_not_npy_arrays_are_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x", b"1,2,3\n4,5,6\n")
        z.writestr("y", b"0\n1\n")
    assert "not a .npy array" in _unreadable(path)


def test_a_header_declaring_more_data_than_the_member_holds_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "huge_header.npz"
    with zipfile.ZipFile(path, "w") as z:  # 73 TiB declared in a 100-byte member: numpy would allocate it
        z.writestr("x.npy", _npy((10**12, 10)))
        z.writestr("y.npy", _npy((4,)))
    assert "declares shape" in _unreadable(path)
    truncated = tmp_path / "truncated.npz"
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("x.npy", _npy((4, 3), b"\0" * 40))  # 96 bytes declared, 40 held
        z.writestr("y.npy", _npy((4,), b"\0" * 32))
    assert "holds 40 bytes" in _unreadable(truncated)


def test_a_corrupt_deflate_stream_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.npz"
    np.savez_compressed(path, x=_x(400), y=np.arange(400) % 4)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo("x.npy").header_offset
    name_len, extra_len = struct.unpack("<HH", raw[offset + 26:offset + 30])
    data = offset + 30 + name_len + extra_len
    raw[data:data + 2] = b"\xff\xff"  # an invalid deflate block type: zlib.error, not a CRC mismatch
    path.write_bytes(bytes(raw))
    assert "zlib.error" in _unreadable(path)


def test_an_encrypted_member_is_unreadable(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_x(), y=np.arange(40) % 4)
    raw = bytearray(path.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        start = raw.find(signature)
        while start >= 0:
            raw[start + flag_at] |= 0x1  # "encrypted": zipfile raises RuntimeError for want of a password
            start = raw.find(signature, start + 4)
    path.write_bytes(bytes(raw))
    assert "encrypted" in _unreadable(path)
