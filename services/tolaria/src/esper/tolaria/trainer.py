"""The training loop: a small host on real data, grown by Tamiyo's commands through Kasmina.

Per step (ARCHITECTURE §5): take the decision that arrived since the last boundary (pipelined) and
apply it through Kasmina; train (task loss + the isolated seeds' local loss); refuse a non-finite or
spiking step (emergency escalation + two-tier rollback, never an optimizer step on bad gradients);
advance Kasmina (gates, alpha schedules, stage changes); snapshot; send this step's packet. Kernel
fetches and decision waits run on the bus thread, so the step never waits on anyone longer than the
budget (`sync` mode waits at most the budget). Per epoch: validation, evidence for probationary
seeds (loss with and without each), a checkpoint, telemetry.

Conservative mode (`conservative.py`): after `TOLARIA_DECISION_BREAKER_FAILURES` consecutive decision
timeouts/errors the decision breaker opens and steps stop asking Tamiyo (no packet, no wait, no
command) until a probe after `TOLARIA_DECISION_BREAKER_RESET_S` is answered.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry

from esper.core.breaker import CLOSED, CircuitBreaker
from esper.core.logging import get_logger
from esper.core.telemetry import PRIORITY_INDICATOR, build_event, build_metric, build_telemetry_packet
from esper.kasmina import CommandRejected, Kasmina, KernelClient, SeedSlot, seed_id_for
from esper.kasmina.optim import FOSSIL_GROUP_KEY, SEED_GROUP_KEY
from esper.kasmina.settings import KasminaSettings
from esper.leyline import enum_name, pb
from esper.tolaria.bus import BusThread
from esper.tolaria.checkpoint import CheckpointError, CheckpointStore
from esper.tolaria.commands import (
    LR_KEYS,
    SET_KEYS,
    OptimizerCommandRefused,
    adjust_lr,
    as_scale_request,
    check_hyperparameters,
    current_lr,
    scheduled_lr,
    set_hyperparameter,
    set_lr,
)
from esper.tolaria.conservative import ConservativeMode, ModeChange
from esper.tolaria.data import Dataset, epoch_generator, iter_batches, load_dataset
from esper.tolaria.decisions import Decision, DecisionClient, OneInFlight, timeout_telemetry
from esper.tolaria.emergency import EmergencyController, EmergencyPublisher, epoch_failure_level
from esper.tolaria.host import HostNetwork, build_host
from esper.tolaria.instruments import TolariaMetrics
from esper.tolaria.metrics import TrainingSignals, batch_accuracy, step_readings, training_metrics
from esper.tolaria.packet import build_packet
from esper.tolaria.resources import ResourceSampler
from esper.tolaria.rollback import RollbackDeadlineExceeded, RollbackError, RollbackManager
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.sidecar import SidecarDecisionClient
from esper.tolaria.state import StateMismatchError, TrainingState, check_fit
from esper.urza.store import ArtifactStore

log = get_logger("esper.tolaria.trainer")

_INFO, _WARNING, _ERROR = pb.TELEMETRY_LEVEL_INFO, pb.TELEMETRY_LEVEL_WARNING, pb.TELEMETRY_LEVEL_ERROR


def make_optimizer(settings: TolariaSettings, params: Any) -> torch.optim.Optimizer:
    s = settings
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.learning_rate, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=s.learning_rate, weight_decay=s.weight_decay)


@dataclass(slots=True)
class RunStats:
    """What the summary reports; counters the loop updates as it goes."""

    steps: int = 0
    epochs: int = 0
    decisions: Counter[str] = field(default_factory=Counter)  # command / failure / timeout / error
    decision_ms: list[float] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)  # applied command types
    stale: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failure_reasons: Counter[str] = field(default_factory=Counter)
    budget_misses: Counter[str] = field(default_factory=Counter)  # epoch / hook
    step_failures: Counter[str] = field(default_factory=Counter)
    rollbacks: Counter[str] = field(default_factory=Counter)
    checkpoints_refused: Counter[str] = field(default_factory=Counter)  # passed over by a rollback, by reason
    seeds_fossilized: int = 0
    seeds_culled: int = 0
    lr_changes: int = 0
    commands_dropped_conservative: int = 0  # replies that landed while the breaker was OPEN: not applied
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


class Trainer:
    """One run. `bus=None` trains the host statically (no control plane): the benchmark's baseline."""

    def __init__(self, settings: TolariaSettings, *, bus: BusThread | None,
                 registry: CollectorRegistry | None = None, dataset: Dataset | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` drives the decision breaker's reset timer (tests inject one)."""
        s = self.settings = settings
        self.device = s.torch_device()
        self.bus = bus
        self.metrics = TolariaMetrics(registry)
        torch.manual_seed(s.seed)
        self.data = (dataset or load_dataset(s.dataset_path, seed=s.seed, val_fraction=s.val_fraction)).to(self.device)
        self.host: HostNetwork = build_host(self.data.meta, hidden=s.host_hidden(),
                                                input_slot=s.input_slot, seed=s.seed).to(self.device)
        if bus is not None:
            for name, shape in self.host.slot_shapes().items():
                self.host.set_slot(name, SeedSlot(name, shape).to(self.device))
        self.optimizer = make_optimizer(s, self.host.parameters())
        self.base_lr = s.learning_rate
        self.lr_scale = 1.0  # OPTIMIZER commands scale the scheduled rate (TOLARIA_LR_POLICY != off)
        steps_per_epoch = math.ceil(self.data.meta.train_size / s.batch_size)
        self.total_steps = s.epochs * steps_per_epoch
        # KASMINA_*: command validation, lifecycle windows, kernel cache and breaker
        ks = fit_evidence_grace(KasminaSettings(), steps_per_epoch)
        kernels = None if bus is None else KernelClient(
            bus.client, ArtifactStore(s.artifact_dir), timeout_ms=s.kernel_timeout_ms, cache_size=ks.kernel_cache_size,
            training_run_id=s.run_id,
            breaker=CircuitBreaker("kernel_fetch", failure_threshold=ks.breaker_failures,
                                   success_threshold=ks.breaker_successes, reset_timeout_s=ks.breaker_reset_s,
                                   on_transition=lambda *change: self.kasmina.breaker_transition(*change)))
        self.kasmina = Kasmina(keys=s.signing_keys() if bus is not None else None, settings=ks, kernels=kernels,
                               optimizer=self.optimizer)
        self.kasmina.register_host(self.host)
        self.decisions: OneInFlight | None = None
        if bus is not None and s.decision_transport == "process":
            cores = set(s.decision_sidecar_cores) if s.decision_sidecar_cores else None
            self.decisions = SidecarDecisionClient(s, budget_ms=s.tamiyo_step_timeout_ms, cores=cores,
                                                   metrics=bus.client.metrics)
            self.decisions.start()
        elif bus is not None:
            self.decisions = DecisionClient(bus, budget_ms=s.tamiyo_step_timeout_ms)
        self.conservative = ConservativeMode(failure_threshold=s.decision_breaker_failures,
                                             reset_timeout_s=s.decision_breaker_reset_s, clock=clock)
        # Signed with the Leyline keys when the run has them (always, with a bus); a static run without a
        # secret has hashed checkpoints only, and says so.
        ckpt_keys = s.signing_keys() if s.leyline_secret is not None else None
        if ckpt_keys is None:
            log.warning("checkpoints are hashed, not signed: ESPER_LEYLINE_SECRET is not set",
                        directory=str(s.checkpoint_dir))
        self.checkpoints = CheckpointStore(s.checkpoint_dir, keep=s.checkpoint_keep, run_id=s.run_id, keys=ckpt_keys)
        self.rollback = RollbackManager.from_settings(s, checkpoints=self.checkpoints, metrics=self.metrics)
        self._refused_checkpoints: set[tuple[str, str]] = set()  # (file, reason) already reported
        publisher = None
        if bus is not None and s.emergency_enabled:
            publisher = EmergencyPublisher.from_settings(s, metrics=self.metrics)
            publisher.start()
        self.emergency = EmergencyController(run_id=s.run_id, publisher=publisher, metrics=self.metrics)
        self.signals = TrainingSignals()
        self.resources = ResourceSampler(self.device)
        self.stats = RunStats()
        self.step = 0
        self.epoch = 0
        self.failed_epochs = 0
        self._epoch_failed = False
        self._structure: tuple[str, ...] = ()
        self._quick_structure: tuple[object, ...] = ()
        self._applied_step = 0  # the step whose update the weights hold
        self._restored_step: int | None = None  # a rollback's restored step, until a step is applied on it
        self._checkpointed_step = -1  # the step of the last checkpoint this run wrote
        self._train_loss_sum, self._train_loss_steps = 0.0, 0  # applied steps of the current epoch
        self._stop = False
        self._pending_events: list[pb.TelemetryEvent] = []
        self._apply_ms = 0.0
        self._tamiyo_latency: dict[str, float] = {}  # the last decision's latency, once there is one
        self._spike_reference = 0.0  # the loss EWMA before the last rollback's reset (0: none yet)
        self._escalations_seen = 0
        self._snapshot_due: tuple[int, int] | None = None  # (step, epoch) of a snapshot to copy next step

    # -- the run -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the current step, then stop (SIGTERM)."""
        self._stop = True

    def run(self) -> RunStats:
        s = self.settings
        with self._profiler() as prof:
            for epoch in range(1, s.epochs + 1):
                self.epoch = epoch
                self._epoch_failed = False
                self._train_loss_sum, self._train_loss_steps = 0.0, 0
                gen = epoch_generator(s.seed, epoch)
                t0 = time.perf_counter()
                for xb, yb in iter_batches(self.data.x_train, self.data.y_train, s.batch_size, generator=gen):
                    self.train_step(xb, yb)
                    if prof is not None:
                        prof.step()
                    if self._stop or self.emergency.halted:
                        break
                self._check_epoch_budget((time.perf_counter() - t0) * 1000.0)
                self.end_epoch()
                if self._stop or self.emergency.halted:
                    break
        if (self._stop or self.emergency.halted) and self._checkpointed_step != self.step:
            self._save_checkpoint()  # the signal came after this epoch's end had decided not to save
        self._settle_last_decision()
        return self.stats

    @contextlib.contextmanager
    def _profiler(self) -> Iterator[torch.profiler.profile | None]:
        """`TOLARIA_PROFILER_DIR` set (validated by the settings): a torch.profiler trace of a few
        steps after a short warm-up, written there for TensorBoard / Perfetto; otherwise nothing."""
        out = self.settings.profiler_dir
        if out is None:
            yield None
            return
        out.mkdir(parents=True, exist_ok=True)
        # a run shorter than the schedule's 7 steps is recorded whole: a 1-step run recorded nothing at all
        schedule = torch.profiler.schedule(wait=1, warmup=1, active=5, repeat=1) if self.total_steps >= 7 else None
        with torch.profiler.profile(schedule=schedule,
                                    on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out))) as prof:
            yield prof

    def _check_epoch_budget(self, epoch_ms: float) -> None:
        """Training time of one epoch against `TOLARIA_EPOCH_BUDGET_MS`: reported (event, counter),
        not an epoch failure (a deviation from the prototype: on a CPU the budget measures the machine)."""
        if epoch_ms > self.settings.epoch_budget_ms:
            self.stats.budget_misses["epoch"] += 1
            self._event("epoch_budget_exceeded", _WARNING, f"epoch {self.epoch} trained in {epoch_ms:.1f} ms",
                        budget_ms=self.settings.epoch_budget_ms, epoch=self.epoch)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self._step_start()
        self.step += 1
        self._apply_lr_policy()
        if not self.host.training:  # after validation; `_snapshot` re-applies it when a seed joins
            self.host.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.host(xb)
        loss = F.cross_entropy(logits, yb)
        if s.fault_nan_at_step and self.step == s.fault_nan_at_step:
            loss = loss * float("nan")
        aux = self.kasmina.auxiliary_loss()
        total = loss if aux is None else loss + aux
        total.backward()  # type: ignore[no-untyped-call]
        # One read of the device per step (`step_readings`), before the optimizer step; the batch accuracy
        # rides along when this step will likely send a packet (no request in flight), else it is read
        # later if needed. The optimizer's parameters are the model's (Kasmina adds and drops a seed's
        # groups as it joins and leaves), and reading its lists skips a walk over every module each step.
        packet_likely = self.decisions is not None and not self.decisions.busy
        loss_v, grad, accuracy = step_readings(loss, (p for group in self.optimizer.param_groups
                                                      for p in group["params"]),
                                               logits if packet_likely else None, yb)
        reason = self._step_problem(loss_v, grad)
        if reason is not None:
            self._step_failure(reason, loss_v)
            return
        self._report_shadow(xb, yb)  # G4's host-alone loss: this batch, these weights (before the update)
        self.rollback.settle()  # the snapshot copied beside this step is complete before the update writes
        self.optimizer.step()
        self._applied_step = self.step
        self._restored_step = None  # the restored state passed a step: it was good
        if s.fault_corrupt_weights_at_step == self.step:  # drills: an update that broke the model
            with torch.no_grad():
                next(iter(self.host.host_parameters())).fill_(float("nan"))
        self._train_loss_sum += loss_v
        self._train_loss_steps += 1
        if s.fault_step_delay_ms:  # drills: a step as long as a real model's (sleeps, so the bus thread runs)
            time.sleep(s.fault_step_delay_ms / 1000.0)
        hook_t = time.perf_counter()
        self.rollback.record_training(hook_t - t0)  # what the snapshots' overhead budget is a fraction of
        self.kasmina.advance(self.step, epoch=self.epoch, loss=loss_v)
        self._start_kernel_fetches()
        finalize_ms = (time.perf_counter() - hook_t) * 1000.0
        self._snapshot()
        hook_ms = (time.perf_counter() - hook_t) * 1000.0
        if hook_ms > s.hook_budget_ms:  # HIGH in the prototype's list: the boundary work stalls training
            self.stats.budget_misses["hook"] += 1
            self._event("hook_budget", _WARNING, f"step {self.step} boundary took {hook_ms:.1f} ms",
                        budget_ms=s.hook_budget_ms, step_index=self.step)
        step_ms = (time.perf_counter() - t0) * 1000.0
        signals = self.signals.update(loss_v, grad)
        self.stats.steps += 1
        if self.decisions is not None:
            # The previous request's outcome is known before anything else is sent: a finished one is
            # taken here (`busy` only ever turns False, so nothing can finish unseen in between, and a
            # request not busy when the step was read is not busy now: no second look at the pipe).
            pending = not packet_likely and self.decisions.busy
            if not pending:
                self._poll_decision()
            if not self.conservative.should_ask():  # conservative mode: no packet, no wait, no command
                self.metrics.decisions_skipped_conservative.inc()
                self._report_mode_changes()
                return
            if pending:  # at most one request in flight: this boundary sends nothing (counted)
                self.decisions.skip_pending()
                self._report_mode_changes()
                return
            metrics = training_metrics(
                loss=loss_v, accuracy=batch_accuracy(logits.detach(), yb) if accuracy is None else accuracy,
                gradient_norm=grad,
                samples_per_s=len(yb) / max(step_ms / 1000.0, 1e-9), hook_latency_ms=hook_ms, signals=signals,
                step_latency_ms=step_ms, optimizer_family_index=s.optimizer_family_index,
                extra={"learning_rate": current_lr(self.optimizer), "kasmina.apply_ms": self._apply_ms,
                       "kasmina.finalize_ms": finalize_ms, **self._tamiyo_latency, **self.resources.read()})
            packet = build_packet(run_id=s.run_id, step=self.step, epoch=self.epoch, epochs_total=s.epochs,
                                  steps_total=self.total_steps,
                                  training_loss=loss_v, validation_loss=_last(self.stats.val_loss),
                                  validation_accuracy=_last(self.stats.val_accuracy), training_metrics=metrics,
                                  seed_states=self.kasmina.seed_states())
            self.decisions.submit(packet, self.step)
            if s.decision_mode == "sync":
                decision = self.decisions.wait()
                apply_t = time.perf_counter()
                self._take_decision(decision)
                self._apply_ms = (time.perf_counter() - apply_t) * 1000.0
        self._report_mode_changes()

    def _step_start(self) -> None:
        """The boundary before a step: the reply that arrived is applied (pipelined), then the copy of a
        snapshot the last step found due begins, beside this step's forward and backward."""
        if self.settings.decision_mode == "pipelined":  # at the boundary the last step's end-of-step look
            self._apply_ms = 0.0  # shares: the same step number, so a reply's age does not depend on which
            self._poll_decision()  # look took it (it counted one step more here, and staleness 0 lost all)
        if self._snapshot_due is not None:  # after the boundary's commands: a seed that joined is in it
            self._begin_snapshot()

    # -- decisions ---------------------------------------------------------------------------------

    def _poll_decision(self) -> None:
        """Take the decision that finished since the last look (non-blocking), if any."""
        d = self.decisions.poll() if self.decisions is not None else None
        if d is None:
            return
        apply_t = time.perf_counter()
        self._take_decision(d)
        self._apply_ms += (time.perf_counter() - apply_t) * 1000.0

    def _count_decision(self, d: Decision) -> None:
        """Every outcome, applied or not: counters, the HIGH timeout event, the decision breaker."""
        self.stats.decisions[d.kind] += 1
        self.stats.decision_ms.append(d.latency_ms)
        self._tamiyo_latency = {"tamiyo_latency_ms": d.latency_ms}  # the next packets' REFERENCE §6.5 figure
        if d.kind in ("failure", "error"):
            self.stats.failure_reasons[d.detail.removeprefix("DECISION_FAILURE_REASON_").lower()[:60]] += 1
        if d.kind == "timeout" and not d.timeout_event and self.bus is not None:  # not handled by the sidecar
            self.bus.publish_telemetry(timeout_telemetry(d))
        self.conservative.record(d.kind)  # timeouts and errors count against the decision breaker
        self._report_mode_changes()

    def _take_decision(self, d: Decision | None) -> None:
        if d is None:
            return
        self._count_decision(d)
        if d.kind != "command" or d.command is None:
            return
        if self.conservative.active:  # a reply to a request sent before the breaker opened: not applied
            self.stats.commands_dropped_conservative += 1
            return
        if self.step - d.step > self.settings.max_staleness_steps:
            self.stats.stale += 1
            self._event("command_stale", _WARNING, f"reply for step {d.step} arrived at step {self.step}",
                        command_id=d.command.command_id)
            return
        try:
            outcome = self.kasmina.apply_command(d.command)
        except CommandRejected as e:
            self.stats.rejected[e.reason] += 1
            return
        self._snapshot_if_restructured()
        if outcome.for_trainer is not None and not self._trainer_command(outcome.for_trainer):
            return
        self.stats.commands[enum_name(pb.CommandType, d.command.command_type)] += 1

    def _report_mode_changes(self) -> None:
        """Telemetry and metrics for the conservative-mode transitions since the last call."""
        for change in self.conservative.drain_changes():
            self._mode_change(change)

    def _mode_change(self, change: ModeChange) -> None:
        mode, s = self.conservative, self.settings
        self.metrics.decision_breaker_state.set(change.state)
        self.metrics.conservative_mode.set(1 if change.kind != "cleared" else 0)
        if change.kind == "entered":
            self.metrics.conservative_entries.inc()
            log.warning("conservative mode entered: not asking Tamiyo", step=self.step,
                        failures=s.decision_breaker_failures, reset_s=s.decision_breaker_reset_s)
            self._event("conservative_mode_entered", _WARNING,
                        f"{s.decision_breaker_failures} consecutive decisions failed at step {self.step}: "
                        f"training on without Tamiyo, probing again in {s.decision_breaker_reset_s:g} s",
                        priority=pb.MESSAGE_PRIORITY_HIGH, step_index=self.step, failures=s.decision_breaker_failures,
                        reset_s=s.decision_breaker_reset_s, entries=mode.entries)
        elif change.kind == "cleared":
            log.info("conservative mode cleared: Tamiyo answered the probe", step=self.step,
                     conservative_steps=mode.steps, probes=mode.probes)
            self._event("conservative_mode_cleared", _INFO, f"Tamiyo answered the probe at step {self.step}",
                        step_index=self.step, conservative_steps=mode.steps, skipped=mode.skipped,
                        probes=mode.probes)

    def _trainer_command(self, cmd: pb.AdaptationCommand) -> bool:
        """Apply a command Kasmina handed back; False (counted, evented) for one the trainer does not carry
        out, so it is not counted as applied."""
        if cmd.command_type == pb.COMMAND_OPTIMIZER:
            return self._optimizer_command(cmd)
        if cmd.command_type == pb.COMMAND_ROLLBACK:
            self._do_rollback("command")
        elif cmd.command_type == pb.COMMAND_EMERGENCY:
            self.emergency.escalate(pb.EMERGENCY_LEVEL_CONSERVATIVE, "tamiyo_emergency_command")
        else:  # CIRCUIT_BREAKER: Tamiyo asks for a breaker state the trainer has no knob for (yet)
            kind = enum_name(pb.CommandType, cmd.command_type)
            self.stats.rejected["unsupported_by_trainer"] += 1
            self._event("command_unsupported", _WARNING, f"{kind} is not carried out by the trainer",
                        command_id=cmd.command_id, command_type=kind)
            return False
        return True

    def _optimizer_command(self, cmd: pb.AdaptationCommand) -> bool:
        """Check every hyperparameter first (a refusal changes nothing), then apply each, bounded, with
        a log line and an `optimizer_adjusted` event carrying the old and new values."""
        hyper = dict(cmd.optimizer_adjustment.hyperparameters)
        try:
            check_hyperparameters(hyper)
        except OptimizerCommandRefused as e:
            self.stats.rejected[e.reason] += 1
            log.warning("optimizer command refused", reason=e.reason, detail=str(e), command_id=cmd.command_id)
            self._event("command_rejected", _WARNING, str(e), reason=e.reason, command_id=cmd.command_id,
                        command_type="COMMAND_OPTIMIZER")
            return False
        if any(k in hyper for k in LR_KEYS):
            old = current_lr(self.optimizer)
            if self.settings.lr_policy == "off":
                change = adjust_lr(old, self.base_lr, hyper)
                set_lr(self.optimizer, change.new)
            else:  # the scale on the schedule persists: it is what the bounds hold (commands.py). An explicit
                # rate is read against the schedule past its warm-up, or a warm-up's tiny rate inflates it.
                change = adjust_lr(self.lr_scale, 1.0,
                                   as_scale_request(hyper, self._scheduled_lr(warmup=False) * self.lr_scale))
                self.lr_scale = change.new
                self._apply_lr_policy()
            self.stats.lr_changes += change.new != change.old
            self._optimizer_adjusted(cmd, "learning_rate", old, current_lr(self.optimizer), change.requested,
                                     change.clamped)
        for name in SET_KEYS:
            if name in hyper:
                ch = set_hyperparameter(self.optimizer, name, hyper[name])
                self._optimizer_adjusted(cmd, name, ch.old, ch.new, hyper[name], ch.clamped)
        return True

    def _optimizer_adjusted(self, cmd: pb.AdaptationCommand, name: str, old: float, new: float, requested: float,
                            clamped: bool) -> None:
        log.info("optimizer adjusted", hyperparameter=name, old=old, new=new, requested=requested, clamped=clamped,
                 lr_scale=self.lr_scale, command_id=cmd.command_id)
        self._event("optimizer_adjusted", _INFO, f"{name} {old:.3g} -> {new:.3g}", hyperparameter=name,
                    old=f"{old:.6g}", new=f"{new:.6g}", clamped=clamped, command_id=cmd.command_id)

    def _apply_lr_policy(self) -> None:
        if self.settings.lr_policy == "off":  # the default: nothing to schedule (the call below reads settings)
            return
        set_lr(self.optimizer, self._scheduled_lr() * self.lr_scale)

    def _scheduled_lr(self, *, warmup: bool = True) -> float:
        s = self.settings
        lr = scheduled_lr(s.lr_policy, self.base_lr, step=self.step, epoch=self.epoch, total_steps=self.total_steps,
                          warmup_steps=s.lr_warmup_steps if warmup else 0, step_epochs=s.lr_step_epochs,
                          gamma=s.lr_step_gamma)
        return self.base_lr if lr is None else lr

    def _start_kernel_fetches(self) -> None:
        """Fetch pending kernels on the bus thread; they attach at the first boundary after they arrive.

        By default the step never waits (the attach step then depends on Urza's timing, and a run that
        grows a seed does not repeat bit for bit); `TOLARIA_KERNEL_WAIT_MS` waits up to that long, as the
        sync decision mode does for Tamiyo, so the attach step is fixed. A wait that runs out is counted
        (`budget_misses["kernel_wait"]`) and reported; the fetch goes on and attaches later."""
        if self.bus is None or not self.kasmina.pending_kernels():
            return
        fetch = self.bus.submit(self.kasmina.fetch_kernels())
        wait_s = self.settings.kernel_wait_ms / 1000.0
        if wait_s <= 0:
            return
        try:
            fetch.result(wait_s)
        except concurrent.futures.TimeoutError:
            self.stats.budget_misses["kernel_wait"] += 1
            self._event("kernel_wait_timeout", _WARNING,
                        f"kernel not fetched within {self.settings.kernel_wait_ms:g} ms", step=self.step)

    def _settle_last_decision(self) -> None:
        """The reply to the last packet is counted like any other, timeout event included (not applied:
        training is over)."""
        if self.decisions is not None:
            d = self.decisions.wait()
            if d is not None:
                self._count_decision(d)

    # -- failures and rollback ---------------------------------------------------------------------

    def _step_problem(self, loss: float, grad: float) -> str | None:
        if not math.isfinite(loss) or not math.isfinite(grad):
            return "non_finite"
        # right after a rollback the statistics restart empty: the loss level before it is the reference,
        # or the first step (the spike again, often) was not checked and became the new level
        ewma = self.signals.loss.mean if self.signals.loss.count else self._spike_reference
        s = self.settings
        if (self.stats.steps >= s.loss_spike_warmup_steps and ewma > 0 and loss > s.loss_spike_factor * ewma
                and loss - ewma > s.loss_spike_min_delta):
            return "loss_spike"
        return None

    def _step_failure(self, reason: str, loss: float) -> None:
        """A bad step is never applied: escalate, roll back to the last good state, keep training."""
        self.rollback.settle()  # no copy outlives its step: the boundary's commands may change what it reads
        self.rollback.record_training(0.0)  # a refused step trained nothing (nor is its wait the next step's)
        self.optimizer.zero_grad(set_to_none=True)
        self.kasmina.discard_step()  # nor is what the seeds saw in it evidence for their gates
        if self._snapshot_if_restructured():  # Kasmina culled the seed that broke the step (G1)
            self._restored_step = None  # the seed explains the failure, not the restored state
        self.stats.step_failures[reason] += 1
        self._epoch_failed = True
        self._event("loss_spike" if reason == "loss_spike" else "step_failure", _WARNING,
                    f"{reason} at step {self.step} (loss {loss})", reason=reason, step_index=self.step)
        self.emergency.escalate(epoch_failure_level(reason), reason, attributes={"step": self.step})
        if self.settings.rollback_enabled:
            self._do_rollback(reason, walk_back=True)

    def _do_rollback(self, reason: str, *, walk_back: bool = False) -> None:
        """Restore the last good state: the newest one, or, for a failed step (`walk_back`) on the state
        just restored, before any step was applied on it, one older than it (a snapshot taken of weights the update had
        already broken would otherwise be restored over and over). A checkpoint saved before seeds
        joined does not fit the model: the seeds are culled and the same checkpoint restored, inside the
        one deadline; a miss escalates to HALT (`TOLARIA_EMERGENCY_L4_ON_ROLLBACK_DEADLINE`)."""
        restored = self._restored_step if walk_back else None
        if self._snapshot_due is not None:  # a ROLLBACK at the boundary: the newest state is the due one's
            self._begin_snapshot()  # (rollback() settles the copy first), as if it had been copied in line
        try:
            result = self.rollback.rollback(self.host, self.optimizer,
                                            to_step=None if restored is None else restored - 1,
                                            on_mismatch=self._cull_to_fit)
        except RollbackDeadlineExceeded as e:
            self.stats.rollbacks["deadline_missed"] += 1
            if e.result is not None:  # restored, late: the statistics restart from the restored weights
                self._applied_step = self._restored_step = e.result.step
                self._reset_signals()
                self._report_refused_checkpoints(e.result.skipped_checkpoints)
            else:  # out of time before the checkpoint tier: nothing restored
                self._rollback_failed(e, reason)
            if self.settings.emergency_l4_on_rollback_deadline:
                self.emergency.escalate(pb.EMERGENCY_LEVEL_HALT, "rollback_deadline")
            log.error("rollback missed its deadline", error=str(e), restored=e.restored)
            return
        except RollbackError as e:
            self.stats.rollbacks[f"failed_{e.reason}"] += 1
            self._report_refused_checkpoints(e.skipped)
            log.error("nothing to roll back to", reason=reason, error=str(e))
            self._rollback_failed(e, reason)
            return
        self._report_refused_checkpoints(result.skipped_checkpoints)
        self.stats.rollbacks[result.tier] += 1
        self._applied_step = self._restored_step = result.step
        self._reset_signals()
        self._event("rollback", _WARNING, f"{result.tier} tier restored step {result.step} in "
                    f"{result.elapsed_ms:.2f} ms", reason=reason, tier=result.tier, restored_step=result.step)

    def _rollback_failed(self, e: RollbackError, reason: str) -> None:
        """Nothing was restored: a HIGH event on the emergency lane, not only a log line."""
        self._event("rollback_failed", _ERROR, str(e), priority=pb.MESSAGE_PRIORITY_HIGH, reason=reason,
                    failure=e.reason, step_index=self.step)

    def _report_refused_checkpoints(self, refused: tuple[CheckpointError, ...]) -> None:
        """A broken or tampered checkpoint a rollback passed over is never skipped silently: counted
        (`tolaria_checkpoint_errors_total`, the summary) and sent as a HIGH event on the emergency lane,
        once per file and reason (every later rollback walks past it again until retention drops it)."""
        for e in refused:
            key = (str(e.path), e.reason)
            if key in self._refused_checkpoints:
                continue
            self._refused_checkpoints.add(key)
            self.stats.checkpoints_refused[e.reason] += 1
            self.metrics.checkpoint_errors.labels(e.reason).inc()
            file = e.path.name if e.path is not None else ""
            log.error("checkpoint refused", file=file, error=str(e))
            self._event("checkpoint_refused", _ERROR, str(e), priority=pb.MESSAGE_PRIORITY_HIGH,
                        reason=e.reason, file=file, step_index=self.step)

    def _reset_signals(self) -> None:
        """The packet statistics restart from the restored weights; the spike check keeps the level."""
        if self.signals.loss.count:
            self._spike_reference = self.signals.loss.mean
        self.signals.reset()

    def _cull_to_fit(self, saved: TrainingState) -> bool:
        """A checkpoint that does not fit: cull the active seeds, but only if the model and optimizer
        without them fit it (the parameters and their shapes, and which seed each optimizer group holds).
        Otherwise (a fossil grafted since, the checkpoint holding a seed that is gone, or another
        germination in a slot) culling them would restore nothing and lose them all the same."""
        active = self.kasmina.active_slots()
        if not active:
            return False
        prefixes = tuple(f"slots.{name}.seed." for name in active)
        culled = {seed_id_for(name) for name in active}
        try:
            check_fit({k: v for k, v in self.host.state_dict().items() if not k.startswith(prefixes)},
                      [g for g in self.optimizer.param_groups
                       if g.get(SEED_GROUP_KEY) not in culled or g.get(FOSSIL_GROUP_KEY)], saved)
        except StateMismatchError:
            return False
        self.kasmina.cull_all("rollback")
        return True

    def _snapshot(self) -> None:
        """Fast-tier snapshots must fit the model as it is: when a seed changed its structure, older
        snapshots (other parameters) are dropped rather than kept to fail a later restore.

        Seeds change the structure by filling or emptying a slot, and the optimizer's by adding or
        dropping parameter groups: a cheap key of those (object ids) is compared every step; the full
        key (every state-dict name) is compared whenever a snapshot is due, before it is taken."""
        self._restructured()
        if not self.rollback.due(self.step):
            return
        # At the next step's start, beside its work; the first snapshot of a run or of a new structure (the
        # ring is empty) now: until it lands a rollback would have no fast tier at all.
        if len(self.rollback.ring) and self.rollback.copies_beside(self.host, self.optimizer):
            self._snapshot_due = (self.step, self.epoch)
            return
        self._check_structure()
        self.rollback.snapshot(self.host, self.optimizer, step=self.step, epoch=self.epoch, force=True)

    def _begin_snapshot(self) -> None:
        """Start the copy of the snapshot the last step found due. The boundary's commands are applied
        (a seed that joined is in it). If the weights are no longer that step's (a restore since), the copy
        is not made; `_do_rollback` takes a due copy before it restores anything."""
        assert self._snapshot_due is not None
        step, epoch = self._snapshot_due
        self._snapshot_due = None
        if self._applied_step != step or step in self.rollback.ring:  # restored since, or a command that
            return  # changed the structure had it copied in line already (`_snapshot_if_restructured`)
        self._restructured()
        self._check_structure()
        self.rollback.begin_snapshot(self.host, self.optimizer, step=step, epoch=epoch)

    def _restructured(self) -> bool:
        """Did a seed change the model's or the optimizer's structure since the last look? If so, the
        ring's snapshots that no longer fit are dropped."""
        # `_modules.get`, not `getattr`: a submodule read through `Module.__getattr__` costs ~1 us each
        # (2.4 us for this key that way, 0.5 us this way, warm; a few times more after a wide step).
        quick = (len(self.optimizer.param_groups),
                 *[(id(m), id(m._modules.get("seed"))) for m in self.host.slot_modules.values()])
        if quick == self._quick_structure:
            return False
        self._quick_structure = quick
        self._check_structure()
        self.host.train(self.host.training)  # a module that just joined follows the host's mode
        return True

    def _snapshot_if_restructured(self) -> bool:
        """After a command (or a refused step) that changed the model (a cull): the ring's snapshots still
        hold the seed, so a rollback before the next boundary's check would miss the fast tier and
        restore the last checkpoint, up to an epoch back (culling every other seed if that checkpoint
        held seeds too). The weights now are the last applied step's, less the seed. True if taken."""
        if not self._restructured():
            return False
        self.rollback.snapshot(self.host, self.optimizer, step=self._applied_step, epoch=self.epoch, force=True)
        return True

    def _check_structure(self) -> None:
        structure = (*tuple(self.host.state_dict().keys()), str(len(self.optimizer.param_groups)))
        if structure != self._structure:
            self.rollback.drop_snapshots()
            self._structure = structure

    # -- epochs ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.host.eval()
        logits = self.host(self.data.x_val)
        loss = float(F.cross_entropy(logits, self.data.y_val))
        return loss, batch_accuracy(logits, self.data.y_val)

    def end_epoch(self) -> None:
        s = self.settings
        loss, acc = self.evaluate()
        self.stats.val_loss.append(loss)
        self.stats.val_accuracy.append(acc)
        self.stats.epochs = self.epoch
        self._report_evidence(loss)
        self._count_seed_outcomes()
        if self._epoch_failed:
            self.failed_epochs += 1
            if self.failed_epochs >= s.emergency_l4_failed_epochs:
                self.emergency.escalate(pb.EMERGENCY_LEVEL_HALT, "failed_epochs")
        else:
            self.failed_epochs = 0
        # Also on the way out (HALT, SIGTERM, the last epoch): stopping must not lose the epochs since the
        # cadence's last checkpoint.
        if (self.epoch % s.checkpoint_every_epochs == 0 or self.emergency.halted or self._stop
                or self.epoch == s.epochs):
            self._save_checkpoint()
        log.info("epoch", epoch=self.epoch, val_loss=round(loss, 4), val_accuracy=round(acc, 4),
                 seeds=dict(Counter(_stage(st.stage) for st in self.kasmina.seed_states())))
        self._publish_epoch_telemetry(loss, acc)

    def _save_checkpoint(self) -> None:
        try:
            with self.metrics.checkpoint_seconds.time():
                self.checkpoints.save_training(self.host, self.optimizer, epoch=self.epoch, step=self.step)
            self.metrics.checkpoints.inc()
            self._checkpointed_step = self.step
        except CheckpointError as e:
            self.metrics.checkpoint_errors.labels(e.reason).inc()
            log.error("checkpoint not written", error=str(e))

    def _report_shadow(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One forward per SHADOWING seed with it ablated (`shadow_steps` steps of its life), so G4 judges
        the seed on the batches it was blended on, not against losses of earlier batches."""
        for seed_id in self.kasmina.shadowing():
            with torch.no_grad(), self.kasmina.ablated(seed_id):
                loss_without = float(F.cross_entropy(self.host(xb), yb))
            self.kasmina.report_shadow(seed_id, loss_without=loss_without)

    def _report_evidence(self, loss_with: float) -> None:
        for st in self.kasmina.seed_states():
            if st.stage == pb.SEED_STAGE_PROBATIONARY:
                with self.kasmina.ablated(st.seed_id):
                    loss_without, _ = self.evaluate()
                self.kasmina.report_evidence(st.seed_id, loss_with=loss_with, loss_without=loss_without)

    def _count_seed_outcomes(self) -> None:
        events = self.kasmina.drain_events()
        for e in events:
            if e.attributes.get("event") == "seed_stage":
                to = e.attributes.get("to_stage", "")
                self.stats.seeds_fossilized += to == "FOSSILIZED"
                self.stats.seeds_culled += to == "CULLED"
        self._pending_events.extend(events)

    def _publish_epoch_telemetry(self, loss: float, acc: float) -> None:
        if self.bus is None:
            self._pending_events.clear()
            return
        breaker_state = self.conservative.state  # read first: it may observe OPEN → HALF_OPEN ...
        self._report_mode_changes()  # ... which the gauges then show too
        metrics = [build_metric("tolaria.training.validation_loss", loss),
                   build_metric("tolaria.training.accuracy", acc, unit="ratio"),
                   build_metric("tolaria.epochs.total", float(self.epoch)),
                   build_metric("tolaria.mode.conservative", 0.0 if breaker_state == CLOSED else 1.0),
                   build_metric("tolaria.decision_breaker.state", float(breaker_state))]
        if self._train_loss_steps:  # mean training loss of the epoch's applied steps (Nissa: esper_training_loss)
            metrics.append(build_metric("tolaria.training.loss", self._train_loss_sum / self._train_loss_steps))
        events = [*self._pending_events, *self.emergency.events(self._new_escalations())]
        self._pending_events.clear()
        self.bus.publish_telemetry(build_telemetry_packet("tolaria", metrics=metrics, events=events))
        self.bus.publish_telemetry(self.kasmina.telemetry_packet())

    def _new_escalations(self) -> list[Any]:
        history = list(self.emergency.history)
        new = history[self._escalations_seen:]
        self._escalations_seen = len(history)
        return new

    def _event(self, name: str, level: int, description: str = "", *, priority: int | None = None,
               **attributes: object) -> None:
        """A trainer event; WARNING ones go out at once (those in core's HIGH list, such as
        tamiyo_timeout and loss_spike, or given `priority` HIGH, on the emergency lane), the rest with
        the epoch's telemetry."""
        event = build_event(name, level=level, description=description[:200], **attributes)
        if self.bus is not None and level >= _WARNING:
            indicators = None if priority is None else {
                PRIORITY_INDICATOR: pb.MessagePriority.Name(pb.MessagePriority.ValueType(priority))}
            self.bus.publish_telemetry(build_telemetry_packet("tolaria", events=[event], indicators=indicators))
        else:
            self._pending_events.append(event)

    # -- summary -----------------------------------------------------------------------------------

    def summary(self, *, clean_shutdown: bool) -> dict[str, Any]:
        st = self.stats
        lat = sorted(st.decision_ms)
        stages = Counter(_stage(s.stage) for s in self.kasmina.seed_states())
        seed_params = sum(p.numel() for name, p in self.host.named_parameters() if ".seed." in name)
        return {
            "run_id": self.settings.run_id, "epochs": st.epochs, "steps": st.steps,
            "final_val_accuracy": _last(st.val_accuracy), "final_val_loss": _last(st.val_loss),
            "decisions": sum(st.decisions.values()), "decision_commands": st.decisions["command"],
            "decision_failures": st.decisions["failure"], "timeouts": st.decisions["timeout"],
            "decision_errors": st.decisions["error"], "failures_by_reason": dict(st.failure_reasons),
            "decision_p50_ms": statistics.median(lat) if lat else None,
            "decision_p99_ms": lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else None,
            "commands_applied": sum(st.commands.values()), "commands_by_type": dict(st.commands),
            "commands_stale": st.stale, "commands_rejected": sum(st.rejected.values()),
            "rejected_by_reason": dict(st.rejected), "lr_changes": st.lr_changes,
            "step_failures": dict(st.step_failures), "rollbacks": dict(st.rollbacks),
            "checkpoints_refused": dict(st.checkpoints_refused),
            "budget_misses": dict(st.budget_misses),
            "emergencies": len(self.emergency.history), "emergency_level": int(self.emergency.level),
            "halted": self.emergency.halted, "seeds_fossilized": st.seeds_fossilized,
            "seeds_culled": st.seeds_culled, "seeds_by_stage": dict(stages), "seed_parameters": seed_params,
            "host_parameters": sum(p.numel() for p in self.host.host_parameters()),
            "decisions_skipped_inflight": self.decisions.skipped_inflight if self.decisions else 0,
            "decision_sidecar_restarts": getattr(self.decisions, "restarts", 0),
            "decisions_skipped_sidecar_starting": getattr(self.decisions, "skipped_starting", 0),
            "conservative_mode": self.conservative.active, "conservative_entries": self.conservative.entries,
            "conservative_steps": self.conservative.steps,
            "decisions_skipped_conservative": self.conservative.skipped,
            "conservative_probes": self.conservative.probes,
            "conservative_probe_failures": self.conservative.probe_failures,
            "commands_dropped_conservative": st.commands_dropped_conservative,
            "val_accuracy_by_epoch": list(st.val_accuracy), "clean_shutdown": clean_shutdown,
        } | self.emergency_delivery()

    def emergency_delivery(self) -> dict[str, Any]:
        """Where the run's EmergencySignals went: a run that ends with Redis down still says, in its
        summary, what waits on disk for the next start and what was lost (not only in a log line)."""
        publisher = self.emergency.publisher
        if publisher is None:
            return {"emergency_signals_published": 0, "emergency_signals_pending": 0, "emergency_signals_dropped": {}}
        st = publisher.stats()
        return {"emergency_signals_published": st.published, "emergency_signals_pending": st.pending,
                "emergency_signals_dropped": dict(st.dropped)}

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self.rollback.close()
        finally:
            if isinstance(self.decisions, SidecarDecisionClient):
                self.decisions.close()
            publisher = self.emergency.publisher
            if publisher is not None:
                publisher.flush(timeout_s)
                publisher.close(timeout_s)


def fit_evidence_grace(ks: KasminaSettings, steps_per_epoch: int) -> KasminaSettings:
    """Kasmina culls a probationary seed `evidence_grace_steps` past probation without evidence, and this
    trainer reports evidence at epoch ends only: a grace shorter than the `min_evidence` epochs a seed may
    wait culled every seed that reached probation early in a long epoch (`no_evidence`), whatever it was
    worth. The grace is raised to cover them, and the log says so."""
    need = ks.min_evidence * steps_per_epoch
    if ks.evidence_grace_steps >= need:
        return ks
    log.warning("KASMINA_EVIDENCE_GRACE_STEPS raised to cover the evidence cadence (one report per epoch)",
                configured=ks.evidence_grace_steps, used=need, steps_per_epoch=steps_per_epoch,
                min_evidence=ks.min_evidence)
    return ks.model_copy(update={"evidence_grace_steps": need})


def _last(values: list[float]) -> float | None:
    return values[-1] if values else None


def _stage(stage: int) -> str:
    return pb.SeedLifecycleStage.Name(stage).removeprefix("SEED_STAGE_")  # type: ignore[arg-type]
