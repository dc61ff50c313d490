"""The CI guard: no Python Enum subclasses outside Leyline's generated code (ARCHITECTURE §3)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_guard() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_shared_types", ROOT / "scripts" / "check_shared_types.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guard = _load_guard()

SHADOW_ENUMS = '''\
import enum
from enum import Enum, IntFlag


class X(Enum):
    A = 1


class Y(enum.IntEnum):
    B = 2


class Z(str, Enum):
    C = "c"


class W(enum.StrEnum):
    D = "d"


class V(IntFlag):
    E = 4


def factory():
    class Nested(enum.Flag):
        F = 8
    return Nested
'''

CLEAN = '''\
import enum
from dataclasses import dataclass


class Enumerable:
    pass


class NotAnEnum(Enumerable):
    pass


@dataclass
class Config:
    mode: str = "a"


class Meta(type):
    pass


AUTO = enum.auto
'''


def test_flags_enum_subclasses(tmp_path: Path) -> None:
    path = tmp_path / "shadow.py"
    path.write_text(SHADOW_ENUMS, encoding="utf-8")
    hits = guard.find_enums(path)
    names = sorted(h.split("class ")[1].split(" ")[0] for h in hits)
    assert names == ["Nested", "V", "W", "X", "Y", "Z"]
    for hit in hits:
        assert hit.startswith(f"{path}:") and "subclasses an Enum" in hit
    assert any(h.startswith(f"{path}:5: class X") for h in hits), hits


@pytest.mark.parametrize("source", ["class X(Enum): pass\n", "class Y(enum.IntEnum): pass\n",
                                    "class Z(str, Enum): pass\n"])
def test_flags_each_listed_form(tmp_path: Path, source: str) -> None:
    path = tmp_path / "one.py"
    path.write_text(source, encoding="utf-8")
    assert len(guard.find_enums(path)) == 1


def test_passes_a_file_without_enums(tmp_path: Path) -> None:
    path = tmp_path / "clean.py"
    path.write_text(CLEAN, encoding="utf-8")
    assert guard.find_enums(path) == []


def test_main_skips_generated_code_and_reports_hits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generated = tmp_path / "pkg" / "_generated"
    generated.mkdir(parents=True)
    (generated / "pb2.py").write_text(SHADOW_ENUMS, encoding="utf-8")
    (tmp_path / "pkg" / "ok.py").write_text(CLEAN, encoding="utf-8")
    assert guard.main([str(tmp_path)]) == 0
    assert "no shadow enums" in capsys.readouterr().out

    (tmp_path / "pkg" / "bad.py").write_text("from enum import Enum\n\n\nclass Mode(Enum):\n    A = 1\n",
                                             encoding="utf-8")
    assert guard.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad.py:4: class Mode subclasses an Enum" in out
    assert "1 Enum class(es)" in out


def test_real_tree_is_clean(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    assert (ROOT / "libs").is_dir() and (ROOT / "services").is_dir()
    assert guard.main(["libs", "services"]) == 0, capsys.readouterr().out


def test_flags_aliased_and_functional_enums(tmp_path: Path) -> None:
    path = tmp_path / "sneaky.py"
    path.write_text('from enum import IntEnum as IE\n\n\nclass Lane(IE):\n    A = 1\n\n\nMode = IE("Mode", "a b")\n',
                    encoding="utf-8")
    hits = guard.find_enums(path)
    assert len(hits) == 2, hits
    assert "class Lane" in hits[0] and "functional" in hits[1]


def test_missing_root_is_an_error_not_a_pass(tmp_path: Path) -> None:
    assert guard.main([str(tmp_path / "typo")]) == 2
