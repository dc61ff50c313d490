"""Builders for Leyline telemetry and the event → message-priority rule.

Priority decides the lane (ARCHITECTURE §4, §6): HIGH and CRITICAL ride the emergency lane, so the
rule lives here once instead of in every service that emits telemetry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping

from esper.leyline._generated import leyline_pb2 as pb

__all__ = [
    "HIGH_PRIORITY_EVENTS",
    "build_event",
    "build_metric",
    "build_telemetry_packet",
    "event_name",
    "event_priority",
    "packet_priority",
    "parse_priority",
]

HIGH_PRIORITY_EVENTS: frozenset[str] = frozenset(
    {
        # The prototype's HIGH reason list (REFERENCE_PROTOTYPE §6.4) ...
        "timeout_inference",
        "timeout_urza",
        "step_latency_high",
        "loss_spike",
        "isolation_violations",
        "hook_budget",
        "policy_risk_critical",
        "bp_quarantine",
        "device_pressure_high",
        "cpu_pressure_high",
        # ... the singular spelling Kasmina uses, and fleet events whose loss stalls training.
        "isolation_violation",
        "tamiyo_timeout",
        "rollback_deadline",
        # Bus events: forged traffic and a tripped bus breaker need an operator now.
        "oona.dead_letter.bad_signature",
        "oona.breaker_open",
    }
)
"""Event names that turn a WARNING or ERROR event into a HIGH priority message."""

PRIORITY_INDICATOR = "priority"
"""``SystemHealth.indicators`` key holding the packet's priority as a ``MessagePriority`` name."""

_PRIORITY_PREFIX = "MESSAGE_PRIORITY_"
_WARNING_LEVELS = frozenset({pb.TELEMETRY_LEVEL_WARNING, pb.TELEMETRY_LEVEL_ERROR})


def event_priority(level: int, name: str) -> int:
    """``MessagePriority`` of one event: CRITICAL level → CRITICAL; listed WARNING/ERROR → HIGH; else NORMAL."""
    if level == pb.TELEMETRY_LEVEL_CRITICAL:
        return pb.MESSAGE_PRIORITY_CRITICAL
    if level in _WARNING_LEVELS and name in HIGH_PRIORITY_EVENTS:
        return pb.MESSAGE_PRIORITY_HIGH
    return pb.MESSAGE_PRIORITY_NORMAL


def event_name(event: pb.TelemetryEvent) -> str:
    """The event's name: ``attributes["event"]`` as set by :func:`build_event`, else its description."""
    return event.attributes.get("event") or event.description


def parse_priority(text: str) -> int | None:
    """``MessagePriority`` from ``"MESSAGE_PRIORITY_HIGH"`` or ``"high"``; None if unknown or unspecified."""
    name = text.strip().upper()
    if not name.startswith(_PRIORITY_PREFIX):
        name = _PRIORITY_PREFIX + name
    try:
        value = pb.MessagePriority.Value(name)
    except ValueError:
        return None
    return value if value != pb.MESSAGE_PRIORITY_UNSPECIFIED else None


def _events_priority(events: Iterable[pb.TelemetryEvent]) -> int:
    return max((event_priority(e.level, event_name(e)) for e in events), default=pb.MESSAGE_PRIORITY_NORMAL)


def packet_priority(packet: pb.TelemetryPacket) -> int:
    """Priority of a packet: its explicit ``priority`` indicator if valid, else the max over its events.

    An unparsable indicator falls back to the computed value: it came over the wire, and routing
    must not fail on it (the sender's events still decide).
    """
    explicit = packet.system_health.indicators.get(PRIORITY_INDICATOR)
    if explicit:
        parsed = parse_priority(explicit)
        if parsed is not None:
            return parsed
    return _events_priority(packet.events)


def _stringify(attributes: Mapping[str, object]) -> dict[str, str]:
    return {key: str(value) for key, value in attributes.items()}


def build_event(
    name: str, *, level: int = pb.TELEMETRY_LEVEL_INFO, description: str = "", **attributes: object
) -> pb.TelemetryEvent:
    """A ``TelemetryEvent`` with a fresh id; ``name`` goes to ``attributes["event"]``, values become strings."""
    attrs = _stringify(attributes)
    attrs["event"] = name
    return pb.TelemetryEvent(
        event_id=uuid.uuid4().hex,
        description=description or name,
        level=pb.TelemetryLevel.ValueType(level),
        attributes=attrs,
    )


def build_metric(name: str, value: float, *, unit: str = "", **attributes: object) -> pb.MetricPoint:
    """A ``MetricPoint``; attribute values become strings."""
    return pb.MetricPoint(name=name, value=value, unit=unit, attributes=_stringify(attributes))


def _derive_health(events: list[pb.TelemetryEvent]) -> int:
    levels = {e.level for e in events}
    if pb.TELEMETRY_LEVEL_CRITICAL in levels:
        return pb.HEALTH_STATUS_CRITICAL
    if levels & _WARNING_LEVELS:
        return pb.HEALTH_STATUS_DEGRADED
    return pb.HEALTH_STATUS_HEALTHY


def build_telemetry_packet(
    source: str,
    *,
    events: Iterable[pb.TelemetryEvent] = (),
    metrics: Iterable[pb.MetricPoint] = (),
    health_status: int | None = None,
    summary: str = "",
    indicators: Mapping[str, str] | None = None,
) -> pb.TelemetryPacket:
    """A ``TelemetryPacket`` stamped now, with level, health and ``priority`` indicator derived from events.

    Level is the highest event level (INFO if none). Health, unless given, is CRITICAL on a
    CRITICAL event, DEGRADED on a WARNING/ERROR event, else HEALTHY. An explicit ``priority``
    indicator is kept; otherwise the computed priority is recorded there.
    """
    event_list = list(events)
    all_indicators = dict(indicators or {})
    all_indicators.setdefault(
        PRIORITY_INDICATOR, pb.MessagePriority.Name(pb.MessagePriority.ValueType(_events_priority(event_list)))
    )
    status = _derive_health(event_list) if health_status is None else health_status
    level = max((e.level for e in event_list), default=pb.TELEMETRY_LEVEL_INFO)
    packet = pb.TelemetryPacket(
        packet_id=uuid.uuid4().hex,
        source_subsystem=source,
        level=level,
        metrics=list(metrics),
        events=event_list,
        system_health=pb.SystemHealth(
            status=pb.HealthStatus.ValueType(status), summary=summary, indicators=all_indicators
        ),
    )
    packet.timestamp.FromNanoseconds(time.time_ns())
    return packet
