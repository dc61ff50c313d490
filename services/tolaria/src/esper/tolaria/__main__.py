"""`python -m esper.tolaria [run [--static] [--dataset FILE.npz]|drill NAME|all]`."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Tolaria: Esper's trainer.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run one training (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run(static: Annotated[bool, typer.Option(help="train the host alone: no Tamiyo, no seeds")] = False,
        dataset: Annotated[Path | None, typer.Option(
            help="your own .npz (x, y; optional x_val, y_val) instead of digits; overrides TOLARIA_DATASET_PATH",
            dir_okay=False)] = None) -> None:
    """Train for TOLARIA_EPOCHS, asking Tamiyo every step; print the summary as JSON."""
    from pydantic import ValidationError

    from esper.core.errors import ConfigurationError
    from esper.kasmina import KasminaSettings
    from esper.tolaria.data import DatasetError
    from esper.tolaria.service import TrainerStartError, load_training_data, run_training
    from esper.tolaria.settings import TolariaSettings

    source = "TOLARIA_DATASET_PATH" if dataset is None else "--dataset"
    try:
        settings = TolariaSettings() if dataset is None else TolariaSettings(dataset_path=dataset)
        if not static:
            settings.signing_keys()
            settings.require_redis_url()
        settings.torch_device()
        KasminaSettings()  # the trainer builds Kasmina's own (KASMINA_*): a bad value is exit 2 here too
    except (ConfigurationError, ValidationError) as e:
        typer.echo(f"tolaria: configuration error: {_one_line(e)}", err=True)
        raise typer.Exit(2) from None
    try:  # before anything starts: a bad dataset file is a configuration error, not a traceback
        data = load_training_data(settings)
    except DatasetError as e:
        typer.echo(f"tolaria: configuration error: {source}: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        code, summary = run_training(settings, static=static, dataset=data)
    except ConfigurationError as e:  # found while starting (a metrics port in use)
        typer.echo(f"tolaria: configuration error: {e}", err=True)
        raise typer.Exit(2) from None
    except TrainerStartError as e:
        typer.echo(f"tolaria: cannot start: {e}", err=True)
        raise typer.Exit(1) from None
    for sig in (signal.SIGTERM, signal.SIGINT):  # the run is over and saved: a late signal must not turn
        signal.signal(sig, signal.SIG_IGN)       # its exit code into -15 while the interpreter winds down
    typer.echo(json.dumps(summary, sort_keys=True))
    raise typer.Exit(code)


@app.command()
def drill(name: Annotated[str, typer.Argument(help="drill name, or 'all'")] = "all") -> None:
    """Run Tolaria's drills against a private redis-server and real processes."""
    from esper.tolaria.drills import run_drills

    raise typer.Exit(run_drills(name))


def _one_line(e: Exception) -> str:
    """pydantic's report spans lines (and a docs link); the operator gets one line per run."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    return "; ".join((".".join(map(str, d["loc"])) + ": " if d["loc"] else "") + d["msg"].removeprefix("Value error, ")
                     for d in e.errors())


if __name__ == "__main__":
    sys.exit(app())
