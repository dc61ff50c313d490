"""Field-report outbox: durability under SIGKILL, retry/backoff/drop, retention, observation windows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from esper.leyline import pb
from esper.tamiyo.field_reports import FieldReportError, FieldReportStore, outcome_for

ROOT = Path(__file__).resolve().parents[2]


def _report(i: int, *, issued_at_ms: int | None = 1_700_000_000_000) -> pb.FieldReport:
    r = pb.FieldReport(report_id=f"r{i}", command_id=f"c{i}", training_run_id="run1")
    if issued_at_ms is not None:
        r.issued_at.FromMilliseconds(issued_at_ms + i)
    return r


def test_append_is_idempotent_and_requires_ids_and_issued_at(tmp_path: Path) -> None:
    store = FieldReportStore(tmp_path / "fr.db")
    assert store.append(_report(1)) is True
    assert store.append(_report(1)) is False
    with pytest.raises(FieldReportError, match="issued_at"):
        store.append(_report(2, issued_at_ms=None))
    with pytest.raises(FieldReportError, match="report_id"):
        store.append(pb.FieldReport())
    assert store.counts() == {"pending": 1, "published": 0, "dropped": 0}


def test_retry_backoff_then_drop_is_counted(tmp_path: Path) -> None:
    store = FieldReportStore(tmp_path / "fr.db")
    store.append(_report(1))
    now = 1_000
    assert [d.report_id for d in store.due(now)] == ["r1"]
    assert store.mark_failed("r1", now_ms=now, backoff_ms=1000, mult=2.0, max_retries=3) is False
    assert store.due(now + 999) == [] and len(store.due(now + 1000)) == 1
    assert store.mark_failed("r1", now_ms=now, backoff_ms=1000, mult=2.0, max_retries=3) is False
    assert store.due(now + 1999) == [] and len(store.due(now + 2000)) == 1  # 1000 * 2^1
    assert store.mark_failed("r1", now_ms=now, backoff_ms=1000, mult=2.0, max_retries=3) is False
    assert store.mark_failed("r1", now_ms=now, backoff_ms=1000, mult=2.0, max_retries=3) is True
    assert store.counts()["dropped"] == 1 and store.due(10**12) == []


def test_retention_prunes_only_finished_old_reports(tmp_path: Path) -> None:
    store = FieldReportStore(tmp_path / "fr.db")
    for i in range(3):
        store.append(_report(i))
    store.mark_published(["r0", "r1"])
    now = 1_700_000_000_000 + 25 * 3_600_000
    assert store.prune(now_ms=now, retention_hours=24) == 2
    assert store.counts() == {"pending": 1, "published": 0, "dropped": 0}


def test_retention_fails_loudly_on_a_report_without_issued_at(tmp_path: Path) -> None:
    path = tmp_path / "fr.db"
    store = FieldReportStore(path)
    store.append(_report(1))
    # Corrupt the store behind the schema's back (the CHECK constraint normally forbids this).
    store._db.execute("PRAGMA ignore_check_constraints = ON")
    store._db.execute("UPDATE reports SET issued_at_ms = 0")
    with pytest.raises(FieldReportError, match="issued_at"):
        store.prune(now_ms=10**13, retention_hours=24)


def test_every_committed_report_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "fr.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fr_writer.py")), str(path)],
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    committed = []
    for line in proc.stdout:
        committed.append(line.strip())
        if len(committed) >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it keeps writing until the signal lands
    proc.wait(timeout=10)
    proc.stdout.close()
    store = FieldReportStore(path)  # reopen: WAL recovery
    stored = {d.report_id for d in store.due(10**13, limit=100_000)}
    missing = [r for r in committed if r not in stored]
    assert not missing, f"{len(missing)} committed reports lost, e.g. {missing[:3]}"
    for d in store.due(10**13, limit=5):
        assert d.report.notes == "x" * 200  # intact payloads


def test_observation_window_synthesises_a_report(tmp_path: Path) -> None:
    store = FieldReportStore(tmp_path / "fr.db")
    cmd = pb.AdaptationCommand(command_id="cmd1", command_type=pb.COMMAND_SEED, target_seed_id="seed-0")
    cmd.seed_operation.blueprint_id = "BP001"
    cmd.annotations["policy_version"] = "tamiyo_gnn_v1"
    store.open_window(cmd, run_id="run1", start_epoch=3, epochs=2)
    assert store.observe(run_id="run1", epoch=4, loss_delta=-0.2, critical=False, issued_at_ms=1) == []
    [report] = store.observe(run_id="run1", epoch=5, loss_delta=-0.1, critical=False, issued_at_ms=2)
    assert report.report_id == "fr-synth-cmd1-3+2"
    assert report.outcome == pb.FIELD_REPORT_OUTCOME_SUCCESS
    assert report.metrics["loss_delta_sum"] == pytest.approx(-0.3)
    assert report.seed_id == "seed-0" and report.blueprint_id == "BP001"
    assert store.observe(run_id="run1", epoch=6, loss_delta=0.0, critical=False, issued_at_ms=3) == []
    assert [d.report_id for d in store.due(10**13)] == ["fr-synth-cmd1-3+2"]


def test_window_with_a_critical_event_is_a_regression(tmp_path: Path) -> None:
    store = FieldReportStore(tmp_path / "fr.db")
    store.open_window(pb.AdaptationCommand(command_id="c"), run_id="run1", start_epoch=0, epochs=1)
    [report] = store.observe(run_id="run1", epoch=1, loss_delta=-0.5, critical=True, issued_at_ms=1)
    assert report.outcome == pb.FIELD_REPORT_OUTCOME_REGRESSION


@pytest.mark.parametrize(("command_type", "reason", "expected"), [
    (pb.COMMAND_SEED, None, pb.FIELD_REPORT_OUTCOME_SUCCESS),
    (pb.COMMAND_PAUSE, "pause_triggered", pb.FIELD_REPORT_OUTCOME_NEUTRAL),
    (pb.COMMAND_PAUSE, "loss_spike", pb.FIELD_REPORT_OUTCOME_REGRESSION),
    (pb.COMMAND_PAUSE, "bp_quarantine", pb.FIELD_REPORT_OUTCOME_REGRESSION),
    (pb.COMMAND_OPTIMIZER, "timeout_inference", pb.FIELD_REPORT_OUTCOME_NEUTRAL),
])
def test_decision_outcome_rule(command_type: int, reason: str | None, expected: int) -> None:
    assert outcome_for(command_type, reason) == expected
