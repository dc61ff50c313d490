"""The `esper` command line (typer + rich): what an operator touches.

`esper up` runs the local fleet; `esper service NAME` is what a container runs; `esper drill`,
`esper bench`, `esper streams`, `esper policy show|publish` and `esper experiment` are the rest.
Commands that belong to one service run it as `python -m esper.<name> ...` (Weatherlight imports no
service), so their exit codes pass straight through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from esper.weatherlight.fleet import SERVICES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Esper: grow neural networks while they train. Run the fleet, drills, benchmarks.")
policy_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tamiyo's policy: show or publish.")
app.add_typer(policy_app, name="policy")
console = Console(soft_wrap=True)  # errors and evidence stay one greppable line

REPO_ROOT = Path(__file__).resolve().parents[5]
"""The checkout (services/weatherlight/src/esper/weatherlight/cli.py → repo); benches live in bench/."""


def _settings() -> object:
    from pydantic import ValidationError

    from esper.core.errors import ConfigurationError
    from esper.weatherlight.settings import WeatherlightSettings

    try:
        return WeatherlightSettings()
    except (ConfigurationError, ValidationError) as e:
        console.print(f"[red]configuration error[/]: {e}")
        raise typer.Exit(2) from None


@app.command()
def up(
    epochs: Annotated[int | None, typer.Option(min=1, help="train this many epochs, then stop and summarise")] = None,
    summary_json: Annotated[Path | None, typer.Option(help="also write the summary as JSON here")] = None,
    no_trainer: Annotated[bool, typer.Option("--no-trainer", help="run the services only")] = False,
) -> None:
    """Run the fleet (embedded Redis unless ESPER_REDIS_URL); Ctrl-C stops it cleanly."""
    from esper.core.errors import ConfigurationError
    from esper.core.lifecycle import run
    from esper.weatherlight.settings import WeatherlightSettings
    from esper.weatherlight.up import up as run_up

    settings = _settings()
    assert isinstance(settings, WeatherlightSettings)
    if no_trainer and epochs is not None:
        console.print("[red]--epochs needs the trainer[/]")
        raise typer.Exit(2)
    try:
        code = run(lambda: run_up(settings, epochs=epochs, summary_json=summary_json, console=console,
                                  trainer=not no_trainer))
    except ConfigurationError as e:
        console.print(f"[red]configuration error[/]: {e}")
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _exec_module(module: str, *args: str) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def service(ctx: typer.Context, name: Annotated[str, typer.Argument(help=", ".join(SERVICES))]) -> None:
    """Run one service in the foreground: what a container runs (extra arguments pass through)."""
    spec = SERVICES.get(name)
    if spec is None:
        console.print(f"[red]unknown service {name!r}[/]; known: {', '.join(SERVICES)}")
        raise typer.Exit(2)
    _exec_module(spec.module, *(ctx.args or list(spec.args)))


DRILL_HELP = "'all', a service (oona, tamiyo, tolaria), 'oona.bad-input', 'fleet' or 'fleet.redis_restart'"


@app.command()
def drill(name: Annotated[str, typer.Argument(help=DRILL_HELP)] = "all") -> None:
    """Run drills against private Redis servers and real processes; PASS/FAIL table, exit 1 on any FAIL."""
    from esper.core.drills import LOG_LEVEL_ENV
    from esper.core.logging import configure_logging
    from esper.weatherlight.drills import DrillRow, known_drills, run_all

    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "ERROR"), service="esper-drill")

    def echo(row: DrillRow) -> None:
        mark = "[green]PASS[/]" if row.ok else "[red]FAIL[/]"
        console.print(f"{mark} {row.name}: {row.evidence} [{row.seconds:.1f} s]", highlight=False, markup=True,
                      soft_wrap=True)

    rows = run_all(name, echo=echo)
    if rows is None:
        console.print(f"[red]unknown drill {name!r}[/]; known: all, {', '.join(known_drills())}")
        raise typer.Exit(2)
    table = Table(title="drills")
    for col in ("drill", "result", "seconds"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.name, "[green]PASS[/]" if row.ok else "[red]FAIL[/]", f"{row.seconds:.1f}")
    console.print(table)
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed", flush=True)
    raise typer.Exit(0 if rows and not failed else 1)


BENCHES = ("oona", "tamiyo", "blueprints", "tolaria")


@app.command()
def bench(name: Annotated[str, typer.Argument(help=f"'all' or one of {', '.join(BENCHES)}")] = "all") -> None:
    """Run benchmarks from the checkout's bench/ (each writes bench/results/<name>.json)."""
    names = list(BENCHES) if name == "all" else [name]
    if any(n not in BENCHES for n in names):
        console.print(f"[red]unknown bench {name!r}[/]; known: all, {', '.join(BENCHES)}")
        raise typer.Exit(2)
    for n in names:
        script = REPO_ROOT / "bench" / f"{n}_bench.py"
        if not script.exists():
            console.print(f"[red]{script} not found[/]: benchmarks run from a checkout")
            raise typer.Exit(2)
        console.rule(f"bench {n}")
        code = subprocess.call([sys.executable, str(script), "--out", str(REPO_ROOT / f"bench/results/{n}.json")])
        if code != 0:
            raise typer.Exit(code)


@app.command()
def streams(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Lanes, depth, consumer groups (pending, lag) and dead letters of the bus at ESPER_REDIS_URL."""
    import dataclasses

    import redis

    from esper.core.errors import ConfigurationError
    from esper.weatherlight.settings import WeatherlightSettings
    from esper.weatherlight.streams import bus_report

    settings = _settings()
    assert isinstance(settings, WeatherlightSettings)
    try:
        url = settings.require_redis_url()
    except ConfigurationError as e:
        console.print(f"[red]{e}[/] (esper streams reads an existing bus: set ESPER_REDIS_URL)")
        raise typer.Exit(2) from None
    try:
        with redis.Redis.from_url(url, socket_timeout=5) as r:
            report = bus_report(r)
    except redis.RedisError as e:
        console.print(f"[red]cannot read the bus at {url.split('@')[-1]}[/]: {e}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return
    table = Table(title="streams")
    for col in ("channel", "lane", "stream", "depth", "group", "consumers", "pending", "lag"):
        table.add_column(col, justify="right" if col in ("depth", "consumers", "pending", "lag") else "left")
    for s in report.streams:
        if not s.groups:
            table.add_row(s.channel, s.lane, s.stream, str(s.length), "-", "", "", "")
        for i, g in enumerate(s.groups):
            table.add_row(*(s.channel, s.lane, s.stream, str(s.length)) if i == 0 else ("", "", "", ""),
                          g.name, str(g.consumers), str(g.pending), "?" if g.lag is None else str(g.lag))
    console.print(table)
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(report.dead_letters_by_reason.items())) or "none"
    console.print(f"dead letters: {report.dead_letters} ({by_reason}); emergency-lane entries: "
                  f"{report.emergency_entries()}")


@policy_app.command("show")
def policy_show(
    policy_dir: Annotated[Path | None, typer.Option(help="Tamiyo's policy dir (default: TAMIYO_POLICY_DIR or "
                                                         "<var>/tamiyo/policies)")] = None,
) -> None:
    """The live policy on disk (current.json) and the newest PolicyUpdate on the bus, if reachable."""
    from esper.weatherlight.policy import bus_policy, disk_policy
    from esper.weatherlight.settings import WeatherlightSettings

    settings = _settings()
    assert isinstance(settings, WeatherlightSettings)
    directory = policy_dir or Path(os.environ.get("TAMIYO_POLICY_DIR", str(settings.var_dir / "tamiyo/policies")))
    disk = disk_policy(directory)
    console.print_json(data={"disk": disk, "bus": bus_policy(settings)})
    raise typer.Exit(0 if disk.get("present") else 1)


@policy_app.command("publish", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def policy_publish(ctx: typer.Context, path: Annotated[Path, typer.Argument(help="a policy checkpoint file")]) -> None:
    """Sign and publish a policy checkpoint as a PolicyUpdate (via Simic; Tamiyo verifies and applies it)."""
    if not path.is_file():
        console.print(f"[red]{path} is not a file[/]")
        raise typer.Exit(2)
    _exec_module("esper.simic", "publish", str(path), *ctx.args)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def experiment(ctx: typer.Context) -> None:
    """Static host vs heuristic policy vs Simic-trained GNN on the same seeds (options pass to Simic)."""
    _exec_module("esper.simic", "experiment", *ctx.args)


def main() -> None:
    app()
