"""Categorical registries: stable indices across processes, collision handling, verified persistence."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from esper.core.errors import EsperError
from esper.tamiyo.registry import (
    REGISTRY_FILE,
    REGISTRY_NAMES,
    CategoryRegistry,
    RegistryMismatchError,
    RegistrySet,
    canonical_json,
)

Edit = Callable[[dict[str, Any]], object]
KEYS = ["seed-0", "seed-1", "seed-2", "BP001", "BP017", "linear", "conv2d", "relu", "gelu", "adamw"]


def _in_subprocess(code: str, *, hash_seed: str = "12345") -> object:
    """Run ``code`` in a fresh interpreter (its own PYTHONHASHSEED) and return what it printed as JSON."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         timeout=60)
    return json.loads(out.stdout)


def test_indices_are_stable_nonzero_and_distinct() -> None:
    reg = CategoryRegistry("seed", 1024)
    first = [reg.index(k) for k in KEYS]
    assert [reg.index(k) for k in KEYS] == first
    assert all(1 <= i < 1024 for i in first)
    assert len(set(first)) == len(first)
    assert len(reg) == len(KEYS) and "relu" in reg


def test_indices_match_a_fresh_process_that_sees_keys_in_another_order() -> None:
    reg = CategoryRegistry("seed", 1024)
    here = {k: reg.index(k) for k in KEYS}
    code = (
        "import json\nfrom esper.tamiyo.registry import CategoryRegistry\n"
        f"r = CategoryRegistry('seed', 1024)\nkeys = {list(reversed(KEYS))!r}\n"
        "print(json.dumps({k: r.index(k) for k in keys}))"
    )
    assert _in_subprocess(code, hash_seed="1") == here
    assert _in_subprocess(code, hash_seed="999") == here


def test_collisions_are_probed_and_overflow_is_counted() -> None:
    reg = CategoryRegistry("tiny", 4)  # slots 1..3
    got = [reg.index(k) for k in ("a", "b", "c")]
    assert sorted(got) == [1, 2, 3]
    assert reg.overflow_total == 0
    extra = reg.index("d")  # full: shares its home slot, counted, not recorded
    assert 1 <= extra <= 3 and reg.overflow_total == 1 and "d" not in reg
    assert reg.index("d") == extra and reg.overflow_total == 2


def test_persisted_collision_resolution_is_reproduced_in_another_process(tmp_path: Path) -> None:
    reg = CategoryRegistry("tiny", 4)
    expected = {k: reg.index(k) for k in ("c", "a", "b")}
    path = tmp_path / "tiny.json"
    digest = reg.save(path)
    code = (
        "import json\nfrom esper.tamiyo.registry import CategoryRegistry\n"
        f"r = CategoryRegistry.load({str(path)!r}, name='tiny', vocab_size=4)\n"
        "print(json.dumps([r.entries(), r.digest()]))"
    )
    assert _in_subprocess(code) == [expected, digest]


def test_registry_set_round_trip_and_digest(tmp_path: Path) -> None:
    regs = RegistrySet.new()
    assert [r.name for r in regs] == list(REGISTRY_NAMES)
    assert regs.optimizer_family.vocab_size == 256 and regs.seed.vocab_size == 1024
    for key in KEYS:
        regs.seed.index(key)
    regs.layer_type.index("linear")
    digest = regs.save(tmp_path)
    assert digest == regs.digest()
    assert [p.name for p in tmp_path.iterdir()] == [REGISTRY_FILE]  # no temp file left behind
    loaded = RegistrySet.load(tmp_path, expected_digest=digest)
    assert loaded.digest() == digest
    assert loaded.seed.entries() == regs.seed.entries()
    assert RegistrySet.new().digest() != digest
    code = (
        "import json\nfrom esper.tamiyo.registry import RegistrySet\n"
        f"r = RegistrySet.load({str(tmp_path)!r})\nprint(json.dumps([r.digest(), r.seed.index('seed-2')]))"
    )
    assert _in_subprocess(code) == [digest, regs.seed.index("seed-2")]


def _tamper(tmp_path: Path, edit: Edit) -> None:
    path = tmp_path / REGISTRY_FILE
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _seed_edit(change: Edit, *, reseal: bool) -> Edit:
    """Edit the seed registry's entry; ``reseal`` recomputes its own digest, as a careful forger would."""

    def edit(obj: dict[str, Any]) -> None:
        entry = obj["registries"]["seed"]
        change(entry)
        if reseal:
            entry.pop("digest")
            entry["digest"] = hashlib.sha256(canonical_json(entry)).hexdigest()

    return edit


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_seed_edit(lambda e: e["entries"].update({"seed-0": 7}), reseal=False), "digest_mismatch"),
        (_seed_edit(lambda e: e.update(vocab_size=512), reseal=True), "vocab_mismatch"),
        (_seed_edit(lambda e: e.update(scheme="first-come"), reseal=True), "scheme_mismatch"),
        (_seed_edit(lambda e: e["entries"].update({"x": 0}), reseal=True), "invalid_entry"),
        (_seed_edit(lambda e: e["entries"].update({"seed-0": 5000}), reseal=True), "invalid_entry"),
        # each registry intact, but the set digest no longer matches its content
        (_seed_edit(lambda e: e["entries"].update({"new": 9}), reseal=True), "digest_mismatch"),
        (lambda o: o["registries"].pop("hazard_class"), "missing_registry"),
    ],
)
def test_tampered_or_mismatched_set_is_refused(tmp_path: Path, edit: Edit, reason: str) -> None:
    regs = RegistrySet.new()
    regs.seed.index("seed-0")
    regs.save(tmp_path)
    _tamper(tmp_path, edit)
    with pytest.raises(RegistryMismatchError) as info:
        RegistrySet.load(tmp_path)
    assert info.value.reason == reason
    assert isinstance(info.value, EsperError)


def test_expected_digest_mismatch_and_corrupt_file(tmp_path: Path) -> None:
    regs = RegistrySet.new()
    regs.save(tmp_path)
    with pytest.raises(RegistryMismatchError) as info:
        RegistrySet.load(tmp_path, expected_digest="0" * 64)
    assert info.value.reason == "expected_digest_mismatch"
    (tmp_path / REGISTRY_FILE).write_text('{"registries": ')
    with pytest.raises(RegistryMismatchError) as info:
        RegistrySet.load(tmp_path)
    assert info.value.reason == "corrupt"


def test_single_registry_name_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    CategoryRegistry("layer_type", 1024).save(path)
    with pytest.raises(RegistryMismatchError, match="name_mismatch"):
        CategoryRegistry.load(path, name="activation_type", vocab_size=1024)
    with pytest.raises(FileNotFoundError):
        CategoryRegistry.load(tmp_path / "absent.json", name="seed", vocab_size=1024)
