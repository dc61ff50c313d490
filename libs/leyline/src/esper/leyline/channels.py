"""The channel table (ARCHITECTURE §4) and priority → lane mapping.

A channel is a logical topic with two Redis streams: `oona.{<channel>}` (normal lane) and
`oona.{<channel>}.emergency`. The braces are a Redis Cluster hash tag, so both lanes of a channel
live in one slot and one XREADGROUP can read them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from esper.leyline._generated import leyline_pb2 as pb

Lane = Literal["normal", "emergency"]
LANES: tuple[Lane, ...] = ("emergency", "normal")  # drain order

DEADLETTER_STREAM = "oona.deadletter"
STREAM_PREFIX = "oona."


@dataclass(frozen=True, slots=True)
class Channel:
    """One logical topic: its lanes, who consumes it, and how long its normal lane may grow."""

    name: str
    groups: tuple[str, ...] = ()
    maxlen: int = 10_000  # approximate MAXLEN on the normal lane (prototype: Weatherlight maxlen 10 000)
    emergency_only: bool = False
    description: str = ""
    # Channels of large, rare messages (policy checkpoints) raise the size cap and trim exactly:
    # approximate MAXLEN trims whole radix nodes (~100 entries), far too lax for megabyte entries.
    max_message_bytes: int | None = None  # None: the bus-wide cap (OonaSettings.max_message_bytes)
    exact_trim: bool = False

    @property
    def normal_stream(self) -> str | None:
        return None if self.emergency_only else f"{STREAM_PREFIX}{{{self.name}}}"

    @property
    def emergency_stream(self) -> str:
        return f"{STREAM_PREFIX}{{{self.name}}}.emergency"

    def stream(self, lane: Lane) -> str:
        if lane == "emergency" or self.emergency_only:
            return self.emergency_stream
        return f"{STREAM_PREFIX}{{{self.name}}}"

    @property
    def streams(self) -> tuple[str, ...]:
        """Streams in drain order: emergency first."""
        normal = self.normal_stream
        return (self.emergency_stream,) if normal is None else (self.emergency_stream, normal)


# The fleet's channels and their consumer groups. `command.<run>` channels are created per run.
CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in (
        Channel("state", ("tamiyo",), description="SystemStatePacket from trainers; Tamiyo replies on command.<run>"),
        Channel("telemetry", ("nissa",), maxlen=50_000, description="TelemetryPacket from every process"),
        Channel("field_report", ("simic", "nissa"), description="FieldReport outbox drain from Tamiyo"),
        Channel("policy", (), maxlen=8, max_message_bytes=64 * 1024 * 1024, exact_trim=True,
                description="Signed PolicyUpdate from Simic; every Tamiyo replica reads it in a group of its own"),
        Channel("kernel.request", ("urza",), description="KernelPrefetchRequest from Kasmina"),
        # Kasmina gets its kernel replies on its own reply stream and Tamiyo reads BSDS through Urza's
        # catalogue, so these broadcasts have no group of theirs: a group nobody reads only grows lag.
        Channel("kernel.ready", (), description="KernelArtifactReady / KernelCatalogUpdate"),
        Channel("kernel.error", (), description="KernelArtifactError"),
        Channel("bsds", ("urza",), description="BSDS safety sheets from Urabrask"),
        Channel("blueprint.query", ("urza",), maxlen=1_000,
                description="BlueprintQuery requests (Tamiyo's metadata path); Urza replies BlueprintCatalog"),
        Channel("emergency", ("weatherlight",), emergency_only=True, description="EmergencySignal"),
    )
}


def command_channel(run_id: str) -> Channel:
    """The per-run reply channel a trainer reads Tamiyo's commands from."""
    if not run_id or any(c in run_id for c in "{} \t\n"):
        raise ValueError(f"invalid run id {run_id!r}")
    return Channel(f"command.{run_id}", (), maxlen=1_000, description="AdaptationCommand / DecisionFailure replies")


def channel(name: str) -> Channel:
    """Look a channel up by name; `command.<run>` names are built on demand."""
    if name in CHANNELS:
        return CHANNELS[name]
    if name.startswith("command."):
        return command_channel(name.removeprefix("command."))
    raise KeyError(f"unknown channel {name!r}; known: {', '.join(sorted(CHANNELS))}, command.<run>")


def is_emergency_priority(priority: pb.MessagePriority.ValueType) -> bool:
    return priority in (pb.MESSAGE_PRIORITY_HIGH, pb.MESSAGE_PRIORITY_CRITICAL)


def lane_for(
    priority: pb.MessagePriority.ValueType,
    *,
    message_type: pb.BusMessageType.ValueType = pb.BUS_MESSAGE_TYPE_UNSPECIFIED,
    conservative: bool = False,
) -> Lane:
    """HIGH/CRITICAL, EmergencySignal and anything sent in conservative mode ride the emergency lane."""
    if conservative or is_emergency_priority(priority) or message_type == pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL:
        return "emergency"
    return "normal"
