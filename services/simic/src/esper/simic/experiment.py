"""`python -m esper.simic experiment`: static host vs rule-based Tamiyo vs the GNN after Simic training.

Real processes on a private `redis-server` (as the drills): `python -m esper.urza` (catalogue seeded and
kernels compiled for the host's slot width first), `python -m esper.simic` (the replay store, fed from
`field_report`), `python -m esper.tamiyo` and `python -m esper.tolaria run [--static]`. Every arm trains
on the same seeds (`TOLARIA_SEED` = 0 .. runs-1) for the same epochs:

1. **static**: `tolaria run --static`, no control plane;
2. **heuristic**: Tamiyo with `TAMIYO_POLICY=heuristic`;
3. **explore** (unless `--no-explore`): Tamiyo serving its initial GNN: the closed loop's first turn,
   whose field reports show Simic what the GNN's own actions lead to;
4. Simic trains a candidate from the initial GNN on the replay store (heuristic + explore reports),
   gates it against the initial GNN on held-out runs and, if accepted, publishes it as a signed
   `PolicyUpdate`; the running GNN Tamiyo applies it live (the round's knobs are Simic's: `SIMIC_*`
   from this process's environment, e.g. `SIMIC_FATE_STEPS`; the fleet's processes never see them);
5. **gnn**: the same Tamiyo, now serving the trained policy (or, if the gate refused, still the
   initial one: reported as such, never swapped for something else).

With `reuse` (`--reuse DIR`, an earlier experiment's `--workdir`), the first three arms are not run
again: their summaries are read from `DIR/summaries` and Simic trains on a copy of `DIR`'s replay
store without the earlier gnn arm's reports. So two versions of Simic's training can be compared on
the same data, the arms before them being the same runs (run to run, one repeat of the experiment
moves an arm by up to a point, more than most changes to training do).

Decisions are synchronous (`TOLARIA_DECISION_MODE=sync`, budget `--step-timeout-ms`), so every step
gets its decision and the arms differ only by policy, not by how busy the machine was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry

from esper.core.redis_server import EmbeddedRedis
from esper.leyline import CHANNELS
from esper.oona import OonaClient, OonaMetrics
from esper.simic.pipeline import (
    fetch_blueprints,
    initial_model,
    registries_and_norms,
    run_round,
    save_checkpoint,
)
from esper.simic.publish import publish_policy
from esper.simic.replay import ReplayStore
from esper.simic.settings import SimicSettings

__all__ = ["ARMS", "ExperimentConfig", "run_experiment"]

ARMS = ("static", "heuristic", "explore", "gnn")
# (better, worse) pairs the goal names, compared run by run: `<better>_minus_<worse>` and its `_se`
COMPARISONS = (("gnn", "heuristic"), ("heuristic", "static"), ("gnn", "static"))
_PREFIXES = ("ESPER_", "TAMIYO_", "TOLARIA_", "URZA_", "TEZZERET_", "KASMINA_", "SIMIC_")
READY_S = 120.0  # liveness bounds only, never pass criteria
RUN_S = 900.0
HALT_EXIT = 3  # `tolaria run` after an emergency HALT: the run's summary is still written
DIGITS_FEATURES = 64  # the input slot's width on digits (8x8 pixels)


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    epochs: int = 16
    runs: int = 2
    # The bottleneck host (docs/tolaria.md): a 4-wide layer caps digits at ~0.88 and a seed in the
    # 64-wide input slot can lift it; on the default 32x2 host growth has nothing to add.
    hidden_width: int = 4
    hidden_layers: int = 1
    input_slot: bool = True
    learning_rate: float = 0.03
    step_timeout_ms: float = 200.0
    explore: bool = True
    explore_epsilon: float = 1.0  # the explore arm's GERMINATEs take a random candidate blueprint
    explore_runs: int = 24  # data for Simic: each run tries a few random blueprints (seeds 0 .. n-1)
    # Monte Carlo returns: a seed pays (or costs) epochs after its GERMINATE, past the ~17-decision
    # horizon of the prototype's gamma 0.99 / lambda 0.95 at one decision per step.
    simic_gamma: float = 1.0
    simic_gae_lambda: float = 1.0
    # How both policies' seeds blend in (TAMIYO_BLEND_MODE_DEFAULT). Under CONVEX an input-slot seed must
    # reproduce all 64 features and G4 culls most; RESIDUAL keeps more of them but measured worse (docs).
    blend_mode: str = "CONVEX"
    # Candidate blueprints in each decision's graph (TAMIYO_MAX_BLUEPRINTS, SIMIC_MAX_BLUEPRINTS), lowest
    # risk first: at Tamiyo's 8 the designs that pay in the input slot (highway, squeeze-excitation,
    # rational activation, ...) were never offered (docs/simic.md, session 12).
    max_blueprints: int = 16
    # Tamiyo's GNN never regrows a design in a seed where Kasmina culled it earlier in the run
    # (TAMIYO_CULL_MEMORY), as the rule-based policy never does.
    cull_memory: bool = True
    workdir: Path | None = None  # kept when given; a temp dir otherwise
    # An earlier experiment's workdir: its static, heuristic and explore arms (summaries and replay store)
    # are reused, and only Simic's round and the gnn arm run again (module docstring).
    reuse: Path | None = None


@dataclass(slots=True)
class ArmResult:
    summaries: list[dict[str, Any]] = field(default_factory=list)

    def mean(self, key: str) -> float:
        vals = [float(s.get(key) or 0.0) for s in self.summaries]
        return statistics.fmean(vals) if vals else float("nan")

    def accuracies(self) -> list[float]:
        return [float(s.get("final_val_accuracy") or 0.0) for s in self.summaries]

    def curve(self) -> list[float]:
        curves = [s.get("val_accuracy_by_epoch") or [] for s in self.summaries]
        n = min((len(c) for c in curves), default=0)
        return [statistics.fmean(c[i] for c in curves) for i in range(n)]

    def decisions_per_epoch(self) -> float:
        vals = [float(s.get("decisions") or 0) / max(1, int(s.get("epochs") or 1)) for s in self.summaries]
        return statistics.fmean(vals) if vals else float("nan")


class _Processes:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, module: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env={**self.env, **env}, cwd=self.root,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def run(self, name: str, module: str, *args: str, **env: str) -> int:
        proc = self.start(name, module, *args, **env)
        try:
            return proc.wait(RUN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{name} did not finish within {RUN_S:g} s: {self.tail(name)}") from None

    def tail(self, name: str, limit: int = 800) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-limit:] if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for f in self._logs:
            f.close()


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="esper-simic-experiment-") as tmp:
        yield Path(tmp)


def _base_env(root: Path, redis_url: str, cfg: ExperimentConfig) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
    # Kernels for every slot width (Tezzeret's `v<width>` keys), graphs for the first (shallowest) slot's.
    widths = ([DIGITS_FEATURES] if cfg.input_slot else []) + [cfg.hidden_width]
    slots = [f"v{w}" for w in dict.fromkeys(widths)]
    return {**base, "ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secrets.token_hex(16),
            "ESPER_LOG_LEVEL": "WARNING", "ESPER_LOG_FORMAT": "json", "ESPER_METRICS_PORT": "-1",
            "URZA_DATABASE_URL": f"sqlite:///{root}/urza/catalog.db", "URZA_ARTIFACT_DIR": str(root / "urza/a"),
            "URZA_SEED_SLOT": slots[0], "TEZZERET_SLOTS": json.dumps(slots),
            "SIMIC_REPLAY_PATH": str(root / "simic/replay.db"), "TOLARIA_HIDDEN_WIDTH": str(cfg.hidden_width),
            "TOLARIA_HIDDEN_LAYERS": str(cfg.hidden_layers), "TOLARIA_INPUT_SLOT": str(cfg.input_slot).lower(),
            "TOLARIA_LR": repr(cfg.learning_rate), "TOLARIA_EPOCHS": str(cfg.epochs),
            "TOLARIA_DECISION_MODE": "sync", "TAMIYO_STEP_TIMEOUT_MS": repr(cfg.step_timeout_ms),
            "TOLARIA_KERNEL_WAIT_MS": "2000",  # a seed's kernel attaches at the boundary after its germination
            "TOLARIA_EMERGENCY_ENABLED": "false", "TAMIYO_METADATA_TIMEOUT_MS": "500",
            "TAMIYO_ENABLE_BLEND_MODE_ANN": "true", "TAMIYO_BLEND_MODE_DEFAULT": cfg.blend_mode,
            "TAMIYO_MAX_BLUEPRINTS": str(cfg.max_blueprints), "TAMIYO_CULL_MEMORY": str(cfg.cull_memory).lower()}


def _redis_until(url: str, what: str, check: Any, timeout_s: float = READY_S) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ResponseError):
                if check(client):
                    return
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"timed out waiting for {what}")


def _drained(client: Any) -> bool:
    """Simic's group has read and acknowledged everything on both lanes of `field_report`."""
    for stream in CHANNELS["field_report"].streams:
        if not client.exists(stream):
            continue
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in client.xinfo_groups(stream)}
        g = groups.get("simic")
        if g is None or g["pending"] or (g.get("lag") or 0):
            return False
    return True


def _outbox_empty(tamiyo_var: Path) -> bool:
    db = tamiyo_var / "field_reports.db"
    if not db.exists():
        return True
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as con:
        return int(con.execute("SELECT COUNT(*) FROM reports WHERE state = 'pending'").fetchone()[0]) == 0


def _wait_reports_stored(url: str, tamiyo_var: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline and not _outbox_empty(tamiyo_var):
        time.sleep(0.2)
    _redis_until(url, "Simic to store every field report", _drained)


def _start_tamiyo(procs: _Processes, url: str, name: str, policy: str, var: Path, **env: str) -> None:
    procs.start(name, "esper.tamiyo", "run", TAMIYO_POLICY=policy, TAMIYO_VAR_DIR=str(var),
                TAMIYO_POLICY_DIR=str(var / "policies"), ESPER_INSTANCE_ID=name, **env)
    _redis_until(url, f"{name} ready", lambda r: r.exists(f"esper.heartbeat.tamiyo.{name}"))


def _train_run(procs: _Processes, root: Path, arm: str, seed: int, *extra: str) -> dict[str, Any]:
    name = f"{arm}-s{seed}"
    summary = root / "summaries" / f"{name}.json"
    rc = procs.run(name, "esper.tolaria", "run", *extra, TOLARIA_SEED=str(seed), TOLARIA_RUN_ID=name,
                   TOLARIA_VAR_DIR=str(root / "tolaria" / name), TOLARIA_SUMMARY_JSON=str(summary))
    if rc not in (0, HALT_EXIT) or not summary.exists():  # a HALT is an outcome of the arm, kept and counted
        raise RuntimeError(f"{name} exited {rc}: {procs.tail(name)}")
    out: dict[str, Any] = json.loads(summary.read_text())
    return out


async def _train_and_publish(env: dict[str, str], root: Path, gnn_var: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    settings = SimicSettings(redis_url=env["ESPER_REDIS_URL"], leyline_secret=env["ESPER_LEYLINE_SECRET"],
                             replay_path=root / "simic/replay.db", policy_dir=root / "simic/policies",
                             metrics_port=-1, gamma=cfg.simic_gamma, gae_lambda=cfg.simic_gae_lambda,
                             max_blueprints=cfg.max_blueprints)
    with ReplayStore(settings.replay_path) as store:
        reports = store.reports(limit=1_000_000)
    client = OonaClient.from_settings(settings, sender="simic", metrics=OonaMetrics(CollectorRegistry()))
    async with client:
        blueprints = await fetch_blueprints(client, timeout_ms=settings.catalog_timeout_ms)
        registries, norms = registries_and_norms(settings)
        t0 = time.perf_counter()
        result = await asyncio.to_thread(run_round, reports, initial_model(), settings, blueprints=blueprints,
                                         registries=registries, normaliser=norms)
        info: dict[str, Any] = {
            "reports": len(reports), "samples": result.samples, "holdout": result.holdout, "actions": result.actions,
            "train_steps": result.train.steps, "train_first_loss": result.train.first_loss,
            "train_last_loss": result.train.last_loss, "train_s": round(time.perf_counter() - t0, 1),
            "fate_first_loss": result.train.fate_losses[0] if result.train.fate_losses else None,
            "fate_last_loss": result.train.fate_losses[-1] if result.train.fate_losses else None,
            "gate_accepted": result.gate.accepted, "gate_candidate_score": result.gate.candidate_score,
            "gate_current_score": result.gate.current_score, "gate_reason": result.gate.reason,
            "policy_version": result.policy_version, "applied": False}
        path = save_checkpoint(result.checkpoint, settings.policy_dir)
        info["checkpoint"] = str(path)
        if not result.gate.accepted:
            return info
        update = await publish_policy(client, result.checkpoint, training_run_id="simic-experiment")
        info["policy_id"] = update.policy_id
    pointer = gnn_var / "policies" / "current.json"
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(pointer.read_text()).get("policy_id") == update.policy_id:
                info["applied"] = True
                break
        await asyncio.sleep(0.2)
    return info


def run_experiment(cfg: ExperimentConfig, *, log: Any = print) -> dict[str, Any]:
    """Run every arm; returns the flat result (see `results`)."""
    t0 = time.monotonic()
    arms = {a: ArmResult() for a in ARMS}
    server = EmbeddedRedis()
    server.start()
    try:
        with _workdir(cfg.workdir) as root:
            env = _base_env(root, server.url, cfg)
            procs = _Processes(root, env)
            try:
                training = _run_arms(procs, root, env, server.url, cfg, arms, log)
            finally:
                procs.stop_all()
    finally:
        server.stop()
    return results(cfg, arms, training, wall_s=time.monotonic() - t0)


def _run_arms(procs: _Processes, root: Path, env: dict[str, str], url: str, cfg: ExperimentConfig,
              arms: dict[str, ArmResult], log: Any) -> dict[str, Any]:
    if cfg.reuse is not None:  # read first: a workdir that lacks a run fails before anything starts
        check_reusable(cfg, cfg.reuse)
        for arm, arm_seeds in (("static", range(cfg.runs)), ("heuristic", range(cfg.runs)),
                               ("explore", range(cfg.explore_runs if cfg.explore else 0))):
            arms[arm].summaries.extend(reused_summaries(cfg.reuse, arm, arm_seeds))
    (root / CONFIG_FILE).write_text(json.dumps(_data_shaping(cfg), indent=1, sort_keys=True) + "\n")
    for cmd in (("esper.urza", "seed"), ("esper.tezzeret", "compile")):
        if procs.run(cmd[0].removeprefix("esper.") + "-prepare", *cmd) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {procs.tail(cmd[0].removeprefix('esper.') + '-prepare')}")
    procs.start("urza", "esper.urza", "run", ESPER_INSTANCE_ID="urza")
    retention: dict[str, str] = {}
    if cfg.reuse is not None:
        kept = copy_replay(cfg.reuse / "simic/replay.db", root / "simic/replay.db")
        log(f"reusing {cfg.reuse}: {kept} field reports, and its static, heuristic and explore runs")
        retention["SIMIC_RETENTION_HOURS"] = "87600"  # the service would prune reports issued over a day ago
    procs.start("simic", "esper.simic", "run", ESPER_INSTANCE_ID="simic", **retention)
    _redis_until(url, "Simic's consumer group", lambda r: any(
        (g["name"] in (b"simic", "simic")) for g in r.xinfo_groups(CHANNELS["field_report"].stream("normal"))))
    seeds = range(cfg.runs)
    if cfg.reuse is None:
        _run_data_arms(procs, root, url, cfg, arms, log)
    gnn_var = root / "tamiyo-gnn"
    _start_tamiyo(procs, url, "tamiyo-gnn", "gnn", gnn_var)  # the initial GNN, no exploration: Simic updates it
    training = asyncio.run(_train_and_publish(env, root, gnn_var, cfg))
    log(f"simic: {training['samples']} decisions, gate {'accepted' if training['gate_accepted'] else 'refused'} "
        f"({training['gate_reason']}), applied {training['applied']}")
    for seed in seeds:
        arms["gnn"].summaries.append(_train_run(procs, root, "gnn", seed))
        log(f"gnn seed {seed}: {arms['gnn'].summaries[-1]['final_val_accuracy']:.4f}")
    return training


def _run_data_arms(procs: _Processes, root: Path, url: str, cfg: ExperimentConfig, arms: dict[str, ArmResult],
                   log: Any) -> None:
    """The static, heuristic and explore arms: the yardsticks, and the field reports Simic trains on."""
    seeds = range(cfg.runs)
    for seed in seeds:
        arms["static"].summaries.append(_train_run(procs, root, "static", seed, "--static"))
        log(f"static seed {seed}: {arms['static'].summaries[-1]['final_val_accuracy']:.4f}")
    _start_tamiyo(procs, url, "tamiyo-heuristic", "heuristic", root / "tamiyo-heuristic")
    for seed in seeds:
        arms["heuristic"].summaries.append(_train_run(procs, root, "heuristic", seed))
        log(f"heuristic seed {seed}: {arms['heuristic'].summaries[-1]['final_val_accuracy']:.4f}")
    _wait_reports_stored(url, root / "tamiyo-heuristic")
    procs.stop("tamiyo-heuristic")
    if cfg.explore:
        _start_tamiyo(procs, url, "tamiyo-explore", "gnn", root / "tamiyo-explore",
                      TAMIYO_EXPLORE_EPSILON=repr(cfg.explore_epsilon))
        for seed in range(cfg.explore_runs):
            arms["explore"].summaries.append(_train_run(procs, root, "explore", seed))
            log(f"explore (initial GNN) seed {seed}: {arms['explore'].summaries[-1]['final_val_accuracy']:.4f}")
        _wait_reports_stored(url, root / "tamiyo-explore")
        procs.stop("tamiyo-explore")


CONFIG_FILE = "experiment-config.json"
# What shapes the runs and the field reports: a reused workdir must match on all of them.
_DATA_FIELDS = ("epochs", "hidden_width", "hidden_layers", "input_slot", "learning_rate", "step_timeout_ms",
                "explore", "explore_epsilon", "explore_runs", "blend_mode", "max_blueprints", "cull_memory")
# What a workdir written before a setting existed ran with.
_BEFORE_RECORDED = {"cull_memory": False}


def _data_shaping(cfg: ExperimentConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in _DATA_FIELDS}


def check_reusable(cfg: ExperimentConfig, source: Path) -> None:
    """Refuse to reuse `source` when its runs were made with other settings than `cfg`'s (its
    `experiment-config.json`; a workdir from before that file existed cannot be checked and is taken
    as it is): Simic would rebuild the graphs with another candidate cap, or compare other hosts."""
    path = source / CONFIG_FILE
    if not path.is_file():
        return
    theirs = {**_BEFORE_RECORDED, **json.loads(path.read_text())}
    diff = {k: (theirs.get(k), v) for k, v in _data_shaping(cfg).items() if theirs.get(k) != v}
    if diff:
        raise ValueError(f"{source} was run with other settings (theirs, ours): {diff}")


def reused_summaries(source: Path, arm: str, seeds: range) -> list[dict[str, Any]]:
    """`arm`'s run summaries on `seeds` from an earlier experiment's workdir (`reuse`)."""
    out: list[dict[str, Any]] = []
    for seed in seeds:
        path = source / "summaries" / f"{arm}-s{seed}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {source} has no {arm} run on seed {seed} to reuse")
        out.append(json.loads(path.read_text()))
    return out


def copy_replay(source: Path, dest: Path) -> int:
    """Copy the replay store `source` to `dest` without the gnn arm's reports (runs `gnn-s<seed>`: its
    round had not seen them); returns how many reports the copy holds.

    SQLite's backup API rather than a file copy: it reads a consistent store, WAL included."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no replay store to reuse")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: reuse into a fresh workdir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(dest)) as dst:
        src.backup(dst)
        with dst:
            dst.execute("DELETE FROM reports WHERE training_run_id LIKE 'gnn-s%'")
        return int(dst.execute("SELECT COUNT(*) FROM reports").fetchone()[0])


def results(cfg: ExperimentConfig, arms: dict[str, ArmResult], training: dict[str, Any], *,
            wall_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": cfg.epochs, "runs": cfg.runs, "hidden_width": cfg.hidden_width,
                           "hidden_layers": cfg.hidden_layers, "input_slot": cfg.input_slot,
                           "learning_rate": cfg.learning_rate, "explore": cfg.explore,
                           "explore_epsilon": cfg.explore_epsilon, "explore_runs": cfg.explore_runs,
                           "simic_gamma": cfg.simic_gamma, "simic_gae_lambda": cfg.simic_gae_lambda,
                           "blend_mode": cfg.blend_mode, "max_blueprints": cfg.max_blueprints,
                           "cull_memory": cfg.cull_memory,
                           "reused_from": str(cfg.reuse) if cfg.reuse is not None else None, "wall_s": round(wall_s, 1)}
    for name, arm in arms.items():
        if not arm.summaries:
            continue
        out[f"{name}_acc"] = arm.mean("final_val_accuracy")
        out[f"{name}_acc_runs"] = arm.accuracies()
        out[f"{name}_acc_by_epoch"] = arm.curve()
        out[f"{name}_params_added"] = arm.mean("seed_parameters")
        out[f"{name}_fossilized"] = arm.mean("seeds_fossilized")
        out[f"{name}_culled"] = arm.mean("seeds_culled")
        out[f"{name}_halted"] = sum(bool(x.get("halted")) for x in arm.summaries)
        out[f"{name}_decisions_per_epoch"] = arm.decisions_per_epoch()
        out[f"{name}_commands"] = _sum_dicts(s.get("commands_by_type") or {} for s in arm.summaries)
    for better, worse in COMPARISONS:
        if f"{better}_acc" in out and f"{worse}_acc" in out:  # both arms finished runs
            diff = paired_difference(arms[better].accuracies(), arms[worse].accuracies())
            out[f"{better}_minus_{worse}"], out[f"{better}_minus_{worse}_se"] = diff
    if all(f"{arm}_acc" in out for arm in ("static", "heuristic", "gnn")):
        out["goal_met"] = out["gnn_acc"] >= out["heuristic_acc"] > out["static_acc"]
    for key, value in training.items():
        out[f"simic_{key}"] = value
    return out


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of `a[i] - b[i]` over the runs both arms finished (run i of every arm
    trains on seed i, so the seed's share of the spread cancels); the error is None for one run."""
    diffs = [x - y for x, y in zip(a, b, strict=False)]
    if not diffs:
        raise ValueError("no paired runs")
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def _sum_dicts(dicts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Simic experiment: {result['runs']} run(s) x {result['epochs']} epochs per arm "
                        f"(digits, host {_host_label(result)})")
    for col in ("arm", "val accuracy (mean)", "per run", "params added", "fossilised", "culled", "decisions/epoch",
                "commands"):
        table.add_column(col)
    for arm in ARMS:
        if f"{arm}_acc" not in result:
            continue
        label = {"explore": "gnn (initial, explore)", "gnn": "gnn (after Simic)"}.get(arm, arm)
        table.add_row(label, f"{result[f'{arm}_acc']:.4f}", " ".join(f"{a:.4f}" for a in result[f"{arm}_acc_runs"]),
                      f"{result[f'{arm}_params_added']:.0f}", f"{result[f'{arm}_fossilized']:.1f}",
                      f"{result[f'{arm}_culled']:.1f}", f"{result[f'{arm}_decisions_per_epoch']:.1f}",
                      ", ".join(f"{k.removeprefix('COMMAND_').lower()} {v}"
                                for k, v in sorted(result[f"{arm}_commands"].items())))
    console = Console(width=None if sys.stdout.isatty() else 150)  # a pipe or a log file: keep rows readable
    console.print(table)
    verdict = "ACCEPTED" if result.get("simic_gate_accepted") else "REFUSED"
    pairs = [f"{b} - {w} {result[f'{b}_minus_{w}']:+.4f}" + _se(result.get(f"{b}_minus_{w}_se"))
             for b, w in COMPARISONS if f"{b}_minus_{w}" in result]
    if pairs:
        goal = {True: "met", False: "not met", None: "not measured"}[result.get("goal_met")]
        console.print(f"Paired by seed: {'; '.join(pairs)}. Goal (gnn >= heuristic > static): {goal}")
    console.print(f"Simic: {result.get('simic_samples')} decisions ({result.get('simic_actions')}), held out "
                  f"{result.get('simic_holdout')}; gate {verdict}: {result.get('simic_gate_reason')}; "
                  f"applied live: {result.get('simic_applied')}; wall {result['wall_s']:.0f} s")


def _se(se: float | None) -> str:
    return "" if se is None else f" ± {se:.4f}"


def _host_label(result: dict[str, Any]) -> str:
    layers = int(result.get("hidden_layers") or 2)
    label = "x".join([str(result["hidden_width"])] * layers)
    return f"{label} + input slot" if result.get("input_slot") else label


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in ARMS:
        curve: Sequence[float] = result.get(f"{arm}_acc_by_epoch") or []
        if curve:
            label = {"explore": "GNN, initial (explore)", "gnn": "GNN after Simic"}.get(arm, arm)
            # Dashed/dotted styles keep identical curves (a policy that never acts = static) visible.
            style = {"static": "--", "explore": ":"}.get(arm, "-")
            ax.plot(range(1, len(curve) + 1), curve, style, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation accuracy (mean of {result['runs']} runs)")
    ax.set_title(f"digits, host {_host_label(result)}: static vs rule-based vs learned Tamiyo")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
