"""A consumer process for the `crash-reclaim` drill: `python -m esper.oona.drill_worker NAME PREFIX`.

Connection and delivery settings come from the environment (`ESPER_REDIS_URL`,
`ESPER_LEYLINE_SECRET`, `ESPER_VISIBILITY_TIMEOUT_MS`, ...), like any Esper process. The handler
records its effect in Redis under `PREFIX`:

- `PREFIX:effect`      HSETNX message_id → "<worker>:<delivery>" (the idempotent effect, first writer wins)
- `PREFIX:completions` HINCRBY message_id 1 on *every* handler completion (a double effect shows as 2)
- `PREFIX:started`     HSET message_id → "<worker>:<delivery>" when the worker stalls on the marked message
- `PREFIX:ready:NAME`  set once the consumer group exists and the worker is about to read

With `--stall-on PACKET_ID` the worker marks the message as started and then sleeps inside the
handler (the drill SIGKILLs it there). With `--wait-key KEY` it connects but only starts reading
once KEY exists. On SIGTERM it drains like every Esper process and prints its `ConsumerStats` as
one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from esper.core.lifecycle import Lifecycle
from esper.core.lifecycle import run as run_async
from esper.core.logging import configure_logging
from esper.leyline import pb
from esper.oona.client import OonaClient
from esper.oona.consumer import Consumer
from esper.oona.delivery import Delivery
from esper.oona.settings import OonaSettings

STALL_S = 3600.0


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m esper.oona.drill_worker")
    p.add_argument("name", help="worker name; the consumer is called drill-NAME")
    p.add_argument("prefix", help="Redis key prefix for the handler's effects")
    p.add_argument("--channel", default="state")
    p.add_argument("--group", default="drill")
    p.add_argument("--stall-on", default="", help="packet_id on which the handler stalls forever")
    p.add_argument("--wait-key", default="", help="start reading only once this key exists")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    settings = OonaSettings(service_name=f"drill-{args.name}")
    configure_logging(level=settings.log_level, fmt=settings.log_format, service=settings.service_name)
    life = Lifecycle(settings.service_name, drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    client = OonaClient.from_settings(settings, sender=settings.service_name)
    await client.connect()
    r = client.redis
    prefix: str = args.prefix
    name: str = args.name

    async def handler(d: Delivery) -> None:
        packet = d.message_as(pb.SystemStatePacket)
        tag = f"{name}:{d.deliveries}"
        if args.stall_on and packet.packet_id == args.stall_on:
            await r.hset(f"{prefix}:started", d.message_id, tag)
            await asyncio.sleep(STALL_S)  # the drill kills us here, mid-handler
        pipe = r.pipeline(transaction=True)
        pipe.hsetnx(f"{prefix}:effect", d.message_id, tag)
        pipe.hincrby(f"{prefix}:completions", d.message_id, 1)
        await pipe.execute()

    consumer = Consumer(client, args.channel, group=args.group, handler=handler, name=f"drill-{name}")
    try:
        await consumer.start()
        await r.set(f"{prefix}:ready:{name}", "1")
        if args.wait_key:
            while not life.stopping:
                if await r.exists(args.wait_key):
                    break
                await asyncio.sleep(0.01)
        await consumer.run(life.stop_event)
    finally:
        await client.close()
    print(json.dumps(dataclasses.asdict(consumer.stats)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    return run_async(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
