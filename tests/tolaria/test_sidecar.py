"""The sidecar decision transport: real requests from a child process, and a child that dies."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from prometheus_client import CollectorRegistry

from esper.core.redis_server import EmbeddedRedis
from esper.leyline import pb
from esper.oona import OonaMetrics, OonaSettings
from esper.tamiyo.standin import sample_packet
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.sidecar import SidecarDecisionClient
from tests.conftest import ClientFactory
from tests.tamiyo._fleet import running_tamiyo, tamiyo_settings
from tests.tolaria._helpers import tolaria_events


def _settings(settings: OonaSettings, tmp_path: Path) -> TolariaSettings:
    return TolariaSettings(var_dir=tmp_path / "tolaria", redis_url=settings.redis_url,
                           leyline_secret=settings.leyline_secret, metrics_port=-1)


async def test_decisions_come_back_through_the_sidecar(settings: OonaSettings, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    client = SidecarDecisionClient(_settings(settings, tmp_path), budget_ms=2000.0, metrics=OonaMetrics(registry))
    async with running_tamiyo(tamiyo_settings(settings, tmp_path / "tamiyo")):
        await asyncio.to_thread(client.start)
        try:
            assert client.submit(sample_packet("sc-1", 1, run="sc"), 1)
            assert not client.submit(sample_packet("sc-2", 2, run="sc"), 2) or not client.busy  # one in flight
            decision = await asyncio.to_thread(client.wait)
            assert decision is not None and decision.step == 1 and decision.packet_id == "sc-1"
            assert decision.kind in ("command", "failure"), decision
            assert (decision.command or decision.failure) is not None
            # The child's round trip is on the trainer's /metrics, as the bus thread's would be.
            assert registry.get_sample_value("oona_request_seconds_count", {"channel": "state"}) == 1.0
        finally:
            await asyncio.to_thread(client.close)


async def test_a_dead_sidecar_is_an_error_decision_and_is_restarted(settings: OonaSettings, tmp_path: Path) -> None:
    """No Tamiyo answers, so the request stays in flight; the child is killed under it."""
    client = SidecarDecisionClient(_settings(settings, tmp_path), budget_ms=5000.0)
    await asyncio.to_thread(client.start)
    try:
        first = client.pid
        assert first is not None and client.submit(sample_packet("sc-1", 1, run="sc"), 1)
        await asyncio.sleep(0.2)
        assert client.busy and client.poll() is None
        os.kill(first, signal.SIGKILL)
        decision = await asyncio.to_thread(client.wait)  # the dead child's pipe reads EOF at once
        assert decision is not None and decision.kind == "error" and "sidecar died" in decision.detail
        assert decision.step == 1 and not client.busy
        # The next boundary starts a new child without waiting for it: nothing is sent (counted) until
        # it has connected, and training never stalls on the restart.
        assert not client.submit(sample_packet("sc-2", 2, run="sc"), 2)  # a blocking restart would have sent
        assert client.skipped_starting == 1
        assert client.restarts == 1 and client.pid not in (None, first)
        for step in range(3, 400):
            if client.submit(sample_packet(f"sc-{step}", step, run="sc"), step):
                break
            await asyncio.sleep(0.05)
        assert client.sent == 2 and client.skipped_starting >= 1
    finally:
        await asyncio.to_thread(client.close)


async def test_the_sidecar_reports_a_timeout_itself(settings: OonaSettings, tmp_path: Path,
                                                    make_client: ClientFactory) -> None:
    """No Tamiyo: the request runs out; the child publishes the HIGH `tamiyo_timeout` event (emergency
    lane) before handing the outcome back marked so, and the trainer does not publish it again."""
    client = SidecarDecisionClient(_settings(settings, tmp_path), budget_ms=50.0)
    await asyncio.to_thread(client.start)
    try:
        assert client.submit(sample_packet("sc-7", 7, run="sc"), 7)
        decision = await asyncio.to_thread(client.wait)
    finally:
        await asyncio.to_thread(client.close)
    assert decision is not None and decision.kind == "timeout" and decision.timeout_event == "published"
    events = await tolaria_events(make_client)
    assert events == [(pb.MESSAGE_PRIORITY_HIGH, "emergency",
                       {"event": "tamiyo_timeout", "step_index": "7", "packet_id": "sc-7"})]


async def test_a_stalled_redis_does_not_hold_the_sidecar_in_the_timeout_event(tmp_path: Path) -> None:
    """Redis stalls (SIGSTOP): the request times out at its budget, and the event's publish would hang
    for its socket timeout (8 s with redis-py's retries), past a sync trainer's whole wait: each
    outage timeout then came back seconds late, uncounted. The child gives up on the event quickly and
    hands it to the trainer (`timeout_event` empty)."""
    server = EmbeddedRedis()
    server.start()
    ts = TolariaSettings(var_dir=tmp_path / "tolaria", redis_url=server.url, leyline_secret="s" * 32,
                         metrics_port=-1, socket_timeout_s=2.0)
    client = SidecarDecisionClient(ts, budget_ms=20.0)
    await asyncio.to_thread(client.start)
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert client.submit(sample_packet("sc-9", 9, run="sc"), 9)
        decision = await asyncio.to_thread(client.wait)  # budget + 1 s margin: the child must answer in it
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await asyncio.to_thread(client.close)
        server.stop()
    assert decision is not None and (decision.kind, decision.timeout_event) == ("timeout", "")


async def test_a_timeout_event_over_the_emergency_cap_is_refused_and_counted(
        settings: OonaSettings, tmp_path: Path, make_client: ClientFactory) -> None:
    """The child's emergency bucket holds one event: the second timeout's event is refused there, not
    handed to the trainer (which would double the cap), and counted on the trainer's metrics."""
    registry = CollectorRegistry()
    ts = _settings(settings, tmp_path).model_copy(update={"emergency_max_per_min": 1})
    client = SidecarDecisionClient(ts, budget_ms=50.0, metrics=OonaMetrics(registry))
    await asyncio.to_thread(client.start)
    try:
        outcomes = []
        for step in (1, 2):
            assert client.submit(sample_packet(f"sc-{step}", step, run="sc"), step)
            decision = await asyncio.to_thread(client.wait)
            assert decision is not None and decision.kind == "timeout"
            outcomes.append(decision.timeout_event)
    finally:
        await asyncio.to_thread(client.close)
    assert outcomes == ["published", "rate_limited"]
    assert registry.get_sample_value("oona_emergency_rate_limited_total", {"channel": "telemetry"}) == 1.0
    assert [e["packet_id"] for _p, _lane, e in await tolaria_events(make_client)] == ["sc-1"]
