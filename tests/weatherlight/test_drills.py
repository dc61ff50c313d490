"""`esper drill` collects a service's PASS/FAIL lines from a real drill process."""

from __future__ import annotations

from esper.weatherlight.drills import DrillRow, run_all


def test_service_drill_lines_become_rows() -> None:
    seen: list[DrillRow] = []
    rows = run_all("oona.poison", echo=seen.append)
    assert rows is not None and [r.name for r in rows] == ["oona.poison"]
    assert rows[0].ok, rows[0].evidence
    assert rows == seen and rows[0].seconds > 0


def test_an_unknown_service_drill_is_a_fail_row_with_the_exit_code() -> None:
    rows = run_all("oona.no-such-drill", echo=lambda _r: None)
    assert rows is not None and len(rows) == 1
    assert not rows[0].ok and "exit code 2" in rows[0].evidence


def test_unknown_names_are_none() -> None:
    assert run_all("nope", echo=lambda _r: None) is None
    assert run_all("fleet.nope", echo=lambda _r: None) is None
