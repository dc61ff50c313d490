"""The replay store: every field report Simic has seen, once, in SQLite (WAL, `synchronous=FULL`).

Idempotent by `report_id` (at-least-once delivery repeats reports; the first copy wins), retention by
the report's own `issued_at` (never by arrival time, and never invented: a report without one is
refused with `MissingIssuedAtError`). The report is kept whole (serialised `FieldReport`) beside the
columns training selects on. Thread-safe: one connection behind a lock (the service calls it from a
worker thread).
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from pathlib import Path

from esper.core.clock import now_ms
from esper.core.errors import EsperError
from esper.leyline import pb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY,
    training_run_id TEXT NOT NULL,
    command_id TEXT NOT NULL,
    seed_id TEXT NOT NULL,
    blueprint_id TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    policy_version TEXT NOT NULL,
    issued_at_ms INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    report BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_issued ON reports (issued_at_ms);
CREATE INDEX IF NOT EXISTS reports_received ON reports (received_at_ms);
"""


class MissingIssuedAtError(EsperError, ValueError):
    """A report without `issued_at` (or without `report_id`): retention could not place it."""


class ReplayStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, report: pb.FieldReport) -> bool:
        """Store `report`; False when a report with its id is already there (nothing changes)."""
        if not report.report_id:
            raise MissingIssuedAtError("field report without report_id")
        if not report.HasField("issued_at") or report.issued_at.ToMilliseconds() <= 0:
            raise MissingIssuedAtError(f"field report {report.report_id!r} has no issued_at")
        row = (report.report_id, report.training_run_id, report.command_id, report.seed_id, report.blueprint_id,
               int(report.outcome), report.tamiyo_policy_version, report.issued_at.ToMilliseconds(), now_ms(),
               report.SerializeToString(deterministic=True))
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return cur.rowcount == 1

    def prune(self, *, now_ms: int, retention_hours: float) -> int:
        """Delete reports issued more than `retention_hours` before `now_ms`; returns how many."""
        cutoff = now_ms - int(retention_hours * 3_600_000)
        with self._lock:
            return self._db.execute("DELETE FROM reports WHERE issued_at_ms < ?", (cutoff,)).rowcount

    def count(self, *, received_since_ms: int = 0) -> int:
        """Stored reports (received at or after `received_since_ms`: the new ones since a round)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM reports WHERE received_at_ms >= ?",
                                        (received_since_ms,)).fetchone()[0])

    def outcomes(self) -> Counter[str]:
        with self._lock:
            rows = self._db.execute("SELECT outcome, COUNT(*) FROM reports GROUP BY outcome").fetchall()
        return Counter({pb.FieldReportOutcome.Name(o).removeprefix("FIELD_REPORT_OUTCOME_"): n for o, n in rows})

    def reports(self, *, since_ms: int = 0, limit: int = 10_000) -> list[pb.FieldReport]:
        """Stored reports issued at or after `since_ms`, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT report FROM reports WHERE issued_at_ms >= ? ORDER BY issued_at_ms, "
                                    "report_id LIMIT ?", (since_ms, limit)).fetchall()
        return [pb.FieldReport.FromString(blob) for (blob,) in rows]

    def latest(self, *, limit: int) -> list[pb.FieldReport]:
        """The `limit` most recently issued reports, oldest first (a round learns from the newest)."""
        with self._lock:
            rows = self._db.execute("SELECT report FROM (SELECT report, issued_at_ms, report_id FROM reports "
                                    "ORDER BY issued_at_ms DESC, report_id DESC LIMIT ?) "
                                    "ORDER BY issued_at_ms, report_id", (limit,)).fetchall()
        return [pb.FieldReport.FromString(blob) for (blob,) in rows]
