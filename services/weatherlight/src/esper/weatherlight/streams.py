"""What is on the bus: every channel's lanes with depth, groups, pending and lag, and the dead letters.

Read-only and synchronous (redis-py): `esper streams` runs it once, the supervisor at start and end
of a run. Reply streams (`command.<run>`, `reply.*`) are listed too, as they exist.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from esper.leyline import CHANNELS, DEADLETTER_STREAM
from esper.oona.client import decode_id


@dataclass(frozen=True, slots=True)
class GroupRow:
    name: str
    consumers: int
    pending: int
    lag: int | None


@dataclass(frozen=True, slots=True)
class StreamRow:
    channel: str
    lane: str
    stream: str
    length: int
    groups: tuple[GroupRow, ...] = ()


@dataclass(slots=True)
class BusReport:
    streams: list[StreamRow] = field(default_factory=list)
    dead_letters: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    dead_letters_by_source: dict[str, int] = field(default_factory=dict)

    def emergency_entries(self) -> int:
        return sum(s.length for s in self.streams if s.lane == "emergency")


def _groups(r: redis.Redis, stream: str) -> tuple[GroupRow, ...]:
    try:
        rows: Any = r.xinfo_groups(stream)
    except redis.ResponseError:
        return ()
    return tuple(GroupRow(decode_id(g["name"]), int(g.get("consumers", 0)), int(g.get("pending", 0)),
                          None if g.get("lag") is None else int(g["lag"])) for g in rows)


def bus_report(r: redis.Redis, *, dead_letter_sample: int = 10_000) -> BusReport:
    """Depth and groups of every known stream, plus dead letters counted by reason and source over
    the newest `dead_letter_sample` entries."""
    report = BusReport()
    for chan in CHANNELS.values():
        for lane in ("normal", "emergency"):
            stream = chan.emergency_stream if lane == "emergency" else chan.normal_stream
            if stream is None:
                continue
            report.streams.append(StreamRow(chan.name, lane, stream, int(r.xlen(stream)), _groups(r, stream)))
    for key in sorted(decode_id(k) for k in r.scan_iter(match="command.*", _type="stream")):
        report.streams.append(StreamRow("command", "reply", key, int(r.xlen(key)), _groups(r, key)))
    report.dead_letters = int(r.xlen(DEADLETTER_STREAM))
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    rows: Any = r.xrevrange(DEADLETTER_STREAM, count=dead_letter_sample) if report.dead_letters else []
    for _id, fields in rows:
        reasons[fields.get(b"reason", b"?").decode(errors="replace")] += 1
        sources[fields.get(b"source", b"?").decode(errors="replace")] += 1
    report.dead_letters_by_reason = dict(reasons)
    report.dead_letters_by_source = dict(sources)
    return report
