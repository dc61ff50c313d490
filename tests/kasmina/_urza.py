"""A real Urza for the Kasmina tests: kernels forged by Tezzeret into a temporary library."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.karn import SlotShape, get_template
from esper.tezzeret.forge import ForgeReport, forge_once
from esper.urza.library import UrzaLibrary

SLOT = SlotShape(8)


def forge(var: Path, *blueprints: str, slot: SlotShape = SLOT) -> ForgeReport:
    """What Tezzeret does: compile the blueprints for `slot` and register them in `var`'s library."""
    with UrzaLibrary(var / "catalog.db", var / "artifacts") as library:
        report = forge_once(library, [slot], device=torch.device("cpu"), compile_enabled=False, seed=0,
                            max_attempts=1, templates=[get_template(b) for b in blueprints])
    assert not report.failed, report.failed
    return report
