"""Channel table, stream names, hash tags and the priority -> lane mapping (ARCHITECTURE §4)."""

from __future__ import annotations

import pytest

from esper.leyline import (
    CHANNELS,
    DEADLETTER_STREAM,
    LANES,
    Channel,
    channel,
    command_channel,
    is_emergency_priority,
    lane_for,
    pb,
)

EXPECTED_CHANNELS = {
    "state", "telemetry", "field_report", "policy", "kernel.request", "kernel.ready", "kernel.error", "bsds",
    "blueprint.query",
    "emergency",
}
EMERGENCY_PRIORITIES = {pb.MESSAGE_PRIORITY_HIGH, pb.MESSAGE_PRIORITY_CRITICAL}


def _hash_tag(key: str) -> str:
    """Redis Cluster hashes only the part between the first '{' and the next '}'."""
    start = key.index("{")
    end = key.index("}", start + 1)
    return key[start + 1 : end]


BROADCASTS = {"policy", "kernel.ready", "kernel.error"}


def test_channel_table_matches_architecture() -> None:
    assert set(CHANNELS) == EXPECTED_CHANNELS
    for name, chan in CHANNELS.items():
        assert chan.name == name
        # `policy` fans out: every Tamiyo replica reads it in a group of its own, made at start-up.
        # `kernel.ready` / `kernel.error` are broadcasts nobody reads in a group (Kasmina's replies come
        # on its own reply stream); a declared group without a consumer would only grow lag.
        assert chan.groups or name in BROADCASTS, f"{name} has no consumer group"
    assert not CHANNELS["kernel.ready"].groups and not CHANNELS["kernel.error"].groups
    assert CHANNELS["bsds"].groups == ("urza",), "Tamiyo reads BSDS through Urza's catalogue, not the stream"


def test_lanes_and_deadletter() -> None:
    assert LANES == ("emergency", "normal"), "emergency is drained first"
    assert DEADLETTER_STREAM == "oona.deadletter"


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS - {"emergency"}))
def test_stream_names(name: str) -> None:
    chan = CHANNELS[name]
    assert not chan.emergency_only
    assert chan.normal_stream == f"oona.{{{name}}}"
    assert chan.emergency_stream == f"oona.{{{name}}}.emergency"
    assert chan.stream("normal") == f"oona.{{{name}}}"
    assert chan.stream("emergency") == f"oona.{{{name}}}.emergency"
    assert chan.streams == (f"oona.{{{name}}}.emergency", f"oona.{{{name}}}"), "drain order: emergency first"
    assert _hash_tag(chan.stream("normal")) == _hash_tag(chan.stream("emergency")) == name
    assert channel(name) is chan


def test_emergency_channel_has_only_the_emergency_lane() -> None:
    chan = CHANNELS["emergency"]
    assert chan.emergency_only
    assert chan.normal_stream is None
    assert chan.emergency_stream == "oona.{emergency}.emergency"
    assert chan.streams == ("oona.{emergency}.emergency",)
    assert chan.stream("normal") == "oona.{emergency}.emergency", "a normal-lane send still lands on the only lane"
    assert chan.stream("emergency") == "oona.{emergency}.emergency"


def test_command_channel() -> None:
    chan = command_channel("run1")
    assert chan.name == "command.run1"
    assert chan.normal_stream == "oona.{command.run1}"
    assert chan.emergency_stream == "oona.{command.run1}.emergency"
    assert chan.streams == ("oona.{command.run1}.emergency", "oona.{command.run1}")
    assert not chan.emergency_only
    assert channel("command.run1") == chan
    assert isinstance(chan, Channel)
    assert command_channel("run-2024.01:a_b").name == "command.run-2024.01:a_b"


@pytest.mark.parametrize("run_id", ["", "a{b", "a}b", "{run}", "a b", "a\tb", "a\nb", " "])
def test_command_channel_rejects_invalid_run_ids(run_id: str) -> None:
    with pytest.raises(ValueError):
        command_channel(run_id)
    with pytest.raises(ValueError):
        channel(f"command.{run_id}")


def test_unknown_channel() -> None:
    with pytest.raises(KeyError):
        channel("nope")
    with pytest.raises(KeyError):
        channel("commands.run1")


@pytest.mark.parametrize("priority", sorted(pb.MessagePriority.values()), ids=lambda p: pb.MessagePriority.Name(p))
def test_lane_for_every_priority(priority: pb.MessagePriority.ValueType) -> None:
    expected = "emergency" if priority in EMERGENCY_PRIORITIES else "normal"
    assert lane_for(priority) == expected
    assert is_emergency_priority(priority) == (priority in EMERGENCY_PRIORITIES)
    # EmergencySignal and conservative mode always ride the emergency lane, whatever the priority.
    assert lane_for(priority, message_type=pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL) == "emergency"
    assert lane_for(priority, conservative=True) == "emergency"
    assert lane_for(priority, message_type=pb.BUS_MESSAGE_TYPE_SYSTEM_STATE) == expected


def test_every_priority_is_covered() -> None:
    assert set(pb.MessagePriority.values()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("message_type", sorted(pb.BusMessageType.values()), ids=lambda t: pb.BusMessageType.Name(t))
def test_only_emergency_signal_forces_the_emergency_lane(message_type: pb.BusMessageType.ValueType) -> None:
    lane = lane_for(pb.MESSAGE_PRIORITY_NORMAL, message_type=message_type)
    assert lane == ("emergency" if message_type == pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL else "normal")
