"""`python -m esper.simic [run|train|publish PATH|experiment]`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from esper.simic.settings import SimicSettings

app = typer.Typer(add_completion=False, help="Simic: Esper's learner (replay store, offline training, policy updates).")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, run the service (what the container runs)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@app.command()
def run() -> None:
    """Store field reports from the bus, and train (and publish) on a schedule, until SIGTERM."""
    from esper.oona.cli import serve_or_exit
    from esper.simic.service import serve
    from esper.simic.settings import SimicSettings

    serve_or_exit("simic", SimicSettings, serve)


def _settings() -> SimicSettings:
    from pydantic import ValidationError

    from esper.core.errors import ConfigurationError
    from esper.simic.settings import SimicSettings

    try:
        settings = SimicSettings()
        settings.signing_keys()
        settings.require_redis_url()
    except (ConfigurationError, ValidationError) as e:
        typer.echo(f"simic: configuration error: {e}", err=True)
        raise typer.Exit(2) from None
    return settings


@app.command()
def publish(path: Annotated[Path, typer.Argument(help="policy checkpoint (encode_checkpoint format)")],
            policy_id: Annotated[str | None, typer.Option(help="default: simic-<sha256 prefix>")] = None,
            run_id: Annotated[str, typer.Option(help="training_run_id recorded in the update")] = "") -> None:
    """Publish a checkpoint as a signed PolicyUpdate on `policy` (every Tamiyo replica applies it)."""
    import asyncio
    import json

    from esper.oona import OonaClient, PublishError
    from esper.simic.publish import publish_policy
    from esper.tamiyo.checkpoint import PolicyUpdateRejected

    settings = _settings()

    async def go() -> dict[str, object]:
        async with OonaClient.from_settings(settings, sender="simic") as client:
            update = await publish_policy(client, path, policy_id=policy_id, training_run_id=run_id)
        return {"policy_id": update.policy_id, "policy_version": update.tamiyo_policy_version,
                "bytes": len(update.payload)}

    try:
        typer.echo(json.dumps(asyncio.run(go()), sort_keys=True))
    except (OSError, PolicyUpdateRejected, PublishError) as e:
        typer.echo(f"simic: not published: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def train(current: Annotated[Path | None, typer.Option(help="the policy to beat (default: Tamiyo's initial)")] = None,
          publish_: Annotated[bool, typer.Option("--publish", help="publish if the gate accepts")] = False) -> None:
    """Train a candidate on the replay store, gate it on held-out runs, write it to SIMIC_POLICY_DIR;
    with --publish, publish it when (and only when) the gate accepts. Exit 1 when the gate refuses."""
    import asyncio
    import json

    from esper.oona import OonaClient, RequestTimeoutError
    from esper.simic.pipeline import (
        fetch_blueprints,
        initial_model,
        load_model,
        registries_and_norms,
        run_round,
        save_checkpoint,
    )
    from esper.simic.publish import publish_policy
    from esper.simic.replay import ReplayStore

    settings = _settings()
    registries, norms = registries_and_norms(settings)
    model = initial_model() if current is None else load_model(current, registries)[0]
    with ReplayStore(settings.replay_path) as store:
        reports = store.reports(limit=1_000_000)

    async def go() -> dict[str, object]:
        async with OonaClient.from_settings(settings, sender="simic") as client:
            try:
                blueprints = await fetch_blueprints(client, timeout_ms=settings.catalog_timeout_ms)
            except RequestTimeoutError:
                typer.echo("simic: no blueprint catalogue from Urza; training without blueprint nodes", err=True)
                blueprints = ()
            result = await asyncio.to_thread(run_round, reports, model, settings, blueprints=blueprints,
                                             registries=registries, normaliser=norms)
            path = save_checkpoint(result.checkpoint, settings.policy_dir)
            out: dict[str, object] = {"checkpoint": str(path), "policy_version": result.policy_version,
                                      "samples": result.samples, "holdout": result.holdout,
                                      "accepted": result.gate.accepted, "candidate_score": result.gate.candidate_score,
                                      "current_score": result.gate.current_score, "reason": result.gate.reason}
            if publish_ and result.gate.accepted:
                out["policy_id"] = (await publish_policy(client, result.checkpoint)).policy_id
            return out

    out = asyncio.run(go())
    typer.echo(json.dumps(out, sort_keys=True))
    raise typer.Exit(0 if out["accepted"] else 1)


@app.command()
def experiment(epochs: Annotated[int, typer.Option(min=1)] = 16, runs: Annotated[int, typer.Option(min=1)] = 2,
               hidden_width: Annotated[int, typer.Option(min=1, help="host hidden width")] = 4,
               hidden_layers: Annotated[int, typer.Option(min=1, help="host hidden layers")] = 1,
               input_slot: Annotated[bool, typer.Option(help="a seed slot on the host's input")] = True,
               lr: Annotated[float, typer.Option(help="host learning rate")] = 0.03,
               explore: Annotated[bool, typer.Option(help="run the initial GNN first (closed loop)")] = True,
               explore_epsilon: Annotated[float, typer.Option(
                   min=0.0, max=1.0, help="explore arm: chance a GERMINATE takes a random blueprint")] = 1.0,
               explore_runs: Annotated[int, typer.Option(min=1, help="explore arm's runs (Simic's data)")] = 24,
               gamma: Annotated[float, typer.Option(min=0.0, max=1.0, help="Simic's reward discount")] = 1.0,
               gae_lambda: Annotated[float, typer.Option(min=0.0, max=1.0, help="Simic's GAE lambda")] = 1.0,
               blend_mode: Annotated[str, typer.Option(help="how seeds blend in (CONVEX, RESIDUAL, ...)")] = "CONVEX",
               max_blueprints: Annotated[int, typer.Option(
                   min=1, max=64, help="candidate blueprints per decision (Tamiyo's and Simic's)")] = 16,
               cull_memory: Annotated[bool, typer.Option(
                   help="the GNN never regrows a design culled in that seed this run")] = True,
               json_path: Annotated[Path | None, typer.Option("--json", help="write the flat result here")] = None,
               png: Annotated[Path | None, typer.Option(help="write the accuracy plot here")] = None,
               workdir: Annotated[Path | None, typer.Option(help="keep logs, summaries, replay store here")] = None,
               reuse: Annotated[Path | None, typer.Option(
                   help="an earlier --workdir: reuse its static, heuristic, explore runs; rerun Simic, gnn")] = None,
               ) -> None:
    """Static host vs rule-based Tamiyo vs the GNN after Simic training, same seeds and epochs."""
    import json
    import signal

    from esper.simic.experiment import ExperimentConfig, plot, print_table, run_experiment

    cfg = ExperimentConfig(epochs=epochs, runs=runs, hidden_width=hidden_width, hidden_layers=hidden_layers,
                           input_slot=input_slot, learning_rate=lr, explore=explore,
                           explore_epsilon=explore_epsilon, explore_runs=explore_runs, simic_gamma=gamma,
                           simic_gae_lambda=gae_lambda, blend_mode=blend_mode, max_blueprints=max_blueprints,
                           cull_memory=cull_memory, workdir=workdir, reuse=reuse)
    # SIGTERM unwinds like Ctrl-C, so the fleet and the private redis-server are stopped, never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run_experiment(cfg, log=lambda line: typer.echo(line, err=True))
    print_table(result)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if png is not None:
        plot(result, png)


if __name__ == "__main__":
    sys.exit(app())
