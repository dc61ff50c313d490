"""Field reports: what happened after each decision, kept durably until Simic has them.

A SQLite outbox (WAL journal, `synchronous=FULL`: a committed report survives `kill -9` and power
loss; torn writes are SQLite's problem, not ours) instead of the prototype's hand-rolled log. Rows
are published on `field_report` with exponential backoff and dropped — counted and reported, never
silently — after the retry cap. `issued_at` is required: retention never invents a timestamp.
Observation windows follow a command for N epochs and synthesise an `fr-synth-<cmd>-<start>+<n>`
report from what the trainer reported meanwhile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from esper.core.errors import EsperError
from esper.leyline import pb

# Prototype: REGRESSION for these decision reasons, NEUTRAL for timeouts and benign pauses.
REGRESSION_REASONS = frozenset({"bp_quarantine", "loss_spike", "isolation_violations", "hook_budget"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY,
    issued_at_ms INTEGER NOT NULL CHECK (issued_at_ms > 0),
    payload BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'published', 'dropped'))
);
CREATE INDEX IF NOT EXISTS reports_due ON reports (state, next_attempt_ms);
CREATE TABLE IF NOT EXISTS windows (
    command_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    seed_id TEXT NOT NULL,
    blueprint_id TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    start_epoch INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    loss_delta_sum REAL NOT NULL DEFAULT 0,
    critical INTEGER NOT NULL DEFAULT 0
);
"""


class FieldReportError(EsperError):
    """A report that cannot be stored as asked (no id, no issued_at) or a store that is unusable."""


@dataclass(frozen=True, slots=True)
class DueReport:
    report_id: str
    report: pb.FieldReport
    attempts: int


def outcome_for(command_type: int, reason: str | None) -> pb.FieldReportOutcome.ValueType:
    """Prototype rule for the report written at decision time."""
    if reason in REGRESSION_REASONS:
        return pb.FIELD_REPORT_OUTCOME_REGRESSION
    if command_type == pb.COMMAND_PAUSE or (reason is not None and reason.startswith("timeout")):
        return pb.FIELD_REPORT_OUTCOME_NEUTRAL
    return pb.FIELD_REPORT_OUTCOME_SUCCESS


class FieldReportStore:
    """The outbox: one connection, used by one thread at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: explicit transactions below. The service serialises every call on one
        # dedicated thread (SQLite calls block), hence check_same_thread=False.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- reports -----------------------------------------------------------------------------------

    def append(self, report: pb.FieldReport) -> bool:
        """Store durably (committed and fsynced on return). False if the id was already stored."""
        if not report.report_id:
            raise FieldReportError("field report without report_id")
        issued_at_ms = report.issued_at.ToMilliseconds() if report.HasField("issued_at") else 0
        if issued_at_ms <= 0:
            raise FieldReportError(f"field report {report.report_id} has no issued_at")
        cur = self._db.execute(
            "INSERT OR IGNORE INTO reports (report_id, issued_at_ms, payload) VALUES (?, ?, ?)",
            (report.report_id, issued_at_ms, report.SerializeToString(deterministic=True)),
        )
        return cur.rowcount == 1

    def due(self, now_ms: int, limit: int = 100) -> list[DueReport]:
        rows = self._db.execute(
            "SELECT report_id, payload, attempts FROM reports WHERE state = 'pending' AND next_attempt_ms <= ? "
            "ORDER BY issued_at_ms LIMIT ?", (now_ms, limit),
        ).fetchall()
        return [DueReport(rid, pb.FieldReport.FromString(payload), attempts) for rid, payload, attempts in rows]

    def mark_published(self, report_ids: Iterable[str]) -> None:
        self._db.executemany("UPDATE reports SET state = 'published' WHERE report_id = ?",
                             [(r,) for r in report_ids])

    def mark_failed(self, report_id: str, *, now_ms: int, backoff_ms: float, mult: float, max_retries: int) -> bool:
        """Schedule a retry with exponential backoff; True when the report is dropped (cap reached)."""
        row = self._db.execute("SELECT attempts FROM reports WHERE report_id = ?", (report_id,)).fetchone()
        if row is None:
            raise FieldReportError(f"unknown field report {report_id}")
        attempts = int(row[0]) + 1
        if attempts > max_retries:
            self._db.execute("UPDATE reports SET state = 'dropped', attempts = ? WHERE report_id = ?",
                             (attempts, report_id))
            return True
        delay = int(backoff_ms * mult ** (attempts - 1))
        self._db.execute("UPDATE reports SET attempts = ?, next_attempt_ms = ? WHERE report_id = ?",
                         (attempts, now_ms + delay, report_id))
        return False

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM reports GROUP BY state").fetchall()
        return {"pending": 0, "published": 0, "dropped": 0, **{s: int(n) for s, n in rows}}

    def prune(self, *, now_ms: int, retention_hours: float) -> int:
        """Delete published and dropped reports older than the retention. Fails loudly on a row
        without issued_at (the schema forbids it, so that means a corrupted store)."""
        bad = self._db.execute("SELECT COUNT(*) FROM reports WHERE issued_at_ms IS NULL OR issued_at_ms <= 0")
        if int(bad.fetchone()[0]):
            raise FieldReportError("field reports without issued_at: retention refuses to guess their age")
        cutoff = now_ms - int(retention_hours * 3_600_000)
        cur = self._db.execute("DELETE FROM reports WHERE state != 'pending' AND issued_at_ms < ?", (cutoff,))
        return cur.rowcount

    # -- observation windows -----------------------------------------------------------------------

    def open_window(self, command: pb.AdaptationCommand, *, run_id: str, start_epoch: int, epochs: int) -> None:
        if not command.command_id:
            raise FieldReportError("observation window for a command without command_id")
        self._db.execute(
            "INSERT OR IGNORE INTO windows (command_id, run_id, seed_id, blueprint_id, policy_version, start_epoch,"
            " epochs) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (command.command_id, run_id, command.target_seed_id, command.seed_operation.blueprint_id,
             command.annotations.get("policy_version", ""), start_epoch, epochs),
        )

    def observe(self, *, run_id: str, epoch: int, loss_delta: float, critical: bool,
                issued_at_ms: int) -> list[pb.FieldReport]:
        """Fold one epoch's evidence into the run's open windows; close (and store) the finished ones."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "UPDATE windows SET loss_delta_sum = loss_delta_sum + ?, critical = MAX(critical, ?) "
                "WHERE run_id = ? AND start_epoch < ?", (loss_delta, int(critical), run_id, epoch),
            )
            done = self._db.execute(
                "SELECT command_id, seed_id, blueprint_id, policy_version, start_epoch, epochs, loss_delta_sum, "
                "critical FROM windows WHERE run_id = ? AND start_epoch + epochs <= ?", (run_id, epoch),
            ).fetchall()
            reports = []
            for cmd, seed, bp, version, start, n, total, crit in done:
                outcome = (pb.FIELD_REPORT_OUTCOME_REGRESSION if crit or total > 0
                           else pb.FIELD_REPORT_OUTCOME_SUCCESS if total < 0 else pb.FIELD_REPORT_OUTCOME_NEUTRAL)
                report = pb.FieldReport(
                    version=1, report_id=f"fr-synth-{cmd}-{start}+{n}", command_id=cmd, training_run_id=run_id,
                    seed_id=seed, blueprint_id=bp, outcome=outcome, observation_window_epochs=n,
                    tamiyo_policy_version=version, metrics={"loss_delta_sum": total, "critical": float(crit)},
                )
                report.issued_at.FromMilliseconds(issued_at_ms)
                self.append(report)
                self._db.execute("DELETE FROM windows WHERE command_id = ?", (cmd,))
                reports.append(report)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return reports
