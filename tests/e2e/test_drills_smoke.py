"""Fast smoke of the bus drills (`make e2e` runs all of them): the registry, the CLI contract, and
the quick in-process drills. Each drill starts its own redis-server on a free loopback port."""

from __future__ import annotations

import pytest

from esper.oona.drills import DRILLS, run_drill, run_drills

EXPECTED = ["crash-reclaim", "poison", "bad-input", "emergency-first", "redis-restart", "request-reply"]


def test_registry_names() -> None:
    assert list(DRILLS) == EXPECTED


def test_unknown_drill_exits_2_and_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_drills("no-such-drill") == 2
    err = capsys.readouterr().err
    assert all(name in err for name in EXPECTED)


@pytest.mark.parametrize("name", ["poison", "bad-input"])
def test_quick_drill_passes(name: str) -> None:
    ok, evidence = run_drill(name)
    assert ok, evidence
