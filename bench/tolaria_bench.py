"""Tolaria benchmark: trainer overhead of the control plane, rollback latency, grown vs static accuracy.

Run: `.venv/bin/python bench/tolaria_bench.py --out bench/results/tolaria.json` (`make bench-tolaria`).

- overhead (`overhead_ratio`): step time of the Tolaria loop with the control plane on — pipelined
  decisions from a real Tamiyo *process*, Kasmina, per-step rollback snapshots, packets — divided by
  the step time of a plain PyTorch loop over the same model, data and steps, measured in the same run
  (`plain_step_ms`, `control_step_ms`). Both exclude validation. The plain loop is interleaved with
  the run it is the baseline of: after each trainer epoch, the same epoch of a `PlainLoop` (timed
  apart), so both step times are taken under the same machine conditions (this VM drifts by tens of
  percent between runs; `plain_step_ms_separate_runs` are plain runs before and after, for reference).
  `overhead_ratio_w512` / `overhead_ratio_w1024`: the same on wider hosts (`SCALE_WIDTHS` x 2 hidden
  layers, plain steps ~2 and ~8 ms), median of `SCALE_ROUNDS` runs. As ARCHITECTURE §11 states the
  budget, with two or more cores the trainer process (training and bus threads) is pinned to one core
  and the fleet (Tamiyo, Urza, Redis) to the others (`os.sched_setaffinity`; `pinned`,
  `trainer_cores`, `fleet_cores` record what was done; `--no-pin` turns it off); the plain loop runs
  in the trainer's process, so it is measured under the same pinning. "A decision every step": the
  overhead run keeps the decision breaker closed (`TOLARIA_DECISION_BREAKER_FAILURES` very large),
  otherwise a few timeouts would put it in conservative mode and the run would stop asking Tamiyo;
  `pipelined_packets_sent` and `pipelined_conservative_steps` show what was asked.
- transports: `overhead_ratio` is the default (`TOLARIA_DECISION_TRANSPORT=process`: requests in the
  sidecar process, pinned to the fleet's cores), `overhead_ratio_thread` the same run with requests on
  the trainer's bus thread (`thread_*` keys); `static_trainer_step_ms` is the trainer with no control
  plane at all (grad norm, signals, rollback snapshots), which splits the overhead into the trainer's
  own work and the bus's.
- heap: the process keeps freed memory as `python -m esper.tolaria` does (`TOLARIA_MALLOC_KEEP_MB`,
  `heap_kept_mb`; 0 runs the bench on glibc's defaults). `control_faults_per_step`,
  `plain_faults_per_step` and `w<width>_*faults_per_step_runs` are the minor page faults of a step.
- answered (`overhead_ratio_w<widest>_answered`): at the 5 ms budget Tamiyo, sharing the fleet core,
  times out or answers BREAKER_OPEN to nearly every packet, so the runs above apply no command. The
  widest host runs again with a 30 ms budget (`ANSWERED_BUDGET_MS`), where its replies are commands
  that Kasmina verifies and applies (`w<widest>_answered_commands_by_type_runs`; a reply more than
  `TOLARIA_MAX_STALENESS_STEPS` steps old is discarded, counted in `..._commands_stale_runs`), from a
  Tamiyo restarted so that it grows nothing (`NO_GROWTH`): the model stays the plain loop's.
- deep (`overhead_ratio_deep`): a step of the size the budget is about. `DEEP_HOST` (4 x 1024 hidden,
  batch 256, a seeded synthetic 8192 x 256 dataset: ~63 ms a plain step on one core), `DEEP_EPOCHS`
  epochs (104 steps) per run, the answered variant's budget and no-growth Tamiyo (every reply a
  command that Kasmina verifies and applies, the model the plain loop's), the ring sized to keep its
  snapshots (160 MiB: the 32 MiB default refuses a 41 MB state uncopied, and a run without
  snapshots pays nothing for them). One warm-up run first, reported apart (`deep_warmup_ratio_runs`):
  the first run of a host larger than any before it grows the heap, a page fault at a time. Snapshot
  copies run beside the step on the fleet's cores, as the sidecar does (`copier_cores`);
  `overhead_ratio_deep_inline` is the same arm with the copies made in line at the step's end
  (`TOLARIA_ROLLBACK_SNAPSHOT_ASYNC=false`, the behaviour before session 18).
- rollback (`rollback_fast_*`, `rollback_checkpoint_*`): `RollbackManager.rollback` on the digits host
  from the in-memory ring and, with the ring empty, from the newest checkpoint on disk; a restore past
  the deadline is timed and counted (`rollback_deadline_misses`), not a crash of the bench.
- accuracy (`accuracy_grown`, `accuracy_static`): the same seeds and epochs, once with the host alone
  and once with the fleet deciding every step (sync mode, so every decision is applied at its step),
  on the bottleneck host of `make experiment` (`GROWTH_HOST`: 4 wide, 1 layer, a seed slot on the
  input, lr 0.03; docs/tolaria.md), where a seed can pay: on the 32x2 host growth has nothing to add.
  Tamiyo serves its initial (untrained) GNN; `make experiment` compares trained and rule-based policies.

On a GPU (`--device cuda`, or `auto` where CUDA is present) the host, data and plain loop live on the
device; the plain loop queues its kernels without waiting (no `.item()`), so its epoch is timed up to a
`torch.cuda.synchronize()`, and so is the trainer's last step of an epoch. `--widths` / `--rounds`
choose the wider hosts; a GPU step of the digits host is launch-bound at every width up to 4096, so
`--scale-layers`, `--scale-batch` and `--scale-samples` / `--scale-features` (a seeded synthetic
dataset) make their steps heavier. `device`, `gpu` and `scale_*` record where and what it ran.

Nothing is asserted; goals are recorded as flags (overhead ≤ 3%: `goal_overhead_met`, `..._w<width>`,
`..._deep`). The JSON is rewritten after each
section (`complete` false until the last), so a run cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esper.core.redis_server import EmbeddedRedis
from esper.tolaria.bus import BusThread
from esper.tolaria.data import epoch_generator, iter_batches, load_dataset
from esper.tolaria.heap import keep_freed_memory
from esper.tolaria.host import build_host
from esper.tolaria.rollback import RollbackDeadlineExceeded, RollbackManager
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer, make_optimizer

try:
    from bench.benchlib import git_state, percentile, redis_version
except ImportError:  # run as a script: bench/ is on sys.path
    from benchlib import git_state, percentile, redis_version  # type: ignore[import-not-found,no-redef]

EPOCHS = 8
WIDTH = 32
SCALE_WIDTHS = (512, 1024)  # the same measurement on wider hosts (longer steps: is the overhead a constant?)
SCALE_ROUNDS = 3
GOAL_RATIO = 1.03  # ARCHITECTURE §11: ≤ 3% over a plain PyTorch loop
# At the 5 ms budget Tamiyo, sharing the fleet core, times out or answers BREAKER_OPEN to nearly every
# packet, so no command is ever applied; this budget lets it answer (staleness still applies).
ANSWERED_BUDGET_MS = 30.0
ANSWERED = "_answered"
# ... and the Tamiyo it asks grows nothing (every GERMINATE becomes a PAUSE, `germinate_too_late`), so
# the run trains the same model as its plain loop: a grown seed's compute is growth's cost, not overhead.
NO_GROWTH = {"TAMIYO_GERMINATE_MIN_REMAINING_STEPS": str(10**9)}
# A step of the size the budget is about (ARCHITECTURE §11): 4 x 1024 hidden, batch 256, a seeded synthetic
# 8192 x 256 dataset, ~63 ms a step on one core of the dev machine. The ring holds four snapshots of its
# state (3.4 M parameters with Adam's moments: 41 MB), so the fast tier works and its copies are paid for
# (the 32 MiB default refuses them, uncopied: no snapshot, no cost, no fast rollback).
DEEP, DEEP_INLINE = "_deep", "_deep_inline"
DEEP_HOST: dict[str, Any] = {"hidden_width": 1024, "hidden_layers": 4, "batch_size": 256, "rollback_fast_cap_mb": 160.0}
DEEP_SAMPLES, DEEP_FEATURES, DEEP_EPOCHS = 8192, 256, 4
GROWTH_EPOCHS = 16
GROWTH_HOST: dict[str, Any] = {"hidden_width": 4, "hidden_layers": 1, "input_slot": True, "learning_rate": 0.03}
DIGITS_FEATURES = 64  # the input slot's width


def minor_faults() -> int:
    """Page faults of the calling thread so far (Linux; 0 elsewhere): read outside the timed windows, they
    show what `TOLARIA_MALLOC_KEEP_MB` does (`*faults_per_step`)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt if hasattr(resource, "RUSAGE_THREAD") else 0


def sync(device: torch.device) -> None:
    """Wait for the queued kernels (CUDA); a no-op on the CPU, where every op has finished already."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The baseline: the same host, data order, optimizer and device, nothing else."""

    def __init__(self, settings: TolariaSettings) -> None:
        torch.manual_seed(settings.seed)
        self.settings = settings
        self.device = settings.torch_device()
        self.data = load_dataset(settings.dataset_path, seed=settings.seed,
                                 val_fraction=settings.val_fraction).to(self.device)
        self.host = build_host(self.data.meta, hidden=settings.host_hidden(), input_slot=settings.input_slot,
                               seed=settings.seed).to(self.device)
        self.opt = make_optimizer(settings, self.host.parameters())
        self.seconds, self.steps, self.faults = 0.0, 0, 0

    def epoch(self, epoch: int, read: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object] | None = None,
              ) -> None:
        """One epoch of plain steps over the batches the trainer sees in `epoch` (timed to the last kernel);
        `read(loss, logits, labels)`, when given, runs before each `opt.step()` (scripts/gpu_step_profile.py)."""
        self.host.train()
        sync(self.device)
        faults = minor_faults()
        t0 = time.perf_counter()
        for xb, yb in iter_batches(self.data.x_train, self.data.y_train, self.settings.batch_size,
                                   generator=epoch_generator(self.settings.seed, epoch)):
            self.opt.zero_grad(set_to_none=True)
            logits = self.host(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()  # type: ignore[no-untyped-call]
            if read is not None:
                read(loss, logits, yb)
            self.opt.step()
            self.steps += 1
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.faults += minor_faults() - faults

    @property
    def step_ms(self) -> float:
        return self.seconds * 1000.0 / max(1, self.steps)

    @property
    def faults_per_step(self) -> float:
        return self.faults / max(1, self.steps)


def plain_loop(settings: TolariaSettings) -> tuple[float, int]:
    """The plain loop on its own, every epoch: (ms per step, steps)."""
    plain = PlainLoop(settings)
    for epoch in range(1, settings.epochs + 1):
        plain.epoch(epoch)
    return plain.step_ms, plain.steps


class TimedTrainer(Trainer):
    """Times training steps only (validation and checkpoints at epoch ends are excluded).

    With `interleave`, each epoch of the trainer is followed by the same epoch of a `PlainLoop`
    (timed apart, before validation): the two step times are then measured seconds apart, under the
    same machine conditions, which a plain run before and after cannot promise on a VM whose step
    time drifts by tens of percent between runs."""

    step_seconds = 0.0
    step_faults = 0
    interleave: PlainLoop | None = None

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        faults = minor_faults()
        t0 = time.perf_counter()
        super().train_step(xb, yb)
        self.step_seconds += time.perf_counter() - t0
        self.step_faults += minor_faults() - faults

    def end_epoch(self) -> None:
        t0 = time.perf_counter()
        sync(self.device)  # the epoch's last kernels (its steps wait for each other's loss, not for these)
        self.step_seconds += time.perf_counter() - t0
        if self.interleave is not None:
            self.interleave.epoch(self.epoch)
        super().end_epoch()


def fleet_env(var: Path, url: str, secret: str, widths: Sequence[int] = SCALE_WIDTHS) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "TAMIYO_", "TOLARIA_", "URZA_"))}
    return {**base, "ESPER_REDIS_URL": url, "ESPER_LEYLINE_SECRET": secret, "ESPER_LOG_LEVEL": "WARNING",
            "ESPER_METRICS_PORT": "-1", "URZA_DATABASE_URL": f"sqlite:///{var}/urza/catalog.db",
            "URZA_ARTIFACT_DIR": str(var / "urza/a"), "URZA_SEED_SLOT": f"v{DIGITS_FEATURES}",
            "TEZZERET_SLOTS": json.dumps([f"v{w}" for w in (DIGITS_FEATURES, WIDTH, GROWTH_HOST["hidden_width"],
                                                            *widths)]),
            "TAMIYO_VAR_DIR": str(var / "tamiyo"), "TAMIYO_POLICY_DIR": str(var / "tamiyo/p")}


NEVER_OPEN = 10**9  # decision-breaker threshold that keeps it closed: a decision is asked for every step


def pin_process(pid: int, cores: set[int]) -> None:
    """Pin every thread of `pid` (a process already running) to `cores`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)


def start_service(module: str, env: dict[str, str], cwd: Path, cores: set[int] | None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if cores is not None:
        pin_process(proc.pid, cores)  # before it starts threads (torch import)
    return proc


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)


def plan_pinning(enabled: bool) -> tuple[set[int], set[int]] | None:
    """(trainer cores, fleet cores): the first allowed core for the trainer, the rest for the fleet."""
    if not enabled or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {cores[0]}, set(cores[1:])


def run_fleet(var: Path, url: str, secret: str, *, mode: str, budget_ms: float,
              breaker_failures: int | None = None, host: dict[str, Any] | None = None,
              epochs: int = EPOCHS, transport: str = "process", sidecar_cores: set[int] | None = None,
              copier_cores: set[int] | None = None, name: str = "") -> dict[str, Any]:
    # The last run's trainer and plain loop hold their memory until the cycle collector frees it (modules
    # and hooks refer to each other): freed first, this run reuses it instead of faulting in new pages.
    gc.collect()
    extra: dict[str, Any] = {} if breaker_failures is None else {"decision_breaker_failures": breaker_failures}
    extra.update(host or {"hidden_width": WIDTH})
    extra.update(decision_transport=transport,
                 decision_sidecar_cores=sorted(sidecar_cores) if sidecar_cores and transport == "process" else None,
                 rollback_copier_cores=sorted(copier_cores) if copier_cores else None)
    s = TolariaSettings(redis_url=url, leyline_secret=secret, var_dir=var / f"tolaria-{mode}-{transport}{name}",
                        epochs=epochs,
                        decision_mode=mode, tamiyo_step_timeout_ms=budget_ms,
                        artifact_dir=var / "urza/a", metrics_port=-1, run_id=f"bench-{mode}", emergency_enabled=False,
                        **extra)
    bus = BusThread(s)
    bus.start()
    trainer = TimedTrainer(s, bus=bus)
    trainer.interleave = PlainLoop(s)
    try:
        trainer.run()
    finally:
        trainer.close()
        bus.stop()
    out = trainer.summary(clean_shutdown=True)
    out["step_ms"] = trainer.step_seconds * 1000.0 / max(1, trainer.stats.steps)
    out["plain_step_ms"] = trainer.interleave.step_ms
    out["ratio"] = out["step_ms"] / out["plain_step_ms"]
    out["faults_per_step"] = trainer.step_faults / max(1, trainer.stats.steps)
    out["plain_faults_per_step"] = trainer.interleave.faults_per_step
    out["packets_sent"] = trainer.decisions.sent if trainer.decisions is not None else 0
    out["snapshots"] = trainer.rollback.taken
    out["snapshots_deferred"] = trainer.rollback.deferred
    out["snapshots_rejected"] = trainer.rollback.ring.rejected
    return out


def synthetic_dataset(path: Path, samples: int, features: int, seed: int = 0) -> Path:
    """A seeded 10-class `.npz` (Gaussian clusters) for steps heavier than the digits' (`--scale-samples`)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, samples)
    centres = rng.normal(0.0, 1.0, (10, features)).astype(np.float32)
    x = centres[y] + rng.normal(0.0, 2.0, (samples, features)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def overhead_at_width(var: Path, url: str, secret: str, width: int, sidecar_cores: set[int] | None,
                      rounds: int = SCALE_ROUNDS, epochs: int = EPOCHS, copier_cores: set[int] | None = None,
                      host: dict[str, Any] | None = None, budget_ms: float = 5.0, tag: str = "",
                      warmup: int = 0) -> dict[str, Any]:
    """`overhead_ratio` on a `width`-wide host (2 hidden layers unless `host` says otherwise): the
    median of `rounds` control-plane runs (sidecar), each against its own interleaved plain loop.

    The seeds Tamiyo grows there are part of the control-plane run, as on the default host: the
    ratio is what a user pays with Esper on, seeds included (`w<width>_seed_parameters`). `budget_ms`
    is the decision budget; `tag` names a variant's keys (`overhead_ratio_w<width><tag>`). `warmup` runs
    come first and are reported apart (`..._warmup_ratio_runs`), outside the median: the first run of a
    host larger than any before it grows the process's heap, one page fault at a time, in both loops."""
    def run(name: str) -> dict[str, Any]:
        return run_fleet(var, url, secret, mode="pipelined", budget_ms=budget_ms, breaker_failures=NEVER_OPEN,
                         host={**(host or {}), "hidden_width": width}, sidecar_cores=sidecar_cores,
                         copier_cores=copier_cores, name=f"-w{width}{tag}-{name}", epochs=epochs)

    warm = [run(f"warmup{i}") for i in range(warmup)]
    runs = [run(str(i)) for i in range(rounds)]
    k = f"w{width}{tag}_"
    out: dict[str, Any] = {f"overhead_ratio_w{width}{tag}": statistics.median(r["ratio"] for r in runs),
                           f"{k}host_parameters": runs[-1]["host_parameters"]}
    for key in ("ratio", "step_ms", "plain_step_ms", "packets_sent", "decisions", "timeouts", "failures_by_reason",
                "decision_p50_ms", "commands_applied", "commands_by_type", "commands_stale", "seeds_fossilized",
                "seeds_culled", "seed_parameters", "snapshots", "snapshots_rejected", "rejected_by_reason",
                "step_failures", "faults_per_step", "plain_faults_per_step"):
        out[f"{k}{key}_runs"] = [r[key] for r in runs]
    out[f"{k}overhead_ms_per_step"] = statistics.median(r["step_ms"] - r["plain_step_ms"] for r in runs)
    if warm:
        out[f"{k}warmup_ratio_runs"] = [r["ratio"] for r in warm]
        out[f"{k}warmup_faults_per_step_runs"] = [r["faults_per_step"] for r in warm]
        out[f"{k}warmup_plain_faults_per_step_runs"] = [r["plain_faults_per_step"] for r in warm]
    return out


def rollback_latency(var: Path, n: int = 50) -> dict[str, float]:
    s = TolariaSettings(var_dir=var / "rb", epochs=1, hidden_width=WIDTH)
    trainer = Trainer(s, bus=None)
    trainer.run()  # one epoch: a checkpoint on disk and snapshots in the ring
    rb: RollbackManager = trainer.rollback
    fast, ckpt, late = [], [], 0

    def timed() -> float:
        nonlocal late
        try:
            return rb.rollback(trainer.host, trainer.optimizer).elapsed_ms
        except RollbackDeadlineExceeded as e:  # a late restore is a measurement too: counted, not a crash
            if not e.restored:
                raise
            late += 1
            return e.elapsed_ms

    for _ in range(n):
        rb.snapshot(trainer.host, trainer.optimizer, step=trainer.step, epoch=1, force=True)
        fast.append(timed())
    for _ in range(n):
        rb.ring.clear()
        ckpt.append(timed())
    return {"rollback_fast_p50_ms": percentile(fast, 50), "rollback_fast_p95_ms": percentile(fast, 95),
            "rollback_checkpoint_p50_ms": percentile(ckpt, 50), "rollback_checkpoint_p95_ms": percentile(ckpt, 95),
            "rollback_deadline_ms": s.rollback_deadline_ms, "rollback_deadline_misses": late}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tolaria.json"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin the trainer and the fleet to cores")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where every trainer and plain loop of the bench trains (TOLARIA_DEVICE)")
    parser.add_argument("--widths", type=int, nargs="*", default=list(SCALE_WIDTHS),
                        help="hidden widths of the wider hosts (overhead_ratio_w<width>)")
    parser.add_argument("--rounds", type=int, default=SCALE_ROUNDS, help="control-plane runs per wider host")
    parser.add_argument("--answered-rounds", type=int, default=SCALE_ROUNDS,
                        help="runs of the widest host with answered decisions (0: none)")
    parser.add_argument("--deep-rounds", type=int, default=SCALE_ROUNDS,
                        help="control-plane runs of the deep host (overhead_ratio_deep; 0: none)")
    parser.add_argument("--scale-epochs", type=int, default=EPOCHS, help="epochs of each wider-host run")
    parser.add_argument("--kernel-widths", type=int, nargs="*", default=None,
                        help="wider hosts whose slot width gets compiled kernels (default: all of --widths); "
                             "germinations on the others fail their kernel fetch, explicitly, as in production")
    parser.add_argument("--scale-layers", type=int, default=2, help="hidden layers of the wider hosts")
    parser.add_argument("--scale-batch", type=int, default=64, help="batch size of the wider-host runs")
    parser.add_argument("--scale-samples", type=int, default=0,
                        help="wider-host runs train on a synthetic dataset of this many samples (0: digits)")
    parser.add_argument("--scale-features", type=int, default=DIGITS_FEATURES,
                        help="features of the synthetic dataset (--scale-samples)")
    args = parser.parse_args(argv)
    os.environ["TOLARIA_DEVICE"] = args.device  # every TolariaSettings of this process reads it
    process_settings = TolariaSettings()
    device = process_settings.torch_device()
    # As `python -m esper.tolaria` does; the plain loops share the process, so they run on the same heap.
    heap = keep_freed_memory(process_settings.malloc_keep_mb)
    widths: list[int] = args.widths
    # The widest host, run again with answered decisions (None: no such run).
    answered_width = max(widths) if widths and args.answered_rounds > 0 else None
    kernel_widths: list[int] = widths if args.kernel_widths is None else args.kernel_widths
    torch.set_num_threads(1)
    pinning = plan_pinning(not args.no_pin)
    server = EmbeddedRedis()
    server.start()
    if pinning is not None:
        os.sched_setaffinity(0, pinning[0])  # before the bus threads start: they inherit it
        if server.pid is not None:
            pin_process(server.pid, pinning[1])
    secret = secrets.token_hex(16)
    result: dict[str, Any] = {
        "epochs": EPOCHS, "hidden_width": WIDTH, "accuracy_epochs": GROWTH_EPOCHS, "accuracy_host": GROWTH_HOST,
        **git_state(), "redis_version": redis_version(server.url), "torch": str(torch.__version__),
        "python": sys.version.split()[0], "when": dt.datetime.now(dt.UTC).isoformat(), "cpu_count": os.cpu_count(),
        "device": device.type, "widths": widths, "kernel_widths": kernel_widths, "scale_epochs": args.scale_epochs,
        "scale_layers": args.scale_layers, "scale_batch": args.scale_batch, "scale_samples": args.scale_samples,
        "scale_features": args.scale_features if args.scale_samples else DIGITS_FEATURES,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "heap_kept_mb": heap.keep_mb if heap.applied else 0, "heap_reason": heap.reason,
        "pinned": pinning is not None,
        # snapshot copies (TOLARIA_ROLLBACK_COPIER_CORES) run beside the step on the fleet's cores, as the sidecar
        "copier_cores": sorted(pinning[1]) if pinning else None,
        "trainer_cores": sorted(pinning[0]) if pinning else None,
        "fleet_cores": sorted(pinning[1]) if pinning else None,
    }

    def save(complete: bool) -> None:
        """Written after every section, so a run cut short by a time limit (a GPU session) keeps what it
        measured; `complete` is false until the last section is in."""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "complete": complete}, indent=2, sort_keys=True) + "\n")

    with tempfile.TemporaryDirectory(prefix="esper-bench-tolaria-") as tmp:
        var = Path(tmp)
        env = fleet_env(var, server.url, secret, kernel_widths)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            subprocess.run([sys.executable, "-m", "esper.tezzeret", "compile"], env=env, cwd=var, check=True,
                           stdout=subprocess.DEVNULL)
            fleet_cores = pinning[1] if pinning is not None else None
            procs += [start_service("esper.urza", env, var, fleet_cores),
                      start_service("esper.tamiyo", env, var, fleet_cores)]
            time.sleep(5)  # worker start-up (torch import) and the first catalogue fetch
            static_settings = TolariaSettings(var_dir=var / "static", epochs=EPOCHS, hidden_width=WIDTH)
            plain_ms, steps = plain_loop(static_settings)
            bare = TimedTrainer(static_settings, bus=None)  # the trainer's own work, no control plane
            bare.interleave = PlainLoop(static_settings)
            bare.run()
            static = Trainer(TolariaSettings(var_dir=var / "static-growth-host", epochs=GROWTH_EPOCHS, **GROWTH_HOST),
                             bus=None)
            static.run()
            grown = run_fleet(var, server.url, secret, mode="sync", budget_ms=30.0, host=GROWTH_HOST,
                              epochs=GROWTH_EPOCHS)
            pipelined = run_fleet(var, server.url, secret, mode="pipelined", budget_ms=5.0,
                                  breaker_failures=NEVER_OPEN, sidecar_cores=fleet_cores, copier_cores=fleet_cores)
            threaded = run_fleet(var, server.url, secret, mode="pipelined", budget_ms=5.0,
                                 breaker_failures=NEVER_OPEN, transport="thread", copier_cores=fleet_cores)
            plain_ms_again, _ = plain_loop(static_settings)  # bracket the control-plane run
            result.update({
                "plain_step_ms": pipelined["plain_step_ms"], "plain_step_ms_separate_runs": [plain_ms, plain_ms_again],
                "steps": steps, "control_step_ms": pipelined["step_ms"], "overhead_ratio": pipelined["ratio"],
                "goal_overhead_ratio": GOAL_RATIO, "goal_overhead_met": pipelined["ratio"] <= GOAL_RATIO,
                "pipelined_decisions": pipelined["decisions"], "pipelined_timeouts": pipelined["timeouts"],
                "pipelined_commands_applied": pipelined["commands_applied"],
                "pipelined_skipped_inflight": pipelined["decisions_skipped_inflight"],
                "pipelined_decision_p50_ms": pipelined["decision_p50_ms"],
                "pipelined_packets_sent": pipelined["packets_sent"],
                "pipelined_conservative_steps": pipelined["conservative_steps"],
                "pipelined_snapshots": pipelined["snapshots"],
                "control_faults_per_step": pipelined["faults_per_step"],
                "plain_faults_per_step": pipelined["plain_faults_per_step"],
                "pipelined_snapshots_deferred": pipelined["snapshots_deferred"],
                "static_trainer_step_ms": bare.step_seconds * 1000.0 / max(1, bare.stats.steps),
                "static_trainer_ratio": bare.step_seconds * 1000.0 / max(1, bare.stats.steps) / bare.interleave.step_ms,
                "control_step_ms_thread": threaded["step_ms"], "overhead_ratio_thread": threaded["ratio"],
                "thread_packets_sent": threaded["packets_sent"], "thread_decisions": threaded["decisions"],
                "thread_timeouts": threaded["timeouts"], "thread_commands_applied": threaded["commands_applied"],
                "thread_skipped_inflight": threaded["decisions_skipped_inflight"],
                "thread_decision_p50_ms": threaded["decision_p50_ms"],
                "accuracy_static": static.summary(clean_shutdown=True)["final_val_accuracy"],
                "accuracy_grown": grown["final_val_accuracy"], "accuracy_pipelined": pipelined["final_val_accuracy"],
                "grown_seeds_fossilized": grown["seeds_fossilized"], "grown_seeds_culled": grown["seeds_culled"],
                "grown_seed_parameters": grown["seed_parameters"], "host_parameters": grown["host_parameters"],
                "grown_seeds_by_stage": grown["seeds_by_stage"],
                "grown_rejected_by_reason": grown["rejected_by_reason"],
                "grown_commands_by_type": grown["commands_by_type"], "grown_decision_p50_ms": grown["decision_p50_ms"],
                "grown_step_ms": grown["step_ms"],
            })
            save(complete=False)
            # Wider hosts: one checkpoint per run (checkpoints are not timed; a 16-layer 4096-wide host
            # with Adam writes 3 GiB each).
            scale_host: dict[str, Any] = {"hidden_layers": args.scale_layers, "batch_size": args.scale_batch,
                                          "checkpoint_every_epochs": args.scale_epochs}
            if args.scale_samples:
                scale_host["dataset_path"] = synthetic_dataset(var / "scale.npz", args.scale_samples,
                                                               args.scale_features)
            for width in widths:
                result.update(overhead_at_width(var, server.url, secret, width, fleet_cores, rounds=args.rounds,
                                                epochs=args.scale_epochs, host=scale_host, copier_cores=fleet_cores))
                result[f"goal_overhead_met_w{width}"] = result[f"overhead_ratio_w{width}"] <= GOAL_RATIO
                save(complete=False)
            if answered_width is not None or args.deep_rounds > 0:
                stop_service(procs.pop())  # Tamiyo (started last); the next one grows nothing: the same model
                procs.append(start_service("esper.tamiyo", {**env, **NO_GROWTH}, var, fleet_cores))
                time.sleep(5)
            if answered_width is not None:  # the widest host again, with a budget Tamiyo meets
                result.update(overhead_at_width(var, server.url, secret, answered_width, fleet_cores,
                                                rounds=args.answered_rounds, epochs=args.scale_epochs, host=scale_host,
                                                budget_ms=ANSWERED_BUDGET_MS, tag=ANSWERED, copier_cores=fleet_cores))
                save(complete=False)
            if args.deep_rounds > 0:  # a step of the size the budget is about, every reply a command
                deep_host = {**DEEP_HOST, "checkpoint_every_epochs": DEEP_EPOCHS,
                             "dataset_path": synthetic_dataset(var / "deep.npz", DEEP_SAMPLES, DEEP_FEATURES)}
                for tag, host, warmup in ((DEEP, deep_host, 1),  # then the same with the copies in line
                                          (DEEP_INLINE, {**deep_host, "rollback_snapshot_async": False}, 0)):
                    deep = overhead_at_width(var, server.url, secret, DEEP_HOST["hidden_width"], fleet_cores,
                                             rounds=args.deep_rounds, epochs=DEEP_EPOCHS, host=host,
                                             budget_ms=ANSWERED_BUDGET_MS, tag=tag, warmup=warmup,
                                             copier_cores=fleet_cores)
                    result.update({k.replace(f"w{DEEP_HOST['hidden_width']}_", ""): v for k, v in deep.items()})
                result.update({"deep_host": {k: v for k, v in deep_host.items() if k != "dataset_path"},
                               "deep_samples": DEEP_SAMPLES, "deep_features": DEEP_FEATURES,
                               "deep_epochs": DEEP_EPOCHS, "deep_budget_ms": ANSWERED_BUDGET_MS,
                               "goal_overhead_met_deep": result["overhead_ratio_deep"] <= GOAL_RATIO})
                save(complete=False)
        finally:
            for p in procs:
                stop_service(p)
        result.update(rollback_latency(var))
    server.stop()
    save(complete=True)
    answered = [] if answered_width is None else [f"overhead_ratio_w{answered_width}{ANSWERED}",
                                                  f"w{answered_width}{ANSWERED}_commands_applied_runs"]
    deep_keys = [] if args.deep_rounds <= 0 else ["overhead_ratio_deep", "deep_ratio_runs", "deep_overhead_ms_per_step",
                                             "deep_plain_step_ms_runs", "deep_commands_applied_runs",
                                             "deep_snapshots_runs", "overhead_ratio_deep_inline",
                                             "deep_inline_ratio_runs", "deep_inline_snapshots_runs"]
    for k in ("overhead_ratio", "overhead_ratio_thread", *(f"overhead_ratio_w{w}" for w in widths), *answered,
              *deep_keys, *(f"w{w}_overhead_ms_per_step" for w in widths),
              *(f"w{w}_plain_step_ms_runs" for w in widths), "plain_step_ms", "control_step_ms",
              "control_step_ms_thread", "static_trainer_step_ms", "static_trainer_ratio", "rollback_fast_p95_ms",
              "rollback_checkpoint_p95_ms", "accuracy_static", "accuracy_grown", "grown_seeds_fossilized"):
        print(f"{k:28s} {result[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
