"""`python -m esper.nissa [run]`."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, help="Nissa: telemetry -> Prometheus metrics, alert rules, SLO burn.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the service (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Ingest telemetry and field reports from the bus and serve /metrics, /healthz, /alerts until SIGTERM."""
    from esper.nissa.service import serve
    from esper.nissa.settings import NissaSettings
    from esper.oona.cli import serve_or_exit

    serve_or_exit("nissa", NissaSettings, serve)


if __name__ == "__main__":
    sys.exit(app())
