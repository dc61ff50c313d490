"""`python -m esper.tamiyo [run|drill NAME|all]`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from esper.core.errors import ConfigurationError
from esper.core.lifecycle import run as run_async

app = typer.Typer(add_completion=False, help="Tamiyo: Esper's policy worker.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the worker (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Serve decisions on the `state` channel until SIGTERM."""
    from esper.tamiyo.service import serve
    from esper.tamiyo.settings import TamiyoSettings

    try:
        settings = TamiyoSettings()
        settings.signing_keys()
        settings.require_redis_url()
    except (ConfigurationError, ValidationError) as e:
        typer.echo(f"tamiyo: configuration error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_async(lambda: serve(settings)))


@app.command()
def drill(name: Annotated[str, typer.Argument(help="drill name, or 'all'")] = "all") -> None:
    """Run Tamiyo's drills against a private redis-server and a real worker process."""
    from esper.tamiyo.drills import run_drills

    raise typer.Exit(run_drills(name))


if __name__ == "__main__":
    sys.exit(app())
