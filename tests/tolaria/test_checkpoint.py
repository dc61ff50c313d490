"""Checkpoints: bit-exact round trip, every kind of tamper refused, retention, kill -9 durability."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.leyline import SigningKeys
from esper.tolaria.checkpoint import (
    POINTER_FILE,
    CheckpointError,
    CheckpointStore,
    encode_checkpoint,
    read_checkpoint,
)
from esper.tolaria.state import StateMismatchError
from tests.tolaria._helpers import assert_same, assert_state_equal, make_model, make_optimizer, train_steps

ROOT = Path(__file__).resolve().parents[2]


def _trained(kind: str = "adam", steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = make_optimizer(model, kind)
    train_steps(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_round_trip_is_bit_exact_including_optimizer_state(tmp_path: Path, kind: str) -> None:
    model, opt = _trained(kind)
    store = CheckpointStore(tmp_path, run_id="run-a")
    info = store.save_training(model, opt, epoch=2, step=17, extra={"seeds": {"hidden1": "BP001"}, "alpha": 0.5})
    assert (info.epoch, info.step) == (2, 17) and info.file.startswith("ckpt-s0000000017-e000002-")

    fresh, fresh_opt = make_model(seed=99), None
    fresh_opt = make_optimizer(fresh, kind)
    ckpt = store.restore_latest(fresh, fresh_opt)
    assert ckpt is not None and ckpt.run_id == "run-a" and ckpt.info == info
    assert ckpt.extra == {"seeds": {"hidden1": "BP001"}, "alpha": 0.5}
    assert_state_equal(model, opt, fresh, fresh_opt)
    # training on from either gives the same weights: the optimizer state really came back
    train_steps(model, opt, 2, seed=5)
    train_steps(fresh, fresh_opt, 2, seed=5)
    assert_state_equal(model, opt, fresh, fresh_opt)


def test_nothing_saved_means_none_and_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ck")
    assert store.load_latest() is None and store.history() == []
    with pytest.raises(CheckpointError) as info:
        store.load_at_or_before(10)
    assert info.value.reason == "no_checkpoint"


def test_retention_keeps_the_last_k_and_cleans_stale_temp_files(tmp_path: Path) -> None:
    model, opt = _trained()
    store = CheckpointStore(tmp_path, keep=2)
    (tmp_path / ".ckpt-s0000000001-e000000-000000000000.pt.123.456.tmp").write_bytes(b"torn")
    infos = [store.save_training(model, opt, epoch=0, step=s) for s in (10, 20, 30)]
    assert [h.step for h in store.history()] == [30, 20]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([POINTER_FILE, *(f"{i.file}{s}" for i in infos[1:] for s in ("", ".sha256"))])
    ckpt, skipped = store.load_at_or_before(25)
    assert ckpt.step == 20 and skipped == []


def _saved(tmp_path: Path) -> tuple[CheckpointStore, Path]:
    model, opt = _trained()
    store = CheckpointStore(tmp_path)
    info = store.save_training(model, opt, epoch=1, step=5)
    return store, tmp_path / info.file


class Evil:  # a pickled class: weights_only=True must refuse to build it
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def _rewrite_consistently(path: Path, data: bytes) -> None:
    """An attacker who rewrites the file, its sidecar and the pointer's hash, all consistently."""
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{sha}  {path.name}\n")
    pointer = path.parent / POINTER_FILE
    obj = json.loads(pointer.read_text())
    for entry in [obj["latest"], *obj["history"]]:
        if entry["file"] == path.name:
            entry["sha256"] = sha
    pointer.write_text(json.dumps(obj))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


TAMPERS = {
    "bytes_changed": (_flip_byte, "checksum_mismatch"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "checksum_mismatch"),
    "sidecar_other_hash": (lambda p: p.with_name(p.name + ".sha256").write_text(f"{'0' * 64}  {p.name}\n"),
                           "checksum_mismatch"),
    "sidecar_garbage": (lambda p: p.with_name(p.name + ".sha256").write_text("not a checksum\n"), "bad_sidecar"),
    "sidecar_other_name": (lambda p: p.with_name(p.name + ".sha256").write_text(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  other.pt\n"), "bad_sidecar"),
    "sidecar_missing": (lambda p: p.with_name(p.name + ".sha256").unlink(), "missing_sidecar"),
    "file_missing": (lambda p: p.unlink(), "missing_file"),
    "pickled_object": (lambda p: _rewrite_consistently(p, _torch_bytes({"kind": Evil()})), "unsafe_content"),
    "pickled_namespace": (lambda p: _rewrite_consistently(p, _torch_bytes({"model": argparse.Namespace(a=1)})),
                          "unsafe_content"),
    "not_a_torch_file": (lambda p: _rewrite_consistently(p, b"PK\x03\x04 nope"), "unreadable"),
    "foreign_weights": (lambda p: _rewrite_consistently(p, _torch_bytes({"weight": torch.zeros(2)})), "bad_format"),
    "wrong_format": (lambda p: _rewrite_consistently(p, _torch_bytes({"kind": "esper.tolaria.checkpoint",
                                                                      "format": 99})), "bad_format"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_checkpoints_are_refused_with_a_reason(tmp_path: Path, tamper: str) -> None:
    store, path = _saved(tmp_path)
    change, reason = TAMPERS[tamper]
    change(path)
    with pytest.raises(CheckpointError) as info:
        store.load_latest()
    assert info.value.reason == reason, info.value
    model, opt = make_model(seed=3), None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        store.restore_latest(model, opt)
    assert_same(before, dict(model.state_dict()))  # nothing was loaded


KEYS = SigningKeys(key_id="k1", secret=b"s" * 32)


def test_a_signed_checkpoint_rewritten_consistently_without_the_key_is_refused(tmp_path: Path) -> None:
    """Hashes alone let whoever can write the directory substitute weights (file, sidecar and pointer
    rewritten together). A keyed store also checks a MAC of the sidecar line, before reading the file."""
    model, opt = _trained()
    store = CheckpointStore(tmp_path, run_id="run-a", keys=KEYS)
    info = store.save_training(model, opt, epoch=1, step=5)
    assert (tmp_path / f"{info.file}.mac").read_text().startswith("k1 ")
    assert store.load_latest() is not None  # its own checkpoint verifies
    rotated = SigningKeys(key_id="k2", secret=b"t" * 32, previous_key_id="k1", previous_secret=b"s" * 32)
    assert CheckpointStore(tmp_path, run_id="run-a", keys=rotated).load_latest() is not None  # previous key verifies

    other, other_opt = _trained(steps=7)
    forged = encode_checkpoint(other.state_dict(), other_opt.state_dict(), epoch=1, step=5, run_id="run-a")
    _rewrite_consistently(tmp_path / info.file, forged)
    with pytest.raises(CheckpointError) as refused:
        store.load_latest()
    assert refused.value.reason == "bad_signature" and "does not verify" in refused.value.detail
    assert CheckpointStore(tmp_path, run_id="run-a").load_latest() is not None  # hashes alone would take it

    (tmp_path / f"{info.file}.mac").unlink()
    with pytest.raises(CheckpointError, match="unsigned") as unsigned:
        store.load_latest()
    assert unsigned.value.reason == "bad_signature"
    wrong = SigningKeys(key_id="k9", secret=b"u" * 32)
    signed_elsewhere = CheckpointStore(tmp_path / "b", run_id="run-a", keys=wrong)
    other_info = signed_elsewhere.save_training(model, opt, epoch=1, step=6)
    with pytest.raises(CheckpointError, match="unknown key"):
        CheckpointStore(tmp_path / "b", run_id="run-a", keys=KEYS).load(other_info)


def test_a_mac_damaged_into_non_ascii_is_refused_and_the_older_checkpoint_serves(tmp_path: Path) -> None:
    """`hmac.compare_digest` raises TypeError on non-ASCII str: a rotted `.mac` escaped the store's
    typed error, so the rollback crashed instead of passing over to the older checkpoint."""
    model, opt = _trained()
    store = CheckpointStore(tmp_path, run_id="run-a", keys=KEYS)
    store.save_training(model, opt, epoch=1, step=2)
    newest = store.save_training(model, opt, epoch=2, step=4)
    (tmp_path / f"{newest.file}.mac").write_text("k1 " + "é" * 64 + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError) as refused:
        store.load(newest)
    assert refused.value.reason == "bad_signature"
    ckpt, skipped = store.load_at_or_before(None)
    assert ckpt.step == 2 and [e.reason for e in skipped] == ["bad_signature"]


def test_a_file_retention_cannot_delete_does_not_fail_the_save(tmp_path: Path) -> None:
    model, opt = _trained()
    (tmp_path / "ckpt-s0000000001-e000000-000000000000.pt").mkdir(parents=True)  # unlink raises on it
    store = CheckpointStore(tmp_path, keep=1)
    info = store.save_training(model, opt, epoch=0, step=2)  # saved and pointed at, though pruning failed
    assert store.latest_info() == info and store.load_latest() is not None


@pytest.mark.parametrize("key_id", ["k 1", "clé", "k1"])
def test_any_key_id_signs_and_verifies(tmp_path: Path, key_id: str) -> None:
    model, opt = _trained()
    keys = SigningKeys(key_id=key_id, secret=b"s" * 32)
    store = CheckpointStore(tmp_path, run_id="run-a", keys=keys)
    store.save_training(model, opt, epoch=0, step=1)
    assert store.load_latest() is not None


def test_retention_prunes_the_mac_files_too(tmp_path: Path) -> None:
    model, opt = _trained()
    store = CheckpointStore(tmp_path, keep=1, run_id="run-a", keys=KEYS)
    first = store.save_training(model, opt, epoch=0, step=1)
    second = store.save_training(model, opt, epoch=0, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [POINTER_FILE, second.file, f"{second.file}.sha256", f"{second.file}.mac"])
    assert first.file != second.file


def test_swapped_file_with_a_valid_sidecar_fails_the_pointer(tmp_path: Path) -> None:
    model, opt = _trained()
    store = CheckpointStore(tmp_path, keep=3)
    old = store.save_training(model, opt, epoch=0, step=1)
    train_steps(model, opt, 1)
    new = store.save_training(model, opt, epoch=0, step=2)
    for suffix in ("", ".sha256"):  # replay the old (validly signed-off) pair under the new name
        (tmp_path / f"{new.file}{suffix}").write_bytes((tmp_path / f"{old.file}{suffix}").read_bytes())
    (tmp_path / f"{new.file}.sha256").write_text(f"{old.sha256}  {new.file}\n")
    with pytest.raises(CheckpointError) as info:
        store.load_latest()
    assert info.value.reason == "pointer_mismatch"
    ckpt, skipped = store.load_at_or_before(None)  # walks back past the broken one, and says so
    assert ckpt.step == 1 and [e.reason for e in skipped] == ["pointer_mismatch"]


def test_a_broken_pointer_is_refused_and_the_next_save_keeps_older_files(tmp_path: Path) -> None:
    model, opt = _trained()
    store = CheckpointStore(tmp_path, keep=3)
    first = store.save_training(model, opt, epoch=0, step=1)
    (tmp_path / POINTER_FILE).write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        store.load_latest()
    assert info.value.reason == "bad_pointer"
    store.save_training(model, opt, epoch=0, step=2)
    assert [h.step for h in store.history()] == [2, 1]
    assert (tmp_path / first.file).exists()


def test_unserialisable_extra_is_refused_before_writing(tmp_path: Path) -> None:
    model, opt = _trained()
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError) as info:
        store.save_training(model, opt, epoch=0, step=1, extra={"module": torch.nn.Linear(2, 2)})
    assert info.value.reason == "unserialisable"
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError):
        encode_checkpoint({}, {}, epoch=-1, step=0)


def test_restore_into_a_different_architecture_is_a_typed_mismatch_and_changes_nothing(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    grown = make_model(seed=1)
    grown.set_slot("hidden1", torch.nn.Linear(6, 6))
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    ckpt = read_checkpoint(path)
    with pytest.raises(StateMismatchError, match="missing"):
        ckpt.restore(grown, make_optimizer(grown))
    assert_same(before, dict(grown.state_dict()))


def test_every_saved_checkpoint_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ckpt_writer.py")), str(directory)],
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    saved: list[int] = []
    for line in proc.stdout:
        saved.append(int(line))
        if len(saved) >= 25:
            break
    os.kill(proc.pid, signal.SIGKILL)  # it keeps saving until the signal lands: anywhere in a save
    proc.wait(timeout=10)
    proc.stdout.close()
    store = CheckpointStore(directory, keep=2)
    ckpt = store.load_latest()  # verifies sidecar, pointer hash and weights-only load
    assert ckpt is not None and ckpt.step >= saved[-1] and ckpt.extra == {"note": "x" * 100}
    model = make_model(hidden=(256, 256))
    ckpt.restore(model, make_optimizer(model))
    for info in store.history():  # every retained checkpoint verifies, not just the latest
        assert store.load(info).step == info.step
