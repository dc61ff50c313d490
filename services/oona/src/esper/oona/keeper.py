"""The stream keeper behind `python -m esper.oona`: groups exist, over-delivered entries are
dead-lettered even when every consumer is dead, lanes are trimmed, and depth / lag / pending /
dead-letter gauges are exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from redis.exceptions import ResponseError

from esper.core.clock import now_ms
from esper.core.logging import get_logger
from esper.leyline import CHANNELS, DEADLETTER_STREAM, Channel, pb
from esper.oona.client import OonaClient, decode_id, ensure_group_on

log = get_logger("esper.oona.keeper")

KEEPER_CONSUMER = "oona-keeper"


@dataclass(slots=True)
class SweepResult:
    dead_lettered: int = 0
    trimmed: int = 0
    reply_streams_deleted: int = 0


class KeeperMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.depth = Gauge("oona_stream_length", "Entries in a stream (XLEN)", ["stream"], registry=r)
        self.pending = Gauge("oona_group_pending", "Delivered but unacked entries", ["stream", "group"], registry=r)
        self.lag = Gauge("oona_group_lag", "Entries not yet delivered to the group", ["stream", "group"], registry=r)
        self.consumers = Gauge("oona_group_consumers", "Consumers in the group", ["stream", "group"], registry=r)
        self.deadletters = Gauge("oona_deadletter_length", "Entries in oona.deadletter", registry=r)
        self.swept = Gauge("oona_keeper_last_sweep_timestamp_seconds", "When the keeper last swept", registry=r)


class StreamKeeper:
    def __init__(self, client: OonaClient, *, registry: CollectorRegistry, channels: dict[str, Channel] | None = None):
        self.client = client
        self.settings = client.settings
        self.channels = channels if channels is not None else CHANNELS
        self.metrics = KeeperMetrics(registry)

    async def ensure_all(self) -> None:
        for chan in self.channels.values():
            for group in chan.groups:
                await self.client.ensure_group(chan, group)

    async def tick(self) -> SweepResult:
        result = SweepResult()
        for chan in self.channels.values():
            for stream in chan.streams:
                for group in chan.groups:
                    result.dead_lettered += await self._sweep_over_delivered(chan, stream, group)
                result.trimmed += await self._trim(chan, stream)
        result.reply_streams_deleted = await self.sweep_reply_streams()
        await self.refresh_gauges()
        self.metrics.swept.set(now_ms() / 1000.0)
        return result

    async def _sweep_over_delivered(self, chan: Channel, stream: str, group: str) -> int:
        """Dead-letter entries delivered more than `max_deliveries` times and idle past the visibility
        timeout, paging through the whole pending list (a consumer that keeps dying on an entry never
        gets to dead-letter it itself). Entries below the cap are left for consumers to reclaim."""
        s = self.settings
        swept, start = 0, "-"
        while True:
            try:
                rows = await self.client.redis.xpending_range(stream, group, min=start, max="+", count=200,
                                                              idle=s.visibility_timeout_ms)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    await ensure_group_on(self.client.redis, stream, group)
                    return swept
                raise
            if not rows:
                return swept
            swept += await self._dead_letter_rows(chan, stream, group, rows)
            if len(rows) < 200:
                return swept
            start = "(" + decode_id(rows[-1]["message_id"])

    async def _dead_letter_rows(self, chan: Channel, stream: str, group: str, rows: list[Any]) -> int:
        s = self.settings
        deliveries = {decode_id(r["message_id"]): int(r["times_delivered"]) for r in rows}
        over: list[Any] = [i for i, n in deliveries.items() if n > s.max_deliveries]
        if not over:
            return 0
        # XCLAIM with the idle floor so a consumer that just took the entry keeps it.
        claimed: Any = await self.client.redis.xclaim(stream, group, KEEPER_CONSUMER, s.visibility_timeout_ms, over)
        pipe = self.client.redis.pipeline(transaction=False)
        n = 0
        for raw_id, fields in claimed:
            if fields is None:
                continue
            entry_id = decode_id(raw_id)
            count = deliveries.get(entry_id, s.max_deliveries + 1)
            self.client.add_dead_letter(
                pipe, channel_name=chan.name, stream=stream, entry_id=entry_id, fields=fields,
                reason=pb.DEAD_LETTER_REASON_MAX_DELIVERIES,
                detail=f"delivered {count} times (max {s.max_deliveries}) with no ack; swept by the keeper",
                group=group, consumer=KEEPER_CONSUMER, deliveries=count,
            )
            pipe.xack(stream, group, entry_id)
            n += 1
        if n:
            await pipe.execute()
            log.warning("keeper dead-lettered over-delivered entries", stream=stream, group=group, count=n)
        return n

    async def sweep_reply_streams(self) -> int:
        """Delete private reply streams (`oona.{reply.*}`) unused for `reply_stream_ttl_ms`: a client
        that crashed never deletes its own."""
        cutoff = now_ms() - self.settings.reply_stream_ttl_ms
        deleted = 0
        async for key in self.client.redis.scan_iter(match="oona.{reply.*", count=200, _type="stream"):
            try:
                info: Any = await self.client.redis.xinfo_stream(key)
            except ResponseError:
                continue
            last = decode_id(info.get("last-generated-id", b"0-0"))
            if int(last.partition("-")[0] or 0) < cutoff:
                deleted += int(await self.client.redis.delete(key))
        return deleted

    async def _trim(self, chan: Channel, stream: str) -> int:
        s = self.settings
        if stream == chan.emergency_stream:
            # Emergency lanes are never trimmed below the floor, and never by age.
            return int(await self.client.redis.xtrim(stream, maxlen=max(s.emergency_maxlen_floor, chan.maxlen),
                                                     approximate=True))
        by_len = int(await self.client.redis.xtrim(stream, maxlen=chan.maxlen, approximate=not chan.exact_trim))
        by_age = int(await self.client.redis.xtrim(stream, minid=f"{now_ms() - s.message_ttl_ms}-0", approximate=True))
        return by_len + by_age

    async def refresh_gauges(self) -> None:
        r = self.client.redis
        for chan in self.channels.values():
            for stream in chan.streams:
                self.metrics.depth.labels(stream).set(await r.xlen(stream))
                try:
                    groups = await r.xinfo_groups(stream)
                except ResponseError:
                    continue  # stream does not exist yet
                for g in groups:
                    name = decode_id(g["name"])
                    self.metrics.pending.labels(stream, name).set(int(g.get("pending", 0)))
                    lag = g.get("lag")
                    self.metrics.lag.labels(stream, name).set(float(lag) if lag is not None else float("nan"))
                    self.metrics.consumers.labels(stream, name).set(int(g.get("consumers", 0)))
        self.metrics.deadletters.set(await r.xlen(DEADLETTER_STREAM))
