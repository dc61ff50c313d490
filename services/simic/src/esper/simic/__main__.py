"""`python -m esper.simic [run]`."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, help="Simic: Esper's learner (field-report replay store).")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the service (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Store field reports from the bus until SIGTERM."""
    from esper.oona.cli import serve_or_exit
    from esper.simic.service import serve
    from esper.simic.settings import SimicSettings

    serve_or_exit("simic", SimicSettings, serve)


if __name__ == "__main__":
    sys.exit(app())
