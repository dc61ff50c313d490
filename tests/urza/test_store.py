"""Content-addressed artifact files: layout, idempotent atomic writes, verified reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.urza.artifact import checksum
from esper.urza.errors import ArtifactFormatError, ChecksumMismatchError, MissingArtifactError
from esper.urza.store import ArtifactStore


def test_put_get_layout_and_idempotence(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "a")
    digest = checksum(b"hello")
    ref = store.put(b"hello")
    assert ref == f"sha256:{digest}"
    assert store.path_for(ref) == tmp_path / "a" / digest[:2] / digest
    assert store.put(b"hello") == ref and store.get(ref, digest) == b"hello"
    assert [p.name for p in (tmp_path / "a" / digest[:2]).iterdir()] == [digest]  # no temp files left


def test_missing_and_tampered_files(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = store.put(b"payload")
    digest = checksum(b"payload")
    store.path_for(ref).write_bytes(b"paYload")
    with pytest.raises(ChecksumMismatchError):
        store.get(ref, digest)
    assert store.put(b"payload") == ref and store.get(ref, digest) == b"payload"  # a put repairs it
    with pytest.raises(ChecksumMismatchError):
        store.get(ref, checksum(b"other"))  # ref and checksum disagree
    store.path_for(ref).unlink()
    with pytest.raises(MissingArtifactError):
        store.get(ref, digest)
    with pytest.raises(ArtifactFormatError):
        store.get("sha256:../../x", digest)


def test_verify_rehashes_after_any_write_even_with_mtime_restored(tmp_path: Path) -> None:
    import os

    store = ArtifactStore(tmp_path)
    data = b"artifact bytes" * 100
    ref = store.put(data)
    store.verify(ref, checksum(data))
    store.verify(ref, checksum(data))  # unchanged: served from the verified set
    path = store.path_for(ref)
    st = path.stat()
    os.chmod(path, 0o644)
    path.write_bytes(b"X" + data[1:])  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime moved on
    with pytest.raises(ChecksumMismatchError):
        store.verify(ref, checksum(data))
    path.unlink()
    with pytest.raises(MissingArtifactError):
        store.verify(ref, checksum(data))
