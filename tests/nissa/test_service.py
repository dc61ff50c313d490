"""NissaService end to end on a real Redis: signed telemetry and field reports in, /metrics and
/alerts out over HTTP; malformed input dead-lettered while the service keeps working."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from esper.core.clock import now_ms
from esper.core.health_server import HealthServer
from esper.core.telemetry import build_telemetry_packet, packet_priority
from esper.leyline import CHANNELS, DEADLETTER_STREAM, encode_envelope, pack, pb, sign_envelope
from esper.nissa.service import NissaService
from esper.nissa.settings import NissaSettings
from esper.oona import OonaClient, OonaSettings

from ._packets import decision, field_report, finding, kasmina_census, tolaria_epoch

ClientFactory = Callable[..., Awaitable[OonaClient]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Running:
    service: NissaService
    http: HealthServer

    async def get(self, path: str) -> tuple[int, bytes]:
        def fetch() -> tuple[int, bytes]:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http.port}{path}", timeout=5) as r:
                return r.status, r.read()

        return await asyncio.to_thread(fetch)

    async def metrics(self) -> Samples:
        _, body = await self.get("/metrics")
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    async def metric(self, name: str, **labels: str) -> float | None:
        return (await self.metrics()).get((name, frozenset(labels.items())))

    async def alerts(self) -> list[dict[str, object]]:
        status, body = await self.get("/alerts")
        assert status == 200
        alerts: list[dict[str, object]] = json.loads(body)
        return alerts


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Poll until `check()` holds; the timeout only bounds a failing test."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 (the condition lives behind HTTP: nothing to wait on)
            await asyncio.sleep(0.02)


@pytest.fixture
async def nissa(settings: OonaSettings) -> AsyncIterator[Running]:
    s = NissaSettings(**{**settings.model_dump(), "service_name": "nissa", "metrics_port": 0,
                         "eval_interval_s": 0.05})  # ticks run often; no timeouts or emergencies to rate here
    service = NissaService(s)
    await service.client.connect()
    http = HealthServer(service.registry, service.health, routes=service.routes())
    await http.start()
    stop = asyncio.Event()
    for consumer in (service.telemetry, service.field_reports):
        await consumer.start()  # groups exist before anything is published
    tasks = [asyncio.create_task(c) for c in (service.telemetry.run(stop), service.field_reports.run(stop),
                                              service.evaluate(stop))]
    try:
        yield Running(service, http)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await http.stop()
        await service.client.close()


async def publish(client: OonaClient, packet: pb.TelemetryPacket) -> None:
    await client.publish("telemetry", packet, priority=packet_priority(packet))  # type: ignore[arg-type]


async def test_telemetry_and_field_reports_to_metrics_and_alerts(nissa: Running, make_client: ClientFactory) -> None:
    tamiyo, tolaria = await make_client("tamiyo"), await make_client("tolaria")
    for step in (1, 2, 3):
        await publish(tamiyo, decision(step, coverage=0.5, inference_ms=1.5))

    async def three_decisions() -> bool:
        return await nissa.metric("esper_decisions_total", action="seed") == 3

    await until(three_decisions)  # the emergency lane is read first: keep the decisions in order
    critical = decision(4, coverage=0.5, command=pb.COMMAND_PAUSE, findings=(finding("bsds_hazard_critical"),))
    await publish(tamiyo, critical)  # CRITICAL: rides the emergency lane
    await publish(tolaria, tolaria_epoch(4, accuracy=0.875, val_loss=0.25))
    await publish(tolaria, kasmina_census({"s0": (pb.SEED_STAGE_TRAINING, 0.0), "s1": (pb.SEED_STAGE_DORMANT, 0.0)}))
    await tamiyo.publish("field_report", field_report("r1", pb.FIELD_REPORT_OUTCOME_SUCCESS))
    await tamiyo.publish("field_report", field_report("r2", pb.FIELD_REPORT_OUTCOME_REGRESSION))

    async def both_alerts_firing() -> bool:
        return {a["alert"] for a in await nissa.alerts()} == {"tamiyo_coverage_low", "tamiyo_bsds_critical"}

    await until(both_alerts_firing)
    alerts = {a["alert"]: a for a in await nissa.alerts()}
    coverage = alerts["tamiyo_coverage_low"]
    assert (coverage["severity"], coverage["routes"], coverage["value"]) == ("warning", ["slack"], 0.5)
    assert isinstance(coverage["since_ms"], int) and coverage["since_ms"] <= now_ms()
    assert alerts["tamiyo_bsds_critical"]["routes"] == ["pagerduty"]

    async def settled() -> bool:  # field reports counted, Nissa's own two alert events came back round the bus
        m = await nissa.metrics()
        own = ("esper_telemetry_events_total",
               frozenset({"source": "nissa", "event": "nissa.alert_fired", "level": "warning"}.items()))
        return m.get(("esper_field_reports_total", frozenset({"outcome": "regression"}.items()))) == 1 \
            and m.get(own) == 2

    await until(settled)
    m = nissa.metric
    assert await m("esper_field_reports_total", outcome="success") == 1
    assert await m("esper_telemetry_packets_total", source="tamiyo") == 4
    assert await m("esper_telemetry_packets_total", source="tolaria") == 1
    assert await m("esper_telemetry_packets_total", source="kasmina") == 1
    assert await m("esper_decisions_total", action="seed") == 3
    assert await m("esper_decisions_total", action="pause") == 1
    assert await m("esper_decision_latency_seconds_count") == 4
    assert await m("esper_decision_latency_seconds_bucket", le="0.002") == 4
    assert await m("esper_feature_coverage") == 0.5
    assert await m("esper_training_epoch") == 4
    assert await m("esper_training_accuracy") == 0.875
    assert await m("esper_training_validation_loss") == 0.25
    assert await m("esper_seeds", stage="training") == 1
    assert await m("esper_seeds", stage="dormant") == 1
    assert await m("esper_emergency_events_total", level="critical") == 1
    assert await m("esper_alert_firing", alert="tamiyo_coverage_low", severity="warning") == 1
    assert await m("esper_alerts_fired_total", alert="tamiyo_bsds_critical") == 1
    assert await m("esper_slo_burn_rate", slo="decision_deadline") == 0
    assert await m("esper_nissa_ingest_errors_total", reason="missing_source") is None  # nothing refused
    status, body = await nissa.get("/healthz")
    health = json.loads(body)
    assert status == 200 and set(health["alerts_firing"]) == {"tamiyo_coverage_low", "tamiyo_bsds_critical"}


async def test_malformed_input_is_dead_lettered_and_service_keeps_working(
    nissa: Running, make_client: ClientFactory
) -> None:
    tolaria = await make_client("tolaria")
    # 1. A correctly signed envelope whose TelemetryPacket payload does not parse.
    env = pack(tolaria_epoch(1), sender="tolaria", issued_at_ms=now_ms())
    env.payload = b"\xff\xff\xff\xff"
    raw = encode_envelope(sign_envelope(env, tolaria.keys))
    await tolaria.publish_raw(CHANNELS["telemetry"].stream("normal"), {b"payload": raw})
    # 2. A valid packet nobody can be attributed to.
    await publish(tolaria, build_telemetry_packet(""))
    # 3. A packet signed with the wrong key.
    forger = await make_client("tolaria", leyline_secret=SecretStr("not-the-fleet-key"))
    await publish(forger, tolaria_epoch(2))
    # 4. A good packet after all of them.
    await publish(tolaria, tolaria_epoch(7))

    async def processed() -> bool:
        return await nissa.metric("esper_training_epoch") == 7

    await until(processed)
    m = nissa.metric
    assert await m("esper_nissa_ingest_errors_total", reason="undecodable") == 1
    assert await m("esper_nissa_ingest_errors_total", reason="missing_source") == 1
    assert await m("esper_nissa_ingest_errors_total", reason="bad_signature") == 1
    assert nissa.service.telemetry.stats.dead_lettered == 3
    rows: list[tuple[bytes, dict[bytes, bytes]]] = await tolaria.redis.xrange(DEADLETTER_STREAM)  # type: ignore[assignment]
    assert sorted(fields[b"reason"] for _, fields in rows) == [b"bad_signature", b"handler_rejected", b"undecodable"]

    async def dead_letter_events_counted() -> bool:  # the bus reports each dead letter as telemetry from nissa
        return await m("esper_dead_letters_total", source="nissa") == 3

    await until(dead_letter_events_counted)
    assert await m("esper_telemetry_packets_total", source="tolaria") == 1  # only the good one
