"""Leyline telemetry → what Nissa records: plain functions over protobuf messages, no IO.

:func:`map_telemetry` reads one ``TelemetryPacket`` (and the lane it arrived on) and returns a
:class:`TelemetryUpdate`: counter increments, gauge values, the seed census, the decision it reports,
breaker states, step progress and the samples the alert rules evaluate. Applying it to Prometheus,
SLO windows and the alert engine is :mod:`esper.nissa.ingest`'s job, so every mapping rule is
testable on real packets without a registry or a bus.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from esper.core.telemetry import event_name, packet_priority
from esper.leyline import Lane, pb
from esper.nissa.errors import MalformedTelemetryError
from esper.nissa.labels import EVENTS, OTHER, SOURCES, UNKNOWN, bounded, enum_label

__all__ = [
    "ACTIONS",
    "GAUGE_SOURCES",
    "DecisionView",
    "TelemetryUpdate",
    "breaker_key",
    "field_report_outcome",
    "map_telemetry",
    "validate_packet",
]

GAUGE_SOURCES: Final[Mapping[str, str]] = {
    "tolaria.epochs.total": "training_epoch",  # Tolaria sends the current epoch number under this name
    "tolaria.training.accuracy": "training_accuracy",
    "tolaria.training.validation_loss": "training_validation_loss",
    "tolaria.training.loss": "training_loss",  # mean training loss of the epoch
    "tamiyo.gnn.feature_coverage": "feature_coverage",
}
"""Telemetry metric name → gauge key (see :class:`esper.nissa.metrics.NissaMetrics`)."""

ACTIONS: Final[frozenset[str]] = frozenset(
    {"seed", "rollback", "optimizer", "circuit_breaker", "pause", "emergency", "structural_pruning", "unknown",
     "failure"})
"""``esper_decisions_total`` action labels: the CommandType of a command, or ``failure`` (DecisionFailure)."""

EVENT_TAMIYO_TIMEOUT: Final = "tamiyo_timeout"  # Tolaria: no reply within the step budget
EVENT_TIMEOUT_INFERENCE: Final = "timeout_inference"  # Tamiyo: inference missed its budget, failure sent
DEAD_LETTER_EVENTS: Final = frozenset({"oona.dead_letter", "oona.dead_letter.bad_signature"})
ESCALATION_EVENTS: Final = frozenset({"tolaria.emergency.escalated", "tolaria.emergency.halt"})
STEP_EMERGENCY_EVENTS: Final = frozenset({"step_failure", "loss_spike"})  # each escalates Tolaria's emergency level
BREAKER_OPEN_EVENTS: Final[Mapping[str, str]] = {"inference_breaker_open": "tamiyo.inference"}
BSDS_CRITICAL_EVENTS: Final = frozenset({"bsds_hazard_critical", "bsds_handling_quarantine"})
BSDS_HIGH_EVENTS: Final = frozenset({"bsds_hazard_high"})
ELEVATED_BLUEPRINT_RISK: Final = 0.8  # prototype: tamiyo.bsds.elevated_risk_flag is risk >= 0.8

# Derived alert samples (the prototype's per-decision flags, rebuilt from today's events).
SIGNAL_BSDS_CRITICAL: Final = "tamiyo.bsds.hazard_critical_signal"
SIGNAL_BSDS_HIGH: Final = "tamiyo.bsds.hazard_high_signal"
SIGNAL_ELEVATED_RISK: Final = "tamiyo.bsds.elevated_risk_flag"

_BREAKER_METRIC = re.compile(r"^(?P<owner>[a-z0-9_]+)\.breaker\.(?:(?P<name>[a-z0-9_]+)_)?state$")
_EMERGENCY_PRIORITIES: Final[Mapping[int, str]] = {
    pb.MESSAGE_PRIORITY_HIGH: "high", pb.MESSAGE_PRIORITY_CRITICAL: "critical",
}


@dataclass(frozen=True, slots=True)
class DecisionView:
    """One Tamiyo decision as its telemetry packet reports it."""

    action: str
    inference_latency_s: float | None  # only command packets carry tamiyo.inference.latency_ms


@dataclass(frozen=True, slots=True)
class TelemetryUpdate:
    """Everything one packet contributes. ``own`` packets (Nissa's alert events) feed counters only."""

    source: str
    own: bool = False
    events: tuple[tuple[str, str], ...] = ()  # (event label, level label) per event
    gauges: Mapping[str, float] = field(default_factory=dict)
    seeds_by_stage: Mapping[str, int] | None = None  # a full census (Kasmina's packet), else None
    seed_alpha: Mapping[str, float] = field(default_factory=dict)
    decision: DecisionView | None = None
    tamiyo_timeouts: int = 0
    inference_timeouts: int = 0
    dead_letters: int = 0
    emergencies: tuple[str, ...] = ()  # level label per emergency occurrence
    isolation_violations: int = 0
    seeds_fossilized: int = 0
    seeds_culled: int = 0
    step_emergencies: int = 0
    breakers: Mapping[str, int] = field(default_factory=dict)  # breaker key → CircuitBreakerState
    step: tuple[str, int] | None = None  # (training run id, global step) of a decision
    samples: tuple[tuple[str, float], ...] = ()  # alert rule inputs: metric points + derived signals


def validate_packet(packet: pb.TelemetryPacket) -> None:
    """Raise :class:`MalformedTelemetryError` for a packet that cannot be attributed to a sender."""
    if not packet.source_subsystem.strip():
        raise MalformedTelemetryError("missing_source", f"packet {packet.packet_id[:64]!r} has no source_subsystem")


def breaker_key(metric_name: str) -> str | None:
    """``kasmina.breaker.state`` → ``kasmina``; ``tamiyo.breaker.inference_state`` → ``tamiyo.inference``;
    other names → None."""
    m = _BREAKER_METRIC.match(metric_name)
    if m is None:
        return None
    return m["owner"] if m["name"] is None else f"{m['owner']}.{m['name']}"


def field_report_outcome(report: pb.FieldReport) -> str:
    """``FIELD_REPORT_OUTCOME_SUCCESS`` → ``success``."""
    return enum_label(pb.FieldReportOutcome.DESCRIPTOR, report.outcome, "FIELD_REPORT_OUTCOME_")


def map_telemetry(packet: pb.TelemetryPacket, *, lane: Lane = "normal", own_source: str = "nissa") -> TelemetryUpdate:
    """The :class:`TelemetryUpdate` of one validated packet that arrived on ``lane``."""
    validate_packet(packet)
    source = packet.source_subsystem
    names = [event_name(e) for e in packet.events]
    counts = Counter(names)
    events = tuple((bounded(n, EVENTS), enum_label(pb.TelemetryLevel.DESCRIPTOR, e.level, "TELEMETRY_LEVEL_"))
                   for n, e in zip(names, packet.events, strict=True))
    label = bounded(source, SOURCES)
    dead_letters = sum(counts[n] for n in DEAD_LETTER_EVENTS)
    if source == own_source:
        return TelemetryUpdate(label, own=True, events=events, dead_letters=dead_letters)
    metrics = {p.name: p.value for p in packet.metrics}
    census, alpha = _seed_census(packet)
    decision = _decision(packet, metrics)
    return TelemetryUpdate(
        label,
        events=events,
        dead_letters=dead_letters,
        gauges={key: metrics[name] for name, key in GAUGE_SOURCES.items() if name in metrics},
        seeds_by_stage=census,
        seed_alpha=alpha,
        decision=decision,
        tamiyo_timeouts=counts[EVENT_TAMIYO_TIMEOUT],
        inference_timeouts=counts[EVENT_TIMEOUT_INFERENCE],
        emergencies=_emergencies(packet, lane, names),
        isolation_violations=counts["isolation_violation"],
        seeds_fossilized=counts["seed_fossilized"],
        seeds_culled=counts["seed_culled"],
        step_emergencies=sum(counts[n] for n in STEP_EMERGENCY_EVENTS),
        breakers=_breakers(packet, names),
        step=_step(packet) if decision is not None else None,
        samples=_samples(packet, metrics, decision, counts),
    )


def _seed_census(packet: pb.TelemetryPacket) -> tuple[dict[str, int] | None, dict[str, float]]:
    """Seeds by stage and alpha by seed, from Kasmina's packet (it lists every slot each time; the
    global ``kasmina.seeds.active`` point marks a complete census, possibly of zero seeds)."""
    if not any(p.name == "kasmina.seeds.active" for p in packet.metrics):
        return None, {}
    stages: Counter[str] = Counter()
    alpha: dict[str, float] = {}
    for p in packet.metrics:
        seed_id = p.attributes.get("seed_id", "")
        if not seed_id:
            continue
        if p.name == "kasmina.seed.stage" and math.isfinite(p.value):
            stages[enum_label(pb.SeedLifecycleStage.DESCRIPTOR, int(p.value), "SEED_STAGE_")] += 1
        elif p.name == "kasmina.seed.alpha":
            alpha[seed_id] = p.value
    return dict(stages), alpha


def _decision(packet: pb.TelemetryPacket, metrics: Mapping[str, float]) -> DecisionView | None:
    """Tamiyo's per-decision packets carry a ``step_index`` indicator; commands also ``command``."""
    indicators = packet.system_health.indicators
    if packet.source_subsystem != "tamiyo" or "step_index" not in indicators:
        return None
    command = indicators.get("command")
    if command is None:
        return DecisionView("failure", None)
    action = command.removeprefix("COMMAND_").lower()
    latency_ms = metrics.get("tamiyo.inference.latency_ms")
    latency = latency_ms / 1000.0 if latency_ms is not None and math.isfinite(latency_ms) and latency_ms >= 0 else None
    return DecisionView(action if action in ACTIONS else OTHER, latency)


def _step(packet: pb.TelemetryPacket) -> tuple[str, int] | None:
    indicators = packet.system_health.indicators
    try:
        step = int(indicators["step_index"])
    except (KeyError, ValueError):
        return None
    return (indicators.get("training_run_id", ""), step) if step >= 0 else None


def _emergencies(packet: pb.TelemetryPacket, lane: Lane, names: list[str]) -> tuple[str, ...]:
    """``high``/``critical``: a HIGH/CRITICAL packet that rode the emergency lane; ``notice`` …
    ``halt``: each emergency escalation event, by the level it escalated to."""
    out = []
    if lane == "emergency":
        level = _EMERGENCY_PRIORITIES.get(packet_priority(packet))
        if level is not None:
            out.append(level)
    for name, event in zip(names, packet.events, strict=True):
        if name in ESCALATION_EVENTS:
            try:
                to = int(event.attributes.get("level_to", ""))
            except ValueError:
                out.append(UNKNOWN)
                continue
            out.append(enum_label(pb.EmergencyLevel.DESCRIPTOR, to, "EMERGENCY_LEVEL_"))
    return tuple(out)


def _breakers(packet: pb.TelemetryPacket, names: list[str]) -> dict[str, int]:
    states: dict[str, int] = {}
    for p in packet.metrics:
        key = breaker_key(p.name)
        if key is not None and math.isfinite(p.value):
            states[key] = int(p.value)
    for name in names:
        key = BREAKER_OPEN_EVENTS.get(name)
        if key is not None:
            states[key] = pb.CIRCUIT_STATE_OPEN
    return states


def _samples(packet: pb.TelemetryPacket, metrics: Mapping[str, float], decision: DecisionView | None,
             counts: Mapping[str, int]) -> tuple[tuple[str, float], ...]:
    samples = [(p.name, p.value) for p in packet.metrics]
    if decision is not None:
        risk = metrics.get("tamiyo.blueprint.risk", 0.0)
        samples += [
            (SIGNAL_BSDS_CRITICAL, 1.0 if any(counts[n] for n in BSDS_CRITICAL_EVENTS) else 0.0),
            (SIGNAL_BSDS_HIGH, 1.0 if any(counts[n] for n in BSDS_HIGH_EVENTS) else 0.0),
            (SIGNAL_ELEVATED_RISK, 1.0 if risk >= ELEVATED_BLUEPRINT_RISK else 0.0),
        ]
    return tuple(samples)
