"""esper.core.files: atomic replacement, no temp file left behind, failures leave the old content."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.core.files import write_bytes_atomic


def test_replaces_atomically_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_bytes_atomic(target, b"one")
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
