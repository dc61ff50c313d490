"""`python -m esper.oona [run|health|drill NAME|all]`."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer

from esper.oona.settings import OonaSettings

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Oona: Esper's Redis Streams bus.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the stream keeper (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Run the stream keeper: groups, reclaim sweep, trimming, gauges on /metrics."""
    from esper.oona.cli import serve_or_exit
    from esper.oona.service import serve

    serve_or_exit("oona", OonaSettings, serve)


@app.command()
def health() -> None:
    """Exit 0 when a keeper heartbeat is live in Redis (compose healthcheck)."""
    from redis.asyncio import Redis

    from esper.core.heartbeat import check_health

    settings = OonaSettings()

    async def probe() -> int:
        r = Redis.from_url(settings.require_redis_url())
        try:
            live = await check_health(r, settings.service_name)
        finally:
            await r.aclose()
        print("\n".join(live) or "no live heartbeat")
        return 0 if live else 1

    raise typer.Exit(asyncio.run(probe()))


@app.command()
def drill(
    name: Annotated[str, typer.Argument(help="drill name, or 'all'")] = "all",
) -> None:
    """Run bus drills against a private redis-server; PASS/FAIL per drill with evidence."""
    from esper.oona.drills import run_drills

    raise typer.Exit(run_drills(name))


if __name__ == "__main__":
    sys.exit(app())
