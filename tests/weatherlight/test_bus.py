"""Against a real Redis: the streams report, and that every fuzzed entry is dead-lettered by a real consumer."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from redis import Redis

from esper.leyline import CHANNELS, DEADLETTER_STREAM, pb
from esper.oona import Consumer, Delivery, OonaClient
from esper.weatherlight.fuzz import hostile_entries
from esper.weatherlight.streams import bus_report


async def test_bus_report_lists_lanes_groups_and_dead_letters(redis_url: str, make_client) -> None:  # type: ignore[no-untyped-def]
    client: OonaClient = await make_client("reporter")
    await client.ensure_group("state", "tamiyo")
    for i in range(3):
        await client.publish("state", pb.SystemStatePacket(packet_id=f"p{i}"))
    await client.redis.xadd(DEADLETTER_STREAM, {b"payload": b"x", b"reason": b"bad_signature", b"source": b"s"})
    with Redis.from_url(redis_url) as r:
        report = bus_report(r)
    state = next(s for s in report.streams if s.stream == CHANNELS["state"].normal_stream)
    assert state.length == 3
    (group,) = [g for g in state.groups if g.name == "tamiyo"]
    assert group.pending == 0 and group.lag == 3
    assert {s.lane for s in report.streams} == {"normal", "emergency"}
    assert report.dead_letters == 1 and report.dead_letters_by_reason == {"bad_signature": 1}


@pytest.mark.parametrize("channel", ["state", "field_report", "telemetry", "emergency"])
async def test_every_hostile_entry_is_dead_lettered(channel: str, make_client) -> None:  # type: ignore[no-untyped-def]
    client: OonaClient = await make_client("victim")
    expected = {"state": pb.SystemStatePacket, "field_report": pb.FieldReport, "telemetry": pb.TelemetryPacket,
                "emergency": pb.EmergencySignal}[channel]
    handled: list[str] = []

    async def handler(delivery: Delivery) -> None:
        delivery.message_as(expected)  # what every service's handler does first
        handled.append(delivery.envelope.sender)

    consumer = Consumer(client, channel, group="g", handler=handler, name="c1")
    await client.ensure_group(channel, "g")
    lane = "emergency" if channel == "emergency" else "normal"
    stream = CHANNELS[channel].stream(lane)
    entries = hostile_entries(channel, client.keys, count=90, rng=random.Random(3))
    for _case, fields in entries:
        await client.redis.xadd(stream, fields)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(200):
        if await client.redis.xlen(DEADLETTER_STREAM) >= len(entries):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    rows = await client.redis.xrange(DEADLETTER_STREAM)
    reasons = Counter(f[b"reason"].decode() for _i, f in rows)
    # nothing hostile reached the handler as a valid message (on `telemetry` the consumer's own
    # dead-letter events arrive, signed by the victim: valid, and not the attacker's)
    assert "fuzz" not in handled and set(handled) <= {"victim"}
    assert len(rows) == len(entries), reasons
    # each kind of attack is refused for its own reason, not by luck
    assert {"bad_signature", "unknown_key", "missing_signature", "stale", "from_future", "undecodable"} <= set(reasons)
    assert sum(reasons.values()) == len(entries)
