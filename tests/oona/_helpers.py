"""Small helpers shared by the bus tests (real Redis only)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from esper.leyline import DEADLETTER_STREAM, pb, unpack_as
from esper.leyline.codec import decode_envelope


def state(i: int | str) -> pb.SystemStatePacket:
    return pb.SystemStatePacket(packet_id=f"p{i}", global_step=int(i) if isinstance(i, int) else 0)


async def wait_until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll `pred` until true; a liveness bound, never a performance assertion."""
    async with asyncio.timeout(timeout_s):
        while not await pred():  # noqa: ASYNC110 - polls state in Redis/another process, no event to await
            await asyncio.sleep(0.02)
    assert await pred(), what


async def dead_letters(redis: Redis) -> list[tuple[str, pb.DeadLetterRecord, dict[bytes, bytes]]]:
    """(reason, record, raw fields) of every dead-letter entry."""
    out = []
    for _id, fields in await redis.xrange(DEADLETTER_STREAM):
        record = unpack_as(decode_envelope(fields[b"payload"]), pb.DeadLetterRecord)
        out.append((fields[b"reason"].decode(), record, fields))
    return out


async def pending_count(redis: Redis, stream: str, group: str) -> int:
    info: Any = await redis.xpending(stream, group)
    return int(info["pending"])
