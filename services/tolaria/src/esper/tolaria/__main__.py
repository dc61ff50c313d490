"""`python -m esper.tolaria [run [--static]|drill NAME|all]`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Tolaria: Esper's trainer.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run one training (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run(static: Annotated[bool, typer.Option(help="train the host alone: no Tamiyo, no seeds")] = False) -> None:
    """Train for TOLARIA_EPOCHS, asking Tamiyo every step; print the summary as JSON."""
    from pydantic import ValidationError

    from esper.core.errors import ConfigurationError
    from esper.tolaria.service import run_training
    from esper.tolaria.settings import TolariaSettings

    try:
        settings = TolariaSettings()
        if not static:
            settings.signing_keys()
            settings.require_redis_url()
    except (ConfigurationError, ValidationError) as e:
        typer.echo(f"tolaria: configuration error: {e}", err=True)
        raise typer.Exit(2) from None
    code, summary = run_training(settings, static=static)
    typer.echo(json.dumps(summary, sort_keys=True))
    raise typer.Exit(code)


@app.command()
def drill(name: Annotated[str, typer.Argument(help="drill name, or 'all'")] = "all") -> None:
    """Run Tolaria's drills against a private redis-server and real processes."""
    from esper.tolaria.drills import run_drills

    raise typer.Exit(run_drills(name))


if __name__ == "__main__":
    sys.exit(app())
