"""CI guard: no Python Enum subclasses outside Leyline's generated code.

Shared enums live in contracts/leyline/leyline.proto; a Python mirror drifts silently. The check
parses every module (no imports, no regexes that miss `class X(enum.IntEnum)`) and fails on any
class whose bases name Enum, IntEnum, StrEnum, Flag or IntFlag.
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


def find_enums(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path}:{node.lineno}: class {node.name} subclasses an Enum"
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(_base_name(b) in ENUM_BASES for b in node.bases)
    ]


def main(roots: list[str]) -> int:
    hits: list[str] = []
    for root in roots:
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
