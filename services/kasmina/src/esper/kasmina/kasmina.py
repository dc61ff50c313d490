"""``Kasmina``: the seed executor the trainer drives. Synchronous except for kernel fetches.

The trainer's loop, in order (see docs/kasmina.md)::

    kasmina = Kasmina(keys=keys, kernels=KernelClient(bus, ArtifactStore(dir)), optimizer=opt)
    kasmina.register_host(model)                   # every SeedSlot in the model: seed-<layer>
    for step in ...:
        task_loss = criterion(model(x), y)
        loss = task_loss
        if (aux := kasmina.auxiliary_loss()) is not None:
            loss = loss + aux                      # seeds in TRAINING learn their local objective
        loss.backward(); opt.step(); opt.zero_grad()
        kasmina.advance(step, epoch=epoch, loss=task_loss.item())   # gates, alpha schedule, stages
        if command is not None:                    # a verified command arrived from Tamiyo
            outcome = kasmina.apply_command(command)   # CommandRejected on refusal
            kasmina.start_prefetch()               # kernel fetch off the step path
        packet.seed_states.extend(kasmina.seed_states())
        publish(kasmina.telemetry_packet())

Stage progression counts *training steps of the seed* (steps in which a training-mode forward ran it
with gradients on); evaluation-only steps do not move a seed's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from esper.core.clock import now_ms
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_metric, build_telemetry_packet
from esper.karn.catalogue import get_template
from esper.karn.template import KarnError
from esper.kasmina.blending import BLEND_MODES, SCHEDULE_KINDS, BlendSpec
from esper.kasmina.errors import CommandRejected, KernelFetchError
from esper.kasmina.gates import (
    FALLBACK_STATUS,
    GateResult,
    GradientObservation,
    gate_g0_sanity,
    gate_g1_gradient_health,
    gate_g2_stability,
    gate_g3_interface,
    gate_g4_system_impact,
    gate_g5_reset,
)
from esper.kasmina.kernels import KernelSource, resolve_kernel_id
from esper.kasmina.lifecycle import (
    ACTIVE_STAGES,
    BLENDING,
    CULLED,
    DORMANT,
    EMBARGOED,
    FOSSILIZED,
    GERMINATED,
    PROBATIONARY,
    RESETTING,
    SHADOWING,
    TERMINATED,
    TRAINING,
    SeedLifecycle,
    Transition,
    stage_name,
)
from esper.kasmina.optim import add_seed_params, mark_fossil, remove_seed_params, seed_group, seed_param_count
from esper.kasmina.record import SeedRecord
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.slot import SeedSlot, SlotStepStats, probe_kernel
from esper.kasmina.validation import CommandValidator, parse_germination
from esper.leyline import SigningKeys, enum_name, pb

__all__ = ["CommandAction", "CommandOutcome", "Kasmina", "allowed_blend_modes"]

log = get_logger("esper.kasmina")

CommandAction = Literal["germinated", "culled", "fossilized", "paused", "resumed", "acknowledged", "for_trainer"]
TRAINER_COMMANDS: Final[frozenset[int]] = frozenset(
    {pb.COMMAND_OPTIMIZER, pb.COMMAND_ROLLBACK, pb.COMMAND_CIRCUIT_BREAKER, pb.COMMAND_EMERGENCY})
PAUSE_STEPS: Final[int] = 10  # a PAUSE holds an active seed's clock this many of its steps (renewed by each PAUSE)
SOURCE: Final[str] = "kasmina"
_EVENT_BUFFER: Final[int] = 1024

_INFO, _WARNING, _ERROR, _CRITICAL = (pb.TELEMETRY_LEVEL_INFO, pb.TELEMETRY_LEVEL_WARNING, pb.TELEMETRY_LEVEL_ERROR,
                                      pb.TELEMETRY_LEVEL_CRITICAL)
_SECURITY_ERRORS: Final[frozenset[str]] = frozenset({"invalid_signature", "nonce_replayed", "verifier_unavailable"})


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What ``apply_command`` did. ``for_trainer`` carries OPTIMIZER / ROLLBACK / CIRCUIT_BREAKER /
    EMERGENCY commands back: those are the trainer's to execute (Kasmina owns no learning rate)."""

    command_id: str
    command_type: int
    action: CommandAction
    seed_id: str = ""
    kernel_pending: bool = False
    for_trainer: pb.AdaptationCommand | None = None


def allowed_blend_modes(blueprint_id: str) -> tuple[str, ...]:
    """Blend modes a Karn blueprint allows: its template's list, plus CHANNEL and CONFIDENCE wherever
    CONVEX is allowed (both are convex blends with a per-channel / gated alpha). Unknown blueprint: none."""
    try:
        methods = set(get_template(blueprint_id.split("@", 1)[0]).blend_methods)
    except KarnError:
        return ()
    if "CONVEX" in methods:
        methods |= {"CHANNEL", "CONFIDENCE"}
    return tuple(m for m in BLEND_MODES if m in methods)


def _template_risk(blueprint_id: str) -> float:
    try:
        return float(get_template(blueprint_id.split("@", 1)[0]).risk)
    except KarnError:
        return 0.0


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def _finite_module(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*module.parameters(), *module.buffers())
               if t.is_floating_point())


class Kasmina:
    """Executes verified commands on registered seed slots and drives each seed through its lifecycle."""

    def __init__(self, *, keys: SigningKeys | None, settings: KasminaSettings | None = None,
                 kernels: KernelSource | None = None, optimizer: Optimizer | None = None,
                 clock_ms: Callable[[], int] = now_ms) -> None:
        """
        :param keys: command signing keys (``None``: every command is rejected, ``verifier_unavailable``).
        :param kernels: where kernels come from (``KernelClient`` over Oona); ``None`` rejects germination.
        :param optimizer: the trainer's optimizer; seed parameters join and leave it in place.
        :param clock_ms: wall clock for command freshness (injected by tests).
        """
        self.settings = settings or KasminaSettings()
        s = self.settings
        self.validator = CommandValidator(keys, nonce_ttl_ms=int(s.nonce_ttl_s * 1000), nonce_capacity=s.nonce_capacity,
                                          max_future_ms=int(s.max_future_s * 1000), max_age_ms=int(s.max_age_s * 1000),
                                          clock_ms=clock_ms)
        self.kernels = kernels
        self.optimizer = optimizer
        self._records: dict[str, SeedRecord] = {}
        self._host_layers: set[str] = set()
        self._events: deque[pb.TelemetryEvent] = deque(maxlen=_EVENT_BUFFER)
        self._events_dropped = 0
        self._isolation_violations = 0  # every seed's, ever (a record's count restarts with each seed)
        self._fetch_task: asyncio.Task[int] | None = None
        self._step = 0
        self._epoch = 0
        self.commands_applied = 0  # executed here (SEED, PAUSE, ...)
        self.commands_for_trainer = 0  # valid, handed back to the trainer (OPTIMIZER, ROLLBACK, ...)
        self.commands_rejected = 0

    # -- wiring ------------------------------------------------------------------------------------

    def register_slot(self, slot: SeedSlot) -> str:
        """Register one slot (layer depth = registration order, from 1); returns its seed id."""
        if slot.seed_id in self._records:
            raise ValueError(f"{slot.seed_id} is already registered")
        self._records[slot.seed_id] = SeedRecord(slot=slot, lifecycle=SeedLifecycle(slot.seed_id),
                                                 depth=len(self._records) + 1)
        self._host_layers.add(slot.layer)
        return slot.seed_id

    def register_host(self, model: nn.Module) -> list[str]:
        """Register every ``SeedSlot`` in ``model`` (module order); their names join the host layers."""
        ids = []
        for name, module in model.named_modules():
            if isinstance(module, SeedSlot):
                ids.append(self.register_slot(module))
                if name:
                    self._host_layers.add(name)
        self._host_layers.update(name for name, _ in model.named_modules() if name)
        return ids

    def register_host_layers(self, names: Iterable[str]) -> None:
        """Extra host layer names that ``mesh_host_layers`` annotations may require (G3)."""
        self._host_layers.update(names)

    def bind_optimizer(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def seed_ids(self) -> tuple[str, ...]:
        return tuple(self._records)

    @property
    def host_layers(self) -> frozenset[str]:
        return frozenset(self._host_layers)

    def slot(self, seed_id: str) -> SeedSlot:
        return self._record(seed_id).slot

    def stage(self, seed_id: str) -> int:
        return self._record(seed_id).stage

    def history(self, seed_id: str) -> tuple[Transition, ...]:
        """The seed slot's recent stage transitions (step, epoch, reason), oldest first."""
        return self._record(seed_id).lifecycle.history

    def _record(self, seed_id: str) -> SeedRecord:
        try:
            return self._records[seed_id]
        except KeyError:
            raise KeyError(f"no seed slot {seed_id!r}") from None

    # -- commands ----------------------------------------------------------------------------------

    def apply_command(self, cmd: pb.AdaptationCommand) -> CommandOutcome:
        """Validate, then execute at this step boundary. Raises :class:`CommandRejected` (with a
        ``command_rejected`` event) when the command is refused; nothing has changed then."""
        try:
            self.validator.validate(cmd)
            outcome = self._dispatch(cmd)
        except CommandRejected as e:
            self.commands_rejected += 1
            level = _ERROR if e.reason in _SECURITY_ERRORS else _WARNING
            self._emit("command_rejected", level, e.detail or e.reason, reason=e.reason, command_id=cmd.command_id,
                       command_type=enum_name(pb.CommandType, cmd.command_type), seed_id=cmd.target_seed_id,
                       step=self._step)
            log.warning("command rejected", reason=e.reason, command_id=cmd.command_id, detail=e.detail[:200])
            raise
        if outcome.action == "for_trainer":  # the trainer carries it out, or refuses it, and counts that
            self.commands_for_trainer += 1
        else:
            self.commands_applied += 1
        return outcome

    def _dispatch(self, cmd: pb.AdaptationCommand) -> CommandOutcome:
        kind = cmd.command_type
        if kind == pb.COMMAND_SEED:
            return self._seed_command(cmd)
        if kind == pb.COMMAND_PAUSE:
            return self._pause(cmd)
        if kind == pb.COMMAND_EMERGENCY:
            self._emergency_cleanup(cmd)
        if kind in TRAINER_COMMANDS:
            return CommandOutcome(cmd.command_id, kind, "for_trainer", cmd.target_seed_id, for_trainer=cmd)
        raise CommandRejected("unsupported_command", enum_name(pb.CommandType, kind), command_id=cmd.command_id)

    def _target(self, cmd: pb.AdaptationCommand) -> SeedRecord:
        if not cmd.target_seed_id:
            raise CommandRejected("missing_seed_id", command_id=cmd.command_id)
        rec = self._records.get(cmd.target_seed_id)
        if rec is None:
            raise CommandRejected("unknown_seed", f"no slot {cmd.target_seed_id!r}", command_id=cmd.command_id,
                                  seed_id=cmd.target_seed_id)
        return rec

    def _illegal(self, cmd: pb.AdaptationCommand, rec: SeedRecord, what: str) -> CommandRejected:
        return CommandRejected("illegal_transition", f"{what} while {stage_name(rec.stage)}",
                               command_id=cmd.command_id, seed_id=rec.seed_id)

    def _seed_command(self, cmd: pb.AdaptationCommand) -> CommandOutcome:
        if not cmd.HasField("seed_operation"):
            raise CommandRejected("invalid_payload", "SEED command without seed_operation", command_id=cmd.command_id)
        op = cmd.seed_operation.operation
        if op == pb.SEED_OP_GERMINATE:
            return self._germinate(cmd)
        rec = self._target(cmd)
        if op in (pb.SEED_OP_CULL, pb.SEED_OP_CANCEL):
            if rec.stage not in ACTIVE_STAGES:
                raise self._illegal(cmd, rec, "cull")
            self._cull(rec, "command_cull" if op == pb.SEED_OP_CULL else "command_cancel")
            return CommandOutcome(cmd.command_id, cmd.command_type, "culled", rec.seed_id)
        if op == pb.SEED_OP_FOSSILIZE:
            if rec.stage != PROBATIONARY:
                raise self._illegal(cmd, rec, "fossilize")
            improvement = _mean(rec.evidence)  # the automatic verdict's bar, count included
            if (len(rec.evidence) < self.settings.min_evidence or improvement is None
                    or not improvement > self.settings.min_improvement):
                raise CommandRejected("insufficient_evidence", f"{len(rec.evidence)} reports (need "
                                      f"{self.settings.min_evidence}), mean improvement {improvement}",
                                      command_id=cmd.command_id, seed_id=rec.seed_id)
            self._fossilize(rec, "command_fossilize")
            return CommandOutcome(cmd.command_id, cmd.command_type, "fossilized", rec.seed_id)
        raise CommandRejected("unsupported_operation", enum_name(pb.SeedOperation, op), command_id=cmd.command_id,
                              seed_id=rec.seed_id)

    def _germinate(self, cmd: pb.AdaptationCommand) -> CommandOutcome:
        germ = parse_germination(cmd)  # annotations first: "before anything runs"
        op = cmd.seed_operation
        rec = self._records.get(cmd.target_seed_id)
        if rec is not None and rec.stage != DORMANT:  # the prototype's order: DORMANT, then G0 (a bad command
            raise self._illegal(cmd, rec, "germinate")  # aimed at a live seed is no G0 failure of that seed)
        g0 = gate_g0_sanity(seed_id=cmd.target_seed_id, registered=rec is not None, blueprint_id=op.blueprint_id,
                            parameters=dict(op.parameters))
        if not g0.passed or rec is None:
            if rec is not None:
                self._gate_failure(rec, g0)
            raise CommandRejected(g0.reason, g0.detail, command_id=cmd.command_id, seed_id=cmd.target_seed_id)
        if self.kernels is None:
            raise CommandRejected("kernel_source_unavailable", "Kasmina has no kernel source",
                                  command_id=cmd.command_id, seed_id=rec.seed_id)
        spec = self._complete_spec(germ.blend, op.parameters)
        if spec.alpha_vec is not None and len(spec.alpha_vec) != rec.slot.shape.channels:
            raise CommandRejected("invalid_alpha_vec", f"{len(spec.alpha_vec)} entries for "
                                  f"{rec.slot.shape.channels} channels", command_id=cmd.command_id,
                                  seed_id=rec.seed_id)
        try:
            kid = resolve_kernel_id(op.blueprint_id, rec.slot.shape)
        except KernelFetchError as e:
            raise CommandRejected(e.reason, e.detail, command_id=cmd.command_id, seed_id=rec.seed_id) from e
        rec.clear_seed(new_seed=True)
        rec.command_id, rec.blueprint_id, rec.kernel_id = cmd.command_id, op.blueprint_id, kid
        rec.spec, rec.mesh_layers, rec.performance_status = spec, germ.mesh_layers, germ.performance_status
        rec.schedule = spec.alpha_schedule(self.settings.blend_steps)
        rec.fetch_state = "pending"
        rec.germinated_epoch = self._epoch
        self._gate_passed(rec, g0)
        self._transition(rec, GERMINATED, "command_germinate")
        self._emit("seed_operation", _INFO, "germinate", seed_id=rec.seed_id, operation="GERMINATE",
                   blueprint_id=op.blueprint_id, kernel_id=kid, blend_mode=spec.mode, schedule=spec.schedule,
                   command_id=cmd.command_id)
        return CommandOutcome(cmd.command_id, cmd.command_type, "germinated", rec.seed_id, kernel_pending=True)

    @staticmethod
    def _complete_spec(spec: BlendSpec, params: Mapping[str, float]) -> BlendSpec:
        """Numbers from ``seed_operation.parameters`` (G0 checked them): alpha0 and the schedule span."""
        start = min(1.0, max(0.0, float(params.get("blending_schedule_start", 0.0))))
        end = min(1.0, max(0.0, float(params.get("blending_schedule_end", 1.0))))
        alpha = min(1.0, max(0.0, float(params.get("alpha", 0.0))))
        return dataclasses.replace(spec, alpha_start=alpha, schedule_start=min(start, end),
                                   schedule_end=max(start, end))

    def _pause(self, cmd: pb.AdaptationCommand) -> CommandOutcome:
        """PAUSE with no target: nothing to do. On an active seed: hold its clock for ``PAUSE_STEPS`` of
        its steps (each PAUSE renews it); ``resume=true`` releases it. Other stages: acknowledged."""
        if not cmd.target_seed_id:
            return CommandOutcome(cmd.command_id, cmd.command_type, "acknowledged")
        rec = self._target(cmd)
        if rec.stage not in ACTIVE_STAGES:
            return CommandOutcome(cmd.command_id, cmd.command_type, "acknowledged", rec.seed_id)
        resume = cmd.annotations.get("resume", "").strip().lower() == "true"
        rec.paused_steps = 0 if resume else PAUSE_STEPS
        self._emit("seed_resumed" if resume else "seed_paused", _INFO, seed_id=rec.seed_id,
                   reason=cmd.annotations.get("reason", ""), command_id=cmd.command_id)
        return CommandOutcome(cmd.command_id, cmd.command_type, "resumed" if resume else "paused", rec.seed_id)

    def _emergency_cleanup(self, cmd: pb.AdaptationCommand) -> None:
        clear = getattr(self.kernels, "clear_cache", None)
        dropped = clear() if callable(clear) else 0
        gc.collect()
        self._emit("emergency_cleanup", _WARNING, "kernel cache cleared", cached_kernels_dropped=dropped,
                   command_id=cmd.command_id)

    # -- kernels -----------------------------------------------------------------------------------

    def pending_kernels(self) -> list[str]:
        """Seed ids whose germination waits for a kernel fetch to start."""
        return [r.seed_id for r in self._records.values() if r.fetch_state == "pending"]

    async def fetch_kernels(self) -> int:
        """Fetch every pending kernel concurrently (call off the step path); results are attached at
        the next ``advance``. Never raises for a failed fetch: that germination fails there, explicitly."""
        done = 0
        while self.kernels is not None:
            todo = [r for r in self._records.values() if r.fetch_state == "pending"]
            if not todo:
                break
            started = [(r, r.generation) for r in todo]
            for r in todo:
                r.fetch_state = "in_flight"
            try:
                await asyncio.gather(*(self._fetch_one(r, gen) for r, gen in started))
            except asyncio.CancelledError:  # shutdown, or the prefetch task cancelled: a fetch left
                for r, gen in started:       # "in_flight" would hold its seed in GERMINATED for good
                    if r.fetch_state == "in_flight":
                        self._fetch_failed(r, gen, KernelFetchError("cancelled", "the kernel fetch was cancelled",
                                                                    kernel_id=r.kernel_id))
                raise
            done += len(todo)
        return done

    def start_prefetch(self) -> asyncio.Task[int] | None:
        """Start ``fetch_kernels`` as a task on the running loop (None when nothing is pending)."""
        if not self.pending_kernels():
            return None
        if self._fetch_task is None or self._fetch_task.done():
            self._fetch_task = asyncio.get_running_loop().create_task(self.fetch_kernels())
        return self._fetch_task

    async def _fetch_one(self, rec: SeedRecord, generation: int) -> None:
        assert self.kernels is not None
        try:
            fetched = await self.kernels.fetch(rec.kernel_id, rec.slot.shape, device=rec.slot.device)
        except KernelFetchError as e:
            error = e
        except Exception as e:  # a broken kernel source must fail this germination, not the trainer
            log.exception("kernel source raised", seed_id=rec.seed_id, kernel_id=rec.kernel_id)
            error = KernelFetchError("internal_error", repr(e)[:300], kernel_id=rec.kernel_id)
        else:
            if rec.generation == generation:  # the state last: the boundary reads it first
                rec.fetch_generation, rec.fetched = generation, fetched
                rec.fetch_state = "ready"
            return
        self._fetch_failed(rec, generation, error)

    @staticmethod
    def _fetch_failed(rec: SeedRecord, generation: int, error: KernelFetchError) -> None:
        if rec.generation == generation:  # the state last: the boundary reads it first
            rec.fetch_generation, rec.fetch_error = generation, error
            rec.fetch_state = "failed"

    def _settle_fetch(self, rec: SeedRecord) -> None:
        """At a step boundary: attach a fetched kernel (G0 weights, G3 interface) or fail the germination."""
        if rec.fetch_state in ("ready", "failed") and rec.fetch_generation != rec.generation:
            # An earlier germination's fetch wrote its outcome between its generation check and the
            # write (the bus thread, while the trainer re-germinated): never attach or fail on it.
            log.warning("stale kernel fetch discarded", seed_id=rec.seed_id, kernel_id=rec.kernel_id)
            rec.fetched, rec.fetch_error, rec.fetch_state = None, None, "pending"
            return
        if rec.fetch_state == "failed":
            err = rec.fetch_error
            reason = err.reason if err is not None else "unknown"
            self._emit("germination_failed", _ERROR, err.detail if err is not None else reason, seed_id=rec.seed_id,
                       reason=reason, kernel_id=rec.kernel_id)
            # No kernel: the seed could only run on a substitute, and G4 rejects a fallback for good.
            g4 = gate_g4_system_impact(performance_status=FALLBACK_STATUS, check_regression=False)
            g4 = dataclasses.replace(g4, detail=f"kernel fetch failed ({reason}); no substitute kernel is attached")
            self._cull(rec, f"kernel_{reason}", gate=g4, fetch_reason=reason, kernel_id=rec.kernel_id)
            return
        if rec.fetch_state != "ready" or rec.fetched is None or rec.spec is None:
            return
        fetched = rec.fetched
        g0 = gate_g0_sanity(seed_id=rec.seed_id, registered=True, blueprint_id=fetched.blueprint_id,
                            kernel_finite=_finite_module(fetched.module), kernel_id=fetched.kernel_id,
                            expected_kernel_id=rec.kernel_id)  # resolved at germination: BP002@v64
        if not g0.passed:
            self._cull(rec, "gate_g0", gate=g0)
            return
        rec.allowed_blend = allowed_blend_modes(fetched.blueprint_id)
        g3 = self._g3(rec, fetched.module)
        if not g3.passed:
            self._cull(rec, "gate_g3", gate=g3)
            return
        rec.slot.attach(fetched.module, rec.spec)
        rec.risk = _template_risk(fetched.blueprint_id)
        rec.kernel_latency_ms = fetched.latency_ms
        rec.fetched, rec.fetch_state = None, "none"
        self._add_to_optimizer(rec)
        self._gate_passed(rec, g3)
        self._emit("kernel_attached", _INFO, seed_id=rec.seed_id, kernel_id=fetched.kernel_id,
                   checksum=fetched.checksum, latency_ms=f"{fetched.latency_ms:.3f}", cache_hit=fetched.cache_hit)

    def _g3(self, rec: SeedRecord, module: nn.Module) -> GateResult:
        slot = rec.slot
        probe = probe_kernel(module, slot.shape, dtype=slot.dtype, device=slot.device)
        spec = rec.spec or BlendSpec()
        return gate_g3_interface(probe, required_layers=rec.mesh_layers, host_layers=self._host_layers,
                                 blend_mode=spec.mode, allowed_blend_modes=rec.allowed_blend)

    def _add_to_optimizer(self, rec: SeedRecord) -> None:
        seed = rec.slot.seed
        if seed is None:
            return
        if self.optimizer is None:
            self._emit("optimizer_unbound", _WARNING, "seed attached but no optimizer is bound: it cannot learn",
                       seed_id=rec.seed_id)
            return
        overrides: dict[str, Any] = {} if self.settings.seed_lr is None else {"lr": self.settings.seed_lr}
        add_seed_params(self.optimizer, rec.seed_id, seed.parameters(), germination=rec.command_id, **overrides)

    # -- per step ----------------------------------------------------------------------------------

    def auxiliary_loss(self) -> Tensor | None:
        """The local losses of seeds in TRAINING (and GERMINATED) since the last call; add it to the
        training loss before ``backward()``. None when no seed is training."""
        total: Tensor | None = None
        for rec in self._records.values():
            aux = rec.slot.pop_auxiliary_loss()
            if aux is not None:
                total = aux if total is None else total + aux.to(total.device)
        return total

    def discard_step(self) -> None:
        """The trainer refused this step (non-finite, loss spike) and never applied it: forget what the
        seeds observed in it (local losses, latencies, gradient norms, isolation), or the next step's
        gates would judge a seed on a batch that was thrown away (a NaN batch culled a healthy seed).

        A seed whose output went non-finite on finite input is culled here (G1 ``non_finite_output``):
        it makes every step it runs in non-finite, so no step it takes part in reaches ``advance``."""
        for rec in self._records.values():
            rec.slot.discard_step()
            rec.shadow_pending = None
            if rec.stage in ACTIVE_STAGES and rec.slot.output_nonfinite:
                g1 = gate_g1_gradient_health(GradientObservation(False, 0.0, 0.0, output_finite=False))
                self._cull(rec, "gate_g1", gate=g1)

    def advance(self, step: int, *, epoch: int | None = None, loss: float | None = None) -> None:
        """Step boundary: attach fetched kernels, evaluate gates, advance alpha schedules and stages.

        :param loss: the step's training loss (G4 compares the blended loss to the host-only baseline).
        """
        self._step = step
        if epoch is not None:
            self._epoch = epoch
        for rec in self._records.values():
            self._advance_seed(rec, loss)
            rec.shadow_pending = None  # this step's report was paired, or its step did not count

    def _advance_seed(self, rec: SeedRecord, loss: float | None) -> None:
        stage = rec.stage
        if stage == GERMINATED and not rec.kernel_attached:
            self._settle_fetch(rec)
            return
        if stage == CULLED:
            self._transition(rec, EMBARGOED, "cooldown")
            rec.stage_steps = 0
            return
        if stage == EMBARGOED:
            rec.stage_steps += 1
            if rec.stage_steps >= self.settings.embargo_steps:
                self._transition(rec, RESETTING, "embargo_over")
            return
        if stage == RESETTING:
            self._reset(rec)
            return
        if stage not in ACTIVE_STAGES:
            return
        stats = rec.slot.collect()
        if not self._check_health(rec, stats):
            return
        if not stats.trained:
            return
        if rec.paused_steps > 0:
            rec.paused_steps -= 1
            return
        rec.stage_steps += 1
        self._progress(rec, stats, loss)

    def _check_health(self, rec: SeedRecord, stats: SlotStepStats) -> bool:
        """G1 on every trained step while isolated, and G4's fallback rule always; False if culled."""
        rec.grad_norm = stats.grad_norm
        if stats.isolation.samples:
            rec.isolation = stats.isolation
        if stats.trained:
            g1 = gate_g1_gradient_health(
                GradientObservation(stats.grads_observed, stats.grad_norm, stats.isolation.dot,
                                    stats.isolation.seed_norm),
                isolation_threshold=self.settings.isolation_threshold, max_grad_norm=self.settings.max_grad_norm)
            if not g1.passed:
                if g1.reason == "isolation_violation":
                    rec.isolation_violations += 1
                    self._isolation_violations += 1
                    self._emit("isolation_violation", _WARNING, g1.detail, seed_id=rec.seed_id,
                               dot=f"{stats.isolation.dot:.6g}", host_norm=f"{stats.isolation.host_norm:.6g}",
                               seed_norm=f"{stats.isolation.seed_norm:.6g}")
                self._cull(rec, "gate_g1", gate=g1)
                return False
        g4 = gate_g4_system_impact(performance_status=rec.performance_status, check_regression=False)
        if not g4.passed:
            self._cull(rec, "gate_g4", gate=g4)
            return False
        return True

    def _progress(self, rec: SeedRecord, stats: SlotStepStats, loss: float | None) -> None:
        step = {GERMINATED: self._step_germinated, TRAINING: self._step_training, BLENDING: self._step_blending,
                SHADOWING: self._step_shadowing, PROBATIONARY: self._step_probation}[rec.stage]
        step(rec, stats, loss)

    def _step_germinated(self, rec: SeedRecord, stats: SlotStepStats, loss: float | None) -> None:
        if rec.stage_steps >= self.settings.probe_steps:  # G1 already passed on this step (_check_health)
            self._gate_passed(rec, GateResult(pb.SEED_GATE_G1_GRADIENT_HEALTH, True))
            self._enter(rec, TRAINING, "gate_g1")

    def _step_training(self, rec: SeedRecord, stats: SlotStepStats, loss: float | None) -> None:
        s = self.settings
        rec.local_losses.extend(stats.local_losses)
        rec.latencies_ms.extend(stats.latencies_ms)
        if loss is not None:
            rec.baseline_losses.append(loss)  # the host alone: a TRAINING seed does not touch the output
        if rec.stage_steps < s.training_steps:
            return
        g2 = gate_g2_stability(losses=list(rec.local_losses), latencies_ms=list(rec.latencies_ms),
                               window=s.training_steps, max_loss_ratio=s.stability_loss_ratio,
                               latency_budget_ms=s.latency_budget_ms)
        if self._gate(rec, g2, "gate_g2"):
            self._enter(rec, BLENDING, "gate_g2")
            rec.slot.start_blending(self._alpha(rec, 0))

    def _step_blending(self, rec: SeedRecord, stats: SlotStepStats, loss: float | None) -> None:
        rec.blend_step += 1
        schedule = rec.schedule
        if schedule is not None and not schedule.done(rec.blend_step):
            rec.slot.alpha = self._alpha(rec, rec.blend_step)
            return
        if self._gate(rec, self._g3(rec, rec.slot.seed or nn.Identity()), "gate_g3"):
            self._enter(rec, SHADOWING, "gate_g3")
            rec.slot.alpha = schedule.alpha_end if schedule is not None else 1.0

    def _step_shadowing(self, rec: SeedRecord, stats: SlotStepStats, loss: float | None) -> None:
        s = self.settings
        if loss is not None:
            rec.shadow_losses.append(loss)
            if rec.shadow_pending is not None:
                rec.shadow_pairs.append((loss, rec.shadow_pending))
        if rec.stage_steps < s.shadow_steps:
            return
        if rec.shadow_pairs:  # paired (`report_shadow`): the same steps' batches with the seed ablated
            observed, baseline = [w for w, _ in rec.shadow_pairs], [h for _, h in rec.shadow_pairs]
        else:  # unpaired: the host's own losses while the seed trained, on earlier batches
            observed, baseline = list(rec.shadow_losses), list(rec.baseline_losses)[-s.shadow_steps:]
        g4 = gate_g4_system_impact(performance_status=rec.performance_status, baseline_loss=_mean(baseline),
                                   observed_loss=_mean(observed), regression_tolerance=s.regression_tolerance)
        if self._gate(rec, g4, "gate_g4", baseline="paired" if rec.shadow_pairs else "training_stage",
                      steps=len(observed)):
            self._enter(rec, PROBATIONARY, "gate_g4")

    def _step_probation(self, rec: SeedRecord, stats: SlotStepStats, loss: float | None) -> None:
        self._verdict(rec)

    def _alpha(self, rec: SeedRecord, step: int) -> float:
        return rec.schedule.value(step) if rec.schedule is not None else 1.0

    def _verdict(self, rec: SeedRecord) -> None:
        s = self.settings
        if rec.stage_steps < s.probation_steps:
            return
        if len(rec.evidence) < s.min_evidence:
            if rec.stage_steps >= s.probation_steps + s.evidence_grace_steps:
                self._emit("seed_verdict", _WARNING, "no evidence reported", seed_id=rec.seed_id, verdict="cull",
                           evidence=len(rec.evidence))
                self._cull(rec, "no_evidence")
            return
        improvement = _mean(rec.evidence)
        benefit = improvement is not None and improvement > s.min_improvement
        self._emit("seed_verdict", _INFO, seed_id=rec.seed_id, verdict="fossilize" if benefit else "cull",
                   improvement=f"{improvement:.6g}", evidence=len(rec.evidence))
        if benefit:
            self._fossilize(rec, "evidence_of_benefit")
        else:
            self._cull(rec, "no_benefit")

    def _enter(self, rec: SeedRecord, stage: int, reason: str) -> None:
        self._transition(rec, stage, reason)
        rec.stage_steps = 0

    def _gate(self, rec: SeedRecord, result: GateResult, cull_reason: str, **attributes: object) -> bool:
        """Pass or cull; `attributes` go on the gate's event either way (what it was judged on)."""
        if result.passed:
            self._gate_passed(rec, result, **attributes)
            return True
        self._cull(rec, cull_reason, gate=result, **attributes)
        return False

    # -- terminal moves ----------------------------------------------------------------------------

    def _cull(self, rec: SeedRecord, reason: str, *, gate: GateResult | None = None, **gate_attributes: object) -> None:
        """Remove the seed now (slot back to identity, its optimizer state dropped) → CULLED.
        ``gate_attributes`` go on the ``gate_failure`` event."""
        if gate is not None:
            self._gate_failure(rec, gate, **gate_attributes)
        rec.slot.detach_seed()
        removed = remove_seed_params(self.optimizer, rec.seed_id) if self.optimizer is not None else 0
        blueprint = rec.blueprint_id
        rec.clear_seed()
        self._transition(rec, CULLED, reason)
        self._emit("seed_culled", _WARNING if gate is not None else _INFO, reason, seed_id=rec.seed_id,
                   reason=reason, blueprint_id=blueprint, optimizer_params_removed=removed)

    def _fossilize(self, rec: SeedRecord, reason: str) -> None:
        alpha = rec.schedule.alpha_end if rec.schedule is not None else 1.0
        rec.slot.fossilize(alpha)
        if self.optimizer is not None:
            mark_fossil(self.optimizer, rec.seed_id)
        self._transition(rec, FOSSILIZED, reason)
        self._emit("seed_fossilized", _INFO, reason, seed_id=rec.seed_id, blueprint_id=rec.blueprint_id,
                   improvement=f"{_mean(rec.evidence) or 0.0:.6g}")

    def _reset(self, rec: SeedRecord) -> None:
        g5 = gate_g5_reset(kernel_attached=rec.kernel_attached,
                           optimizer_params_left=seed_param_count(self.optimizer, rec.seed_id)
                           if self.optimizer is not None else 0,
                           hooks_left=rec.slot.hooks)
        if g5.passed:
            self._gate_passed(rec, g5)
            self._transition(rec, DORMANT, "gate_g5")
            self._emit("rollback_ready", _INFO, "slot is dormant again", seed_id=rec.seed_id)
        else:
            self._gate_failure(rec, g5)
            self._transition(rec, TERMINATED, "gate_g5_failed")

    def shadowing(self) -> list[str]:
        """The seeds in SHADOWING: for each, the trainer measures the step's loss with the seed ablated, on
        the same batch and weights (`report_shadow`), so that G4 compares the host with and without it."""
        return [r.seed_id for r in self._records.values() if r.stage == SHADOWING and not r.paused_steps]

    def report_shadow(self, seed_id: str, *, loss_without: float) -> bool:
        """This step's task loss with `seed_id` ablated (call before `advance`, whose `loss` is the same
        batch's with it). Without these reports G4 compares against the host's losses of the TRAINING
        stage, taken earlier on other batches: harder data then reads as the seed's harm, easier as its
        benefit. False (ignored) outside SHADOWING."""
        rec = self._record(seed_id)
        if rec.stage != SHADOWING:
            return False
        rec.shadow_pending = loss_without
        return True

    def active_slots(self) -> list[str]:
        """The host slots whose seed is active (germinated to probation; not fossils): what `cull_all` empties."""
        return [r.slot.layer for r in self._records.values() if r.stage in ACTIVE_STAGES]

    def cull_all(self, reason: str = "rollback") -> list[str]:
        """Cull every active seed now (e.g. before the trainer restores a checkpoint taken without
        them); fossils stay, they are host. Returns the culled seed ids."""
        culled = [r.seed_id for r in self._records.values() if r.stage in ACTIVE_STAGES]
        for seed_id in culled:
            self._cull(self._records[seed_id], reason)
        return culled

    def retire(self, seed_id: str) -> None:
        """Take a DORMANT or FOSSILIZED slot out of service for good (→ TERMINATED)."""
        self._transition(self._record(seed_id), TERMINATED, "retired")

    # -- evidence, status, ablation ----------------------------------------------------------------

    def report_evidence(self, seed_id: str, *, loss_with: float, loss_without: float) -> bool:
        """A validation measurement of a PROBATIONARY seed: the loss with it and with it ablated (see
        ``ablated``). A non-finite ``loss_with`` counts as harm. False (ignored) in any other stage."""
        rec = self._record(seed_id)
        if rec.stage != PROBATIONARY or not math.isfinite(loss_without):
            return False
        rec.evidence.append(loss_without - loss_with if math.isfinite(loss_with) else -math.inf)
        return True

    def breaker_transition(self, name: str, old: int, new: int) -> None:
        """``on_transition`` for the kernel-fetch breaker (the prototype's ``breaker_event``). An open
        breaker is a WARNING: every germination fails fast (``breaker_open``) until it probes again.
        Called on the fetch's thread, so it only appends to the event queue."""
        old_name, new_name = enum_name(pb.CircuitBreakerState, old), enum_name(pb.CircuitBreakerState, new)
        self._emit("breaker_event", _WARNING if new == pb.CIRCUIT_STATE_OPEN else _INFO,
                   f"{name}: {old_name} -> {new_name}", breaker=name, from_state=old_name, to_state=new_name)

    def set_performance_status(self, seed_id: str, status: str) -> None:
        """Report a seed's runtime status; ``fallback`` fails G4 at the next step (terminal)."""
        self._record(seed_id).performance_status = status.strip().lower()

    @contextmanager
    def ablated(self, seed_id: str | None = None) -> Iterator[None]:
        """Within the block, the named seed's slot (all slots if None) returns the host activations."""
        slots = [self._record(seed_id).slot] if seed_id is not None else [r.slot for r in self._records.values()]
        previous = [s.bypass for s in slots]
        for s in slots:
            s.bypass = True
        try:
            yield
        finally:
            for s, was in zip(slots, previous, strict=True):
                s.bypass = was

    # -- telemetry and export ----------------------------------------------------------------------

    def _emit(self, name: str, level: int, description: str = "", **attributes: object) -> None:
        if len(self._events) == self._events.maxlen:
            self._events_dropped += 1
        self._events.append(build_event(name, level=level, description=description, **attributes))

    def _transition(self, rec: SeedRecord, stage: int, reason: str) -> None:
        t = rec.lifecycle.transition(stage, step=self._step, epoch=self._epoch, reason=reason)
        self._emit("seed_stage", _INFO, f"{stage_name(t.from_stage)} -> {stage_name(t.to_stage)}",
                   seed_id=rec.seed_id, from_stage=stage_name(t.from_stage), to_stage=stage_name(t.to_stage),
                   step=t.step, epoch=t.epoch, reason=reason)

    def _gate_passed(self, rec: SeedRecord, result: GateResult, **attributes: object) -> None:
        self._emit("gate_event", _INFO, f"{result.name} passed", seed_id=rec.seed_id, gate=result.name, passed=True,
                   **attributes)

    def _gate_failure(self, rec: SeedRecord, result: GateResult, **attributes: object) -> None:
        self._emit("gate_failure", _ERROR, result.detail or result.reason, seed_id=rec.seed_id, gate=result.name,
                   reason=result.reason, stage=stage_name(rec.stage), step=self._step, **attributes)
        if result.reason == "mesh_coverage_missing":
            self._emit("mesh_coverage_missing", _WARNING, result.detail, seed_id=rec.seed_id, missing=result.detail)
        elif result.reason == "fallback_status_rejected":
            self._emit("fallback_status_rejected", _CRITICAL, result.detail, seed_id=rec.seed_id)

    def drain_events(self) -> list[pb.TelemetryEvent]:
        # popleft, not list() then clear(): the breaker's events are appended from the fetch's thread
        events: list[pb.TelemetryEvent] = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def _seed_group_lr(self, seed_id: str) -> float:
        group = seed_group(self.optimizer, seed_id) if self.optimizer is not None else None
        return float(group["lr"]) if group is not None and "lr" in group else 0.0

    @staticmethod
    def _applied_alpha(rec: SeedRecord) -> float:
        """The seed's weight in the slot's output: 0 unless the slot blends it (a TRAINING seed's output
        is the host's, whatever alpha the command asked for)."""
        slot = rec.slot
        return slot.spec.effective_alpha(slot.alpha) if slot.mode in ("blend", "fossil") else 0.0

    def seed_states(self) -> list[pb.SeedState]:
        """One ``SeedState`` per registered slot (dormant ones too: Tamiyo chooses among them)."""
        out = []
        for rec in self._records.values():
            spec = rec.spec
            attached = rec.kernel_attached
            metrics = {
                "alpha": self._applied_alpha(rec),
                "alpha_steps": float(rec.blend_step),
                "alpha_total_steps": float(rec.schedule.total_steps if rec.schedule else self.settings.blend_steps),
                "alpha_schedule_index": float(SCHEDULE_KINDS.index(spec.schedule)) if spec is not None else -1.0,
                "blend_mode_index": float(BLEND_MODES.index(spec.mode)) if spec is not None else -1.0,
                "blend_allowed": 1.0 if rec.allowed_blend else 0.0,
                "kernel_attached": 1.0 if attached else 0.0,
                "isolation_dot": rec.isolation.dot,
                "isolation_violations": float(rec.isolation_violations),
                "stage_steps": float(rec.stage_steps),
                "paused": 1.0 if rec.paused_steps > 0 else 0.0,
                "kernel_latency_ms": rec.kernel_latency_ms,
                "evidence_count": float(len(rec.evidence)),
            }
            improvement = _mean(rec.evidence)
            if improvement is not None and math.isfinite(improvement):  # what the verdict weighed (loss units)
                metrics["evidence_mean"] = improvement
            for mode in rec.allowed_blend:
                metrics[f"blend_method.{mode}"] = 1.0
            active = rec.stage in ACTIVE_STAGES or rec.stage == FOSSILIZED
            out.append(pb.SeedState(
                seed_id=rec.seed_id, stage=pb.SeedLifecycleStage.ValueType(rec.stage), gradient_norm=rec.grad_norm,
                learning_rate=self._seed_group_lr(rec.seed_id), layer_depth=rec.depth, metrics=metrics,
                age_epochs=max(0, self._epoch - rec.germinated_epoch) if active else 0, risk_score=rec.risk,
            ))
        return out

    def metrics(self) -> list[pb.MetricPoint]:
        """Per-seed (``kasmina.seed.*``, attribute ``seed_id``) and global (``kasmina.*``) metrics."""
        points: list[pb.MetricPoint] = []
        for rec in self._records.values():
            sid = rec.seed_id
            points += [
                build_metric("kasmina.seed.stage", float(rec.stage), seed_id=sid),
                build_metric("kasmina.seed.alpha", self._applied_alpha(rec), seed_id=sid),
                build_metric("kasmina.seed.alpha_steps", float(rec.blend_step), seed_id=sid),
                build_metric("kasmina.seed.kernel_attached", 1.0 if rec.kernel_attached else 0.0, seed_id=sid),
                build_metric("kasmina.seed.last_kernel_latency_ms", rec.kernel_latency_ms, unit="ms", seed_id=sid),
                build_metric("kasmina.seed.isolation_violations", float(rec.isolation_violations), seed_id=sid),
                build_metric("kasmina.seed.isolation.dot", rec.isolation.dot, seed_id=sid),
                build_metric("kasmina.seed.isolation.host_norm", rec.isolation.host_norm, seed_id=sid),
                build_metric("kasmina.seed.isolation.seed_norm", rec.isolation.seed_norm, seed_id=sid),
                build_metric("kasmina.seed.gradient_norm", rec.grad_norm, seed_id=sid),
            ]
        records = self._records.values()
        points += [
            build_metric("kasmina.seeds.active", float(sum(r.stage in ACTIVE_STAGES for r in records))),
            build_metric("kasmina.seeds.fossilized", float(sum(r.stage == FOSSILIZED for r in records))),
            build_metric("kasmina.isolation.violations", float(self._isolation_violations)),
            build_metric("kasmina.commands.applied_total", float(self.commands_applied)),
            build_metric("kasmina.commands.for_trainer_total", float(self.commands_for_trainer)),
            build_metric("kasmina.commands.rejected_total", float(self.commands_rejected)),
            build_metric("kasmina.telemetry.events_dropped_total", float(self._events_dropped)),
        ]
        points += self._kernel_metrics()
        return points

    def _kernel_metrics(self) -> list[pb.MetricPoint]:
        stats = getattr(self.kernels, "stats", None)
        breaker = getattr(self.kernels, "breaker", None)
        points = []
        if stats is not None:
            points += [
                build_metric("kasmina.kernel.fetch_latency_ms", float(stats.last_latency_ms), unit="ms"),
                build_metric("kasmina.cache.hits", float(stats.cache_hits)),
                build_metric("kasmina.cache.misses", float(stats.cache_misses)),
                build_metric("kasmina.kernel.errors", float(stats.errors)),
            ]
        if breaker is not None:
            points.append(build_metric("kasmina.breaker.state", float(breaker.state)))
        return points

    def telemetry_packet(self) -> pb.TelemetryPacket:
        """A ``TelemetryPacket`` from ``kasmina`` with the drained events and current metrics."""
        return build_telemetry_packet(SOURCE, events=self.drain_events(), metrics=self.metrics())
