"""Event priority mapping and telemetry packet builders."""

from __future__ import annotations

import time

import pytest

from esper.core.telemetry import (
    HIGH_PRIORITY_EVENTS,
    build_event,
    build_metric,
    build_telemetry_packet,
    event_name,
    event_priority,
    packet_priority,
    parse_priority,
)
from esper.leyline._generated import leyline_pb2 as pb

INFO, WARNING, ERROR, CRITICAL = (
    pb.TELEMETRY_LEVEL_INFO,
    pb.TELEMETRY_LEVEL_WARNING,
    pb.TELEMETRY_LEVEL_ERROR,
    pb.TELEMETRY_LEVEL_CRITICAL,
)


def test_high_priority_list_matches_prototype_and_bus_events() -> None:
    assert {
        "timeout_inference",
        "timeout_urza",
        "step_latency_high",
        "loss_spike",
        "isolation_violations",
        "isolation_violation",
        "hook_budget",
        "policy_risk_critical",
        "bp_quarantine",
        "device_pressure_high",
        "cpu_pressure_high",
        "tamiyo_timeout",
        "rollback_deadline",
        "oona.dead_letter.bad_signature",
        "oona.breaker_open",
    } == HIGH_PRIORITY_EVENTS


@pytest.mark.parametrize("name", ["anything", "loss_spike", ""])
def test_critical_level_is_critical_priority(name: str) -> None:
    assert event_priority(CRITICAL, name) == pb.MESSAGE_PRIORITY_CRITICAL


@pytest.mark.parametrize("level", [WARNING, ERROR])
@pytest.mark.parametrize("name", sorted(HIGH_PRIORITY_EVENTS))
def test_listed_warning_and_error_events_are_high(level: int, name: str) -> None:
    assert event_priority(level, name) == pb.MESSAGE_PRIORITY_HIGH


@pytest.mark.parametrize(
    ("level", "name"),
    [(INFO, "loss_spike"), (pb.TELEMETRY_LEVEL_UNSPECIFIED, "loss_spike"), (WARNING, "seed_germinated"), (ERROR, "")],
)
def test_everything_else_is_normal(level: int, name: str) -> None:
    assert event_priority(level, name) == pb.MESSAGE_PRIORITY_NORMAL


def test_build_event_fields() -> None:
    event = build_event("loss_spike", level=WARNING, delta=0.2, step=7, seed=None)
    assert event.level == WARNING
    assert event.description == "loss_spike"
    assert dict(event.attributes) == {"event": "loss_spike", "delta": "0.2", "step": "7", "seed": "None"}
    assert len(event.event_id) == 32
    assert event.event_id != build_event("loss_spike").event_id
    assert event_name(event) == "loss_spike"


def test_event_name_falls_back_to_description() -> None:
    assert event_name(pb.TelemetryEvent(description="raw")) == "raw"
    assert build_event("x", description="human words").description == "human words"
    assert event_name(build_event("x", description="human words")) == "x"


def test_build_metric() -> None:
    metric = build_metric("tamiyo.inference.latency_ms", 1.25, unit="ms", replica=2)
    assert (metric.name, metric.value, metric.unit) == ("tamiyo.inference.latency_ms", 1.25, "ms")
    assert dict(metric.attributes) == {"replica": "2"}


def _priority_indicator(packet: pb.TelemetryPacket) -> str:
    return packet.system_health.indicators["priority"]


def test_empty_packet_is_healthy_info_normal() -> None:
    before_ns = time.time_ns()
    packet = build_telemetry_packet("tamiyo")
    assert packet.source_subsystem == "tamiyo"
    assert len(packet.packet_id) == 32
    assert packet.level == INFO
    assert packet.system_health.status == pb.HEALTH_STATUS_HEALTHY
    assert _priority_indicator(packet) == "MESSAGE_PRIORITY_NORMAL"
    assert packet_priority(packet) == pb.MESSAGE_PRIORITY_NORMAL
    assert packet.timestamp.ToNanoseconds() >= before_ns


@pytest.mark.parametrize(
    ("events", "health", "level", "priority"),
    [
        ([build_event("seed_germinated")], pb.HEALTH_STATUS_HEALTHY, INFO, "MESSAGE_PRIORITY_NORMAL"),
        ([build_event("slow", level=WARNING)], pb.HEALTH_STATUS_DEGRADED, WARNING, "MESSAGE_PRIORITY_NORMAL"),
        ([build_event("loss_spike", level=ERROR)], pb.HEALTH_STATUS_DEGRADED, ERROR, "MESSAGE_PRIORITY_HIGH"),
        (
            [build_event("loss_spike", level=WARNING), build_event("nan", level=CRITICAL), build_event("ok")],
            pb.HEALTH_STATUS_CRITICAL,
            CRITICAL,
            "MESSAGE_PRIORITY_CRITICAL",
        ),
    ],
)
def test_packet_derives_health_level_priority(
    events: list[pb.TelemetryEvent], health: int, level: int, priority: str
) -> None:
    packet = build_telemetry_packet("tolaria", events=events, metrics=[build_metric("loss", 0.5)])
    assert packet.system_health.status == health
    assert packet.level == level
    assert _priority_indicator(packet) == priority
    assert packet_priority(packet) == pb.MessagePriority.Value(priority)
    assert len(packet.events) == len(events)
    assert packet.metrics[0].name == "loss"


def test_explicit_health_summary_and_indicators_are_kept() -> None:
    packet = build_telemetry_packet(
        "tamiyo",
        events=[build_event("pause", level=WARNING)],
        health_status=pb.HEALTH_STATUS_UNHEALTHY,
        summary="paused",
        indicators={"priority": "MESSAGE_PRIORITY_CRITICAL", "mode": "conservative"},
    )
    assert packet.system_health.status == pb.HEALTH_STATUS_UNHEALTHY
    assert packet.system_health.summary == "paused"
    assert dict(packet.system_health.indicators) == {"priority": "MESSAGE_PRIORITY_CRITICAL", "mode": "conservative"}
    assert packet_priority(packet) == pb.MESSAGE_PRIORITY_CRITICAL


def test_packet_priority_without_indicator_uses_events() -> None:
    packet = pb.TelemetryPacket(events=[build_event("hook_budget", level=WARNING), build_event("x")])
    assert packet_priority(packet) == pb.MESSAGE_PRIORITY_HIGH
    assert packet_priority(pb.TelemetryPacket()) == pb.MESSAGE_PRIORITY_NORMAL


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MESSAGE_PRIORITY_HIGH", pb.MESSAGE_PRIORITY_HIGH),
        ("high", pb.MESSAGE_PRIORITY_HIGH),
        (" critical ", pb.MESSAGE_PRIORITY_CRITICAL),
        ("LOW", pb.MESSAGE_PRIORITY_LOW),
        ("MESSAGE_PRIORITY_UNSPECIFIED", None),
        ("urgent", None),
        ("", None),
    ],
)
def test_parse_priority(text: str, expected: int | None) -> None:
    assert parse_priority(text) == expected


def test_unparsable_indicator_falls_back_to_events() -> None:
    packet = build_telemetry_packet("x", events=[build_event("nan", level=CRITICAL)], indicators={"priority": "urgent"})
    assert packet_priority(packet) == pb.MESSAGE_PRIORITY_CRITICAL


def test_packet_survives_the_wire() -> None:
    packet = build_telemetry_packet("kasmina", events=[build_event("isolation_violation", level=ERROR, seed="s1")])
    decoded = pb.TelemetryPacket.FromString(packet.SerializeToString())
    assert decoded == packet
    assert packet_priority(decoded) == pb.MESSAGE_PRIORITY_HIGH
    assert event_name(decoded.events[0]) == "isolation_violation"
