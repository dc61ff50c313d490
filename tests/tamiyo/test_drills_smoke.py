"""Smoke of Tamiyo's drills (`python -m esper.tamiyo drill all`, part of `make e2e`): the registry,
the CLI contract, and one full run of the `timeout` drill (a real worker process against a private
redis-server; a few seconds)."""

from __future__ import annotations

import pytest

from esper.tamiyo.drills import DRILLS, run_drill, run_drills

EXPECTED = ["timeout", "policy_update"]


def test_registry_names() -> None:
    assert list(DRILLS) == EXPECTED


def test_unknown_drill_exits_2_and_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_drills("no-such-drill") == 2
    err = capsys.readouterr().err
    assert all(name in err for name in EXPECTED)


def test_timeout_drill_passes() -> None:
    ok, evidence = run_drill("timeout")
    assert ok, evidence
    for fact in ("timeout_inference", "OPEN", "oona_late_replies_total 0", "rc=0"):
        assert fact in evidence, fact


def test_policy_update_drill_passes() -> None:
    ok, evidence = run_drill("policy_update")
    assert ok, evidence
    for fact in ("applied 1", "bad_signature=1", "registry_mismatch=1", "stale_update=1"):
        assert fact in evidence, fact
