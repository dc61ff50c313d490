"""`python -m esper.tezzeret [run|compile]`."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, help="Tezzeret: Esper's blueprint compiler.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the forge service (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Compile and register missing kernels now and every TEZZERET_INTERVAL_S, until SIGTERM."""
    from esper.oona.cli import serve_or_exit
    from esper.tezzeret.service import serve
    from esper.tezzeret.settings import TezzeretSettings

    serve_or_exit("tezzeret", TezzeretSettings, serve)


@app.command("compile")
def compile_() -> None:
    """One forge pass into Urza's files (no Redis needed); exit 1 if any blueprint failed."""
    from esper.karn.template import SlotShape
    from esper.tezzeret.forge import forge_once
    from esper.tezzeret.service import pick_device
    from esper.tezzeret.settings import TezzeretSettings
    from esper.urza.library import UrzaLibrary

    s = TezzeretSettings()
    with UrzaLibrary(s.db_path, s.artifact_dir, busy_timeout_ms=s.busy_timeout_ms) as lib:
        report = forge_once(lib, [SlotShape.from_key(k) for k in s.slots], device=pick_device(s.device),
                            compile_enabled=s.enable_compile, seed=s.seed, max_attempts=s.max_attempts)
    for result in report.results:
        typer.echo(f"{result.blueprint_id}@{result.slot.as_key()}\t{result.mode}\tcompile {result.compile_ms:.1f} ms"
                   f"\tprewarm p50/p95 {result.prewarm_p50_ms:.3f}/{result.prewarm_p95_ms:.3f} ms")
    typer.echo(f"registered {len(report.registered)}, current {len(report.current)}, failed {len(report.failed)}")
    for kid, reason in report.failed.items():
        typer.echo(f"FAILED {kid}: {reason}", err=True)
    raise typer.Exit(1 if report.failed else 0)


if __name__ == "__main__":
    sys.exit(app())
