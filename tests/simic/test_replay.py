"""Simic's replay store: idempotent by report id, retention by issued_at, and fed from the bus."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.core.clock import now_ms
from esper.leyline import pb
from esper.oona import OonaSettings
from esper.simic.replay import MissingIssuedAtError, ReplayStore
from esper.simic.service import SimicService
from esper.simic.settings import SimicSettings
from tests.conftest import ClientFactory
from tests.oona._helpers import dead_letters, wait_until

HOUR = 3_600_000


def _report(rid: str, issued_at_ms: int | None, outcome: int = pb.FIELD_REPORT_OUTCOME_SUCCESS) -> pb.FieldReport:
    r = pb.FieldReport(version=1, report_id=rid, command_id=f"c-{rid}", training_run_id="run1", outcome=outcome,
                       tamiyo_policy_version="tamiyo_gnn_v1")
    r.metrics["loss_delta"] = -0.01
    if issued_at_ms is not None:
        r.issued_at.FromMilliseconds(issued_at_ms)
    return r


def test_idempotent_and_survives_reopen(tmp_path: Path) -> None:
    t = now_ms()
    with ReplayStore(tmp_path / "r.db") as store:
        assert store.add(_report("a", t)) is True
        changed = _report("a", t, outcome=pb.FIELD_REPORT_OUTCOME_REGRESSION)
        assert store.add(changed) is False  # the first copy wins
        assert store.add(_report("b", t + 1, outcome=pb.FIELD_REPORT_OUTCOME_NEUTRAL)) is True
    with ReplayStore(tmp_path / "r.db") as again:
        assert again.count() == 2
        assert again.outcomes() == {"SUCCESS": 1, "NEUTRAL": 1}
        assert [r.report_id for r in again.reports()] == ["a", "b"]
        assert again.reports()[0].metrics["loss_delta"] == pytest.approx(-0.01)


def test_latest_reports_and_the_count_of_new_ones(tmp_path: Path) -> None:
    t = now_ms()
    with ReplayStore(tmp_path / "r.db") as store:
        for i in range(5):
            store.add(_report(f"r{i}", t - 1000 + i))
        assert [r.report_id for r in store.latest(limit=3)] == ["r2", "r3", "r4"]  # newest three, oldest first
        assert store.count(received_since_ms=0) == 5
        assert store.count(received_since_ms=now_ms() + 1000) == 0  # nothing received since then


def test_retention_by_issued_at_and_missing_issued_at_refused(tmp_path: Path) -> None:
    t = now_ms()
    with ReplayStore(tmp_path / "r.db") as store:
        store.add(_report("old", t - 25 * HOUR))
        store.add(_report("new", t - 1 * HOUR))
        assert store.prune(now_ms=t, retention_hours=24) == 1
        assert [r.report_id for r in store.reports()] == ["new"]
        with pytest.raises(MissingIssuedAtError):
            store.add(_report("undated", None))
        with pytest.raises(MissingIssuedAtError):
            store.add(_report("", t))
        assert store.count() == 1


async def test_service_stores_reports_from_both_lanes(make_client: ClientFactory, settings: OonaSettings,
                                                      tmp_path: Path) -> None:
    tamiyo = await make_client("tamiyo")
    s = SimicSettings(**{**settings.model_dump(), "replay_path": tmp_path / "replay.db"})
    service = SimicService(s, registry=CollectorRegistry())
    await service.client.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(service.consumer.run(stop))
    try:
        t = now_ms()
        await tamiyo.publish("field_report", _report("r1", t))
        await tamiyo.publish("field_report", _report("r1", t))  # a redelivered duplicate
        await tamiyo.publish("field_report", _report("r2", t), priority=pb.MESSAGE_PRIORITY_HIGH)
        await tamiyo.publish("field_report", _report("undated", None))

        async def all_seen() -> bool:
            return sum(service.reports.labels(k)._value.get() for k in ("stored", "duplicate", "rejected")) == 4

        await wait_until(all_seen, what="four reports handled")
    finally:
        stop.set()
        await task
    assert service.store.count() == 2
    assert {k: service.reports.labels(k)._value.get() for k in ("stored", "duplicate", "rejected")} == {
        "stored": 2, "duplicate": 1, "rejected": 1}
    assert [reason for reason, _, _ in await dead_letters(tamiyo.redis)] == ["handler_rejected"]
    service.store.close()
    await service.client.close()
