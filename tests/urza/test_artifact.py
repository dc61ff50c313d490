"""The artifact format: bit-exact round trips, weights-only loading, schema and guard checks."""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from esper.karn.template import SlotShape
from esper.urza.artifact import (
    artifact_ref,
    checksum,
    guard_digest,
    hex_of_ref,
    load_artifact,
    pack_artifact,
    rebuild,
)
from esper.urza.errors import ArtifactFormatError, ChecksumMismatchError
from esper.urza.store import ArtifactStore
from tests.urza._templates import CONV, MLP, lookup, trained_module

V16 = SlotShape(16)
PARAMS = {"hidden": 8.0, "dropout": 0.2}


def _bits(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    return t.dtype, tuple(t.shape), t.detach().cpu().contiguous().numpy().tobytes()


def test_round_trip_through_the_store_is_bit_exact(tmp_path: Path) -> None:
    for template, slot, params in ((MLP, V16, PARAMS), (CONV, SlotShape(4, 6, 6), {})):
        original = trained_module(template, slot, params, seed=7)
        data = pack_artifact(template.blueprint_id, slot, template.resolve_params(params), original.state_dict())
        store = ArtifactStore(tmp_path / "artifacts")
        ref = store.put(data)
        assert ref == artifact_ref(checksum(data)) and store.path_for(ref).read_bytes() == data
        artifact = load_artifact(store.get(ref, checksum(data)), checksum(data))
        assert artifact.blueprint_id == template.blueprint_id and artifact.slot == slot.as_key()
        assert artifact.torch_version == torch.__version__
        rebuilt = rebuild(artifact, templates=lookup).eval()
        want, got = original.state_dict(), rebuilt.state_dict()
        assert list(want) == list(got)
        for name in want:
            assert _bits(want[name]) == _bits(got[name]), name
        x = slot.example_input(5, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(original(x), rebuilt(x))


def test_packing_is_deterministic_and_stores_compact_cpu_tensors() -> None:
    base = torch.arange(100, dtype=torch.float32)
    view = base[10:14]  # a view of a bigger storage
    data = pack_artifact("BPX", SlotShape(4), {}, {"w": view, "t": base.reshape(10, 10).t()})
    assert data == pack_artifact("BPX", SlotShape(4), {}, {"w": view, "t": base.reshape(10, 10).t()})
    art = load_artifact(data, checksum(data))
    w = art.state_dict["w"]
    assert w.untyped_storage().nbytes() == 4 * 4 and torch.equal(w, view)
    assert art.state_dict["t"].is_contiguous() and art.state_dict["t"].device.type == "cpu"


def test_guard_digest_is_canonical_and_pins_every_field() -> None:
    g = guard_digest("BP1", SlotShape(8), {"a": 1.0, "b": 2.0}, "2.13.0")
    assert g == guard_digest("BP1", "v8", {"b": 2, "a": 1}, "2.13.0")  # key order, int vs float
    assert len({g, guard_digest("BP2", "v8", {"a": 1.0, "b": 2.0}, "2.13.0"),
                guard_digest("BP1", "v9", {"a": 1.0, "b": 2.0}, "2.13.0"),
                guard_digest("BP1", "v8", {"a": 1.5, "b": 2.0}, "2.13.0"),
                guard_digest("BP1", "v8", {"a": 1.0, "b": 2.0}, "2.14.0")}) == 5


def test_checksum_is_verified_before_anything_is_loaded() -> None:
    data = pack_artifact("BPX", SlotShape(4), {}, {"w": torch.ones(2)})
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(ChecksumMismatchError):
        load_artifact(bytes(tampered), checksum(data))
    with pytest.raises(ChecksumMismatchError):
        load_artifact(data, "0" * 64)


class _Exec:
    """Pickles as a call to builtins.exec: unpickling it runs `code`."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (self.code,))


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _doc(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {"format": 1, "blueprint_id": "BPX", "slot": "v4", "params": {},
                              "torch_version": "2.13.0", "guard_digest": guard_digest("BPX", "v4", {}, "2.13.0"),
                              "state_dict": {"w": torch.ones(2)}}
    doc.update(overrides)
    return doc


def test_a_pickled_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    for evil in (_Exec(code), _doc(state_dict={"w": _Exec(code)}), _doc(params={"a": _Exec(code)})):
        data = _torch_bytes(evil)
        with pytest.raises(ArtifactFormatError, match="weights-only"):
            load_artifact(data, checksum(data))
        assert not marker.exists()
    # The payload is real: an unrestricted load would have run it.
    torch.load(io.BytesIO(_torch_bytes(_Exec(code))), weights_only=False)
    assert marker.exists()


def test_a_pickled_module_is_refused() -> None:
    for obj in (nn.Linear(4, 4), _doc(state_dict={"w": nn.Linear(4, 4)}), {"module": nn.Sequential()}):
        data = _torch_bytes(obj)
        with pytest.raises(ArtifactFormatError):
            load_artifact(data, checksum(data))


@pytest.mark.parametrize("doc", [
    ["not", "a", "dict"],
    _doc(extra=1),
    _doc(format=2),
    _doc(format=True),
    _doc(blueprint_id=""),
    _doc(slot="q4"),
    _doc(params={"a": "1"}),
    _doc(params={"a": True}),
    _doc(state_dict={"w": 1.0}),
    _doc(guard_digest="0" * 64),
    _doc(torch_version="9.9"),  # the guard digest no longer matches
])
def test_schema_violations_are_artifact_format_errors(doc: object) -> None:
    data = _torch_bytes(doc)
    with pytest.raises(ArtifactFormatError):
        load_artifact(data, checksum(data))


def test_junk_bytes_are_artifact_format_errors() -> None:
    for junk in (b"", b"not a zip file", b"PK\x03\x04" + b"\0" * 64):
        with pytest.raises(ArtifactFormatError):
            load_artifact(junk, checksum(junk))


def test_a_state_dict_that_does_not_fit_the_template_is_refused() -> None:
    module = trained_module(MLP, V16, PARAMS)
    state = module.state_dict()
    wrong_shape = pack_artifact("TST001", V16, MLP.resolve_params({"hidden": 9}), state)
    partial = {k: v for k, v in state.items() if k != "0.bias"}
    missing = pack_artifact("TST001", V16, MLP.resolve_params(PARAMS), partial)
    unknown = pack_artifact("TST404", V16, {}, state)
    bad_slot = pack_artifact("TST001", SlotShape(4, 2, 2), MLP.resolve_params(PARAMS), state)
    for data in (wrong_shape, missing, unknown, bad_slot):
        with pytest.raises(ArtifactFormatError, match="cannot rebuild"):
            rebuild(load_artifact(data, checksum(data)), templates=lookup)


def test_rebuild_leaves_the_callers_rng_alone() -> None:
    data = pack_artifact("TST001", V16, MLP.resolve_params(PARAMS), trained_module(MLP, V16, PARAMS).state_dict())
    art = load_artifact(data, checksum(data))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rebuild(art, templates=lookup)
    assert torch.equal(torch.rand(3), expected)


def test_refs_are_strict() -> None:
    digest = checksum(b"x")
    assert hex_of_ref(artifact_ref(digest)) == digest
    for bad in ("sha256:../../etc/passwd", "md5:" + digest, "sha256:" + digest.upper(), digest):
        with pytest.raises(ArtifactFormatError):
            hex_of_ref(bad)
    with pytest.raises(ArtifactFormatError):
        artifact_ref("../x")
