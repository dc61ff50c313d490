"""The catalogue: kernels, blueprints, extras, restarts and a writer killed mid-write (real SQLite files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.karn.template import SlotShape
from esper.leyline import pb
from esper.urza.artifact import checksum, guard_digest, load_artifact, pack_artifact, rebuild
from esper.urza.errors import (
    ArtifactFormatError,
    ChecksumMismatchError,
    MissingArtifactError,
    UnknownBlueprintError,
    UnknownKernelError,
)
from esper.urza.library import UrzaLibrary
from esper.urza.records import catalog_update
from tests.urza._templates import CONV, MLP, descriptor, graph, lookup, trained_module

ROOT = Path(__file__).resolve().parents[2]
V16 = SlotShape(16)


def _lib(tmp_path: Path) -> UrzaLibrary:
    return UrzaLibrary(tmp_path / "catalog.db", tmp_path / "artifacts")


def _artifact(slot: SlotShape = V16, *, seed: int = 0) -> bytes:
    params = MLP.resolve_params({"hidden": 8})
    return pack_artifact("TST001", slot, params, trained_module(MLP, slot, params, seed=seed).state_dict())


def _bsds(blueprint_id: str = "TST001") -> pb.BSDS:
    b = pb.BSDS(version=1, blueprint_id=blueprint_id, risk_score=0.25, hazard_band=pb.HAZARD_BAND_MEDIUM,
                handling_class=pb.HANDLING_CLASS_STANDARD, recommendation="ok")
    b.issued_at.FromMilliseconds(1_700_000_000_123)
    return b


def test_register_fetch_and_rebuild(tmp_path: Path) -> None:
    with _lib(tmp_path) as lib:
        data = _artifact()
        rec = lib.register_kernel("TST001", V16, data, compile_ms=12.5, prewarm_p50_ms=0.25, prewarm_p95_ms=0.5)
        assert rec.kernel_id == "TST001@v16" and rec.checksum == checksum(data)
        assert rec.artifact_ref == f"sha256:{rec.checksum}"
        assert rec.guard_digest == guard_digest("TST001", V16, MLP.resolve_params({"hidden": 8}), torch.__version__)
        assert lib.kernel("TST001@v16") == rec == lib.kernel("TST001")
        got, raw = lib.fetch_artifact("TST001@v16")
        assert got == rec and raw == data
        module = rebuild(lib.store.load(rec.artifact_ref, rec.checksum, expected_guard_digest=rec.guard_digest),
                         templates=lookup)
        assert set(module.state_dict()) == set(load_artifact(data, rec.checksum).state_dict)
        update = catalog_update(rec)
        assert (update.blueprint_id, update.checksum, update.compile_ms) == ("TST001@v16", rec.checksum, 12.5)
        with pytest.raises(ArtifactFormatError):
            lib.store.load(rec.artifact_ref, rec.checksum, expected_guard_digest="0" * 64)


def test_plain_blueprint_id_resolves_to_the_latest_kernel(tmp_path: Path) -> None:
    with _lib(tmp_path) as lib:
        lib.register_kernel("TST001", SlotShape(8), _artifact(SlotShape(8)), compile_ms=1, prewarm_p50_ms=1,
                            prewarm_p95_ms=1)
        lib.register_kernel("TST001", V16, _artifact(), compile_ms=1, prewarm_p50_ms=1, prewarm_p95_ms=1)
        assert lib.kernel("TST001").kernel_id == "TST001@v16"
        again = lib.register_kernel("TST001", "v8", _artifact(SlotShape(8), seed=3), compile_ms=2,
                                    prewarm_p50_ms=1, prewarm_p95_ms=1)  # recompiled: replaces its row
        assert lib.kernel("TST001") == again and lib.kernel("TST001@v8") == again
        assert [k.kernel_id for k in lib.kernels()] == ["TST001@v16", "TST001@v8"]
        assert lib.kernels("nope") == []


def test_register_refuses_bytes_that_are_not_this_kernels_artifact(tmp_path: Path) -> None:
    with _lib(tmp_path) as lib:
        with pytest.raises(ArtifactFormatError, match="TST001@v16"):
            lib.register_kernel("TST002", V16, _artifact(), compile_ms=1, prewarm_p50_ms=1, prewarm_p95_ms=1)
        with pytest.raises(ArtifactFormatError):
            lib.register_kernel("TST001", "v8", _artifact(), compile_ms=1, prewarm_p50_ms=1, prewarm_p95_ms=1)
        with pytest.raises(ArtifactFormatError):
            lib.register_kernel("TST001", V16, torch_module_pickle(), compile_ms=1, prewarm_p50_ms=1,
                                prewarm_p95_ms=1)
        with pytest.raises(ValueError, match="compile_ms"):
            lib.register_kernel("TST001", V16, _artifact(), compile_ms=float("nan"), prewarm_p50_ms=1,
                                prewarm_p95_ms=1)
        assert lib.kernels() == []
        assert [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []  # refused bytes never stored


def torch_module_pickle() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(torch.nn.Linear(16, 16), buf)
    return buf.getvalue()


def test_fetch_errors_are_typed(tmp_path: Path) -> None:
    with _lib(tmp_path) as lib:
        with pytest.raises(UnknownKernelError) as unknown:
            lib.fetch_artifact("TST404")
        assert unknown.value.reason == "artifact_not_found"
        rec = lib.register_kernel("TST001", V16, _artifact(), compile_ms=1, prewarm_p50_ms=1, prewarm_p95_ms=1)
        path = lib.store.path_for(rec.artifact_ref)
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(ChecksumMismatchError) as bad:
            lib.fetch_artifact("TST001")
        assert bad.value.reason == "checksum_mismatch"
        path.unlink()
        with pytest.raises(MissingArtifactError) as missing:
            lib.fetch_artifact("TST001@v16")
        assert missing.value.reason == "missing_artifact"


def test_blueprints_extras_and_catalog_entries(tmp_path: Path) -> None:
    with _lib(tmp_path) as lib:
        lib.upsert_blueprint(descriptor(MLP), graph())
        lib.upsert_blueprint(descriptor(CONV))
        lib.set_bsds(_bsds())
        lib.set_extra("TST002", "notes", {"owner": "karn", "n": [1, 2]})
        assert [d.blueprint_id for d in lib.blueprints()] == ["TST001", "TST002"]
        [plain] = lib.catalog_entries(["TST001"])
        assert plain.descriptor == descriptor(MLP) and plain.bsds == _bsds() and not plain.HasField("graph")
        entries = lib.catalog_entries(include_graph=True)
        assert [e.descriptor.blueprint_id for e in entries] == ["TST001", "TST002"]
        assert entries[0].graph == graph()
        assert entries[0].graph.layers[0].HasField("depth")  # optional 0.0 keeps its presence
        assert not entries[1].HasField("graph") and not entries[1].HasField("bsds")
        assert lib.catalog_entries(["TST404", "TST002", "TST002"])[0].descriptor.blueprint_id == "TST002"
        assert lib.extras("TST002") == {"notes": {"owner": "karn", "n": [1, 2]}}
        lib.upsert_blueprint(descriptor(MLP))  # a new descriptor keeps graph and bsds
        assert set(lib.extras("TST001")) == {"graph", "bsds"}
        with pytest.raises(UnknownBlueprintError):
            lib.set_bsds(_bsds("TST404"))
        with pytest.raises(ValueError):
            lib.set_bsds(pb.BSDS())


def test_catalogue_survives_restart(tmp_path: Path) -> None:
    lib = _lib(tmp_path)
    lib.upsert_blueprint(descriptor(MLP), graph())
    lib.set_bsds(_bsds())
    rec = lib.register_kernel("TST001", V16, _artifact(), compile_ms=3, prewarm_p50_ms=0.1, prewarm_p95_ms=0.2)
    before = (lib.catalog_entries(include_graph=True), lib.kernels(), lib.extras("TST001"))
    lib.close()
    with _lib(tmp_path) as again:
        assert (again.catalog_entries(include_graph=True), again.kernels(), again.extras("TST001")) == before
        assert again.fetch_artifact(rec.kernel_id)[1] == _artifact()


def test_two_libraries_on_the_same_files(tmp_path: Path) -> None:
    with _lib(tmp_path) as reader, _lib(tmp_path) as writer:
        writer.upsert_blueprint(descriptor(MLP))
        rec = writer.register_kernel("TST001", V16, _artifact(), compile_ms=1, prewarm_p50_ms=1, prewarm_p95_ms=1)
        assert reader.kernel("TST001") == rec and reader.blueprints() == [descriptor(MLP)]


def test_every_committed_kernel_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    db, root = tmp_path / "catalog.db", tmp_path / "artifacts"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("kernel_writer.py")), str(db), str(root)],
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    committed: list[str] = []
    for line in proc.stdout:
        committed.append(line.strip())
        if len(committed) >= 40:
            break
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it keeps writing until the signal lands
    proc.wait(timeout=10)
    proc.stdout.close()
    assert len(committed) >= 40
    with UrzaLibrary(db, root) as lib:  # reopen: WAL recovery
        stored = {k.kernel_id: k for k in lib.kernels("BPK")}
        missing = [k for k in committed if k not in stored]
        assert not missing, f"{len(missing)} committed kernels lost, e.g. {missing[:3]}"
        for kid, rec in stored.items():  # every row, committed-and-reported or not, has an intact artifact
            record, data = lib.fetch_artifact(kid)
            artifact = load_artifact(data, record.checksum)
            assert artifact.kernel_id == kid and artifact.guard_digest == rec.guard_digest
            assert artifact.state_dict["w"].shape == (64, artifact.slot_shape.channels)
