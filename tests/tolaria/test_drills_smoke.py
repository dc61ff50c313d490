"""Smoke of Tolaria's drills (`python -m esper.tolaria drill all`, part of `make e2e`): the registry,
the CLI contract, and one full run of the `emergency` drill (real processes, a few seconds)."""

from __future__ import annotations

import pytest

from esper.core.drills import run_drill
from esper.tolaria.drills import DRILLS, run_drills

EXPECTED = ["emergency", "tamiyo_crash", "fallback_rejection"]


def test_registry_names() -> None:
    assert list(DRILLS) == EXPECTED


def test_unknown_drill_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_drills("no-such-drill") == 2
    err = capsys.readouterr().err
    assert all(name in err for name in EXPECTED)


def test_emergency_drill_passes() -> None:
    ok, evidence = run_drill(DRILLS["emergency"], timeout_s=180)
    assert ok, evidence
    assert "rollbacks {'fast': 3} restoring steps ['9', '15', '14']" in evidence
    assert "EMERGENCY_LEVEL_ELEVATED" in evidence
