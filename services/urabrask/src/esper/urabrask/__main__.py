"""`python -m esper.urabrask [run|probe]`."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, help="Urabrask: Esper's crucible (probes kernels, issues BSDS sheets).")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the producer service (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Probe kernels without a current BSDS now and every URABRASK_PRODUCER_INTERVAL_S, until SIGTERM."""
    from esper.oona.cli import serve_or_exit
    from esper.urabrask.service import serve
    from esper.urabrask.settings import UrabraskSettings

    serve_or_exit("urabrask", UrabraskSettings, serve)


@app.command()
def probe() -> None:
    """One producer pass into Urza's files (no Redis needed): print each sheet."""
    import torch

    from esper.leyline import pb
    from esper.urabrask.producer import produce_once
    from esper.urabrask.settings import UrabraskSettings
    from esper.urza.library import UrzaLibrary

    s = UrabraskSettings()
    with UrzaLibrary(s.db_path, s.artifact_dir, busy_timeout_ms=s.busy_timeout_ms) as lib:
        report = produce_once(lib, device=torch.device("cpu"), seed=s.seed, only_safe_tier=s.only_safe_tier,
                              limit=s.topn_per_cycle)
    for sheet in report.issued:
        typer.echo(f"{sheet.blueprint_id}\trisk {sheet.risk_score:.2f}\t{pb.HazardBand.Name(sheet.hazard_band)}\t"
                   f"{pb.HandlingClass.Name(sheet.handling_class)}\t{sheet.recommendation}")
    for bid, reason in report.failed.items():
        typer.echo(f"FAILED {bid}: {reason}", err=True)
    raise typer.Exit(1 if report.failed else 0)


if __name__ == "__main__":
    sys.exit(app())
