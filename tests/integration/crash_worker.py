"""A consumer process for the SIGKILL test: handles `state` in group `tamiyo` until killed.

The handler's *effect* is an idempotent HSETNX keyed by packet id plus a completion counter, so a
double run would be visible. On the packet named by argv[3] it first records "started" and then
stalls, so the test can SIGKILL it mid-handler.
"""

from __future__ import annotations

import asyncio
import sys

from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaClient, OonaSettings


async def main(url: str, secret: str, stall_on: str, name: str) -> None:
    settings = OonaSettings(redis_url=url, leyline_secret=secret, visibility_timeout_ms=500, claim_interval_ms=100,
                            block_ms=50, metrics_port=-1)
    client = OonaClient.from_settings(settings, sender=name)
    await client.connect()

    async def handler(d: Delivery) -> None:
        pid = d.message_as(pb.SystemStatePacket).packet_id
        if pid == stall_on:
            await client.redis.set(f"started:{pid}", name)
            await asyncio.sleep(3600)  # killed here
        await client.redis.hsetnx("effects", pid, name)
        await client.redis.hincrby("completions", pid, 1)

    consumer = Consumer(client, "state", group="tamiyo", name=name, handler=handler)
    await consumer.start()
    await client.redis.set(f"ready:{name}", 1)
    await consumer.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
