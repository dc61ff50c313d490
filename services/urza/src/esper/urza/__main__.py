"""`python -m esper.urza [run|seed|list]`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Urza: Esper's blueprint library.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the service (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Answer `blueprint.query` and `kernel.request`, store BSDS sheets, until SIGTERM."""
    from esper.oona.cli import serve_or_exit
    from esper.urza.service import serve
    from esper.urza.settings import UrzaSettings

    serve_or_exit("urza", UrzaSettings, serve)


@app.command()
def seed(slot: Annotated[str | None, typer.Option(help="slot key whose graphs are stored, e.g. v64")] = None) -> None:
    """Register Karn's descriptors in the catalogue (no Redis needed)."""
    from esper.urza.library import UrzaLibrary
    from esper.urza.settings import UrzaSettings

    s = UrzaSettings()
    with UrzaLibrary(s.db_path, s.artifact_dir, busy_timeout_ms=s.busy_timeout_ms) as lib:
        n = lib.seed_from_karn(slot or s.seed_slot)
    typer.echo(f"seeded {n} blueprints into {s.db_path}")


@app.command("list")
def list_() -> None:
    """Print the catalogue: blueprints (tier, BSDS present) and kernels."""
    from esper.leyline import pb
    from esper.urza.library import UrzaLibrary
    from esper.urza.settings import UrzaSettings

    s = UrzaSettings()
    with UrzaLibrary(s.db_path, s.artifact_dir, busy_timeout_ms=s.busy_timeout_ms) as lib:
        for entry in lib.catalog_entries():
            d = entry.descriptor
            bsds = pb.HazardBand.Name(entry.bsds.hazard_band) if entry.HasField("bsds") else "-"
            typer.echo(f"{d.blueprint_id}\t{pb.BlueprintTier.Name(d.tier)}\t{d.name}\tbsds={bsds}")
        for k in lib.kernels():
            typer.echo(f"{k.kernel_id}\t{k.artifact_ref}\tcompile={k.compile_ms:.1f}ms\t"
                       f"prewarm p50/p95={k.prewarm_p50_ms:.2f}/{k.prewarm_p95_ms:.2f}ms")


if __name__ == "__main__":
    sys.exit(app())
