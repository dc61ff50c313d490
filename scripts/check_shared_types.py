"""CI guard: no Python Enum subclasses outside Leyline's generated code.

Shared enums live in contracts/leyline/leyline.proto; a Python mirror drifts silently. The check
parses every module (no imports, no regexes that miss `class X(enum.IntEnum)`) and fails on any
class whose bases name Enum, IntEnum, StrEnum, Flag or IntFlag (also under an `import ... as`
alias), and on the functional form `Enum("Name", ...)`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ENUM_BASES = {"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag"}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _enum_aliases(tree: ast.AST) -> set[str]:
    """ENUM_BASES plus local names they were imported as (`from enum import Enum as E`)."""
    names = set(ENUM_BASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "enum":
            names.update(a.asname for a in node.names if a.asname and a.name in ENUM_BASES)
    return names


def find_enums(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    enums = _enum_aliases(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_base_name(b) in enums for b in node.bases):
            hits.append(f"{path}:{node.lineno}: class {node.name} subclasses an Enum")
        elif isinstance(node, ast.Call) and _base_name(node.func) in enums:
            hits.append(f"{path}:{node.lineno}: functional Enum(...) definition")
    return hits


def main(roots: list[str]) -> int:
    hits: list[str] = []
    for root in roots:
        if not Path(root).is_dir():
            print(f"guard: {root} is not a directory")
            return 2
        for path in sorted(Path(root).rglob("*.py")):
            if "_generated" in path.parts:
                continue
            hits.extend(find_enums(path))
    for hit in hits:
        print(hit)
    if hits:
        print(f"guard: {len(hits)} Enum class(es) outside Leyline generated code; put them in leyline.proto")
        return 1
    print("guard: no shadow enums")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["libs", "services"]))
