"""`python -m esper.tamiyo [run|drill NAME|all]`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Tamiyo: Esper's policy worker.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the worker (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Serve decisions on the `state` channel until SIGTERM."""
    from esper.oona.cli import serve_or_exit
    from esper.tamiyo.service import serve
    from esper.tamiyo.settings import TamiyoSettings

    serve_or_exit("tamiyo", TamiyoSettings, serve)


@app.command()
def drill(name: Annotated[str, typer.Argument(help="drill name, or 'all'")] = "all") -> None:
    """Run Tamiyo's drills against a private redis-server and a real worker process."""
    from esper.tamiyo.drills import run_drills

    raise typer.Exit(run_drills(name))


if __name__ == "__main__":
    sys.exit(app())
