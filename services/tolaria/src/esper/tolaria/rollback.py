"""Two-tier rollback: an in-memory snapshot ring first, a verified checkpoint second, under one deadline.

Fast tier: `SnapshotRing` keeps deep-copied CPU `TrainingState`s (model + optimizer) keyed by step,
least recently used evicted first, capped by *bytes* (TOLARIA_ROLLBACK_FAST_CAP_MB). The trainer
calls `RollbackManager.snapshot()` after each step; it copies every TOLARIA_ROLLBACK_SNAPSHOT_STEPS
steps, unless copying would cost more than TOLARIA_ROLLBACK_SNAPSHOT_OVERHEAD of the training time:
a due copy is then deferred until the time trained since the last one is at least its cost divided
by that fraction, but never past TOLARIA_ROLLBACK_SNAPSHOT_MAX_STEPS steps (and never while the ring
is empty). "Time trained" is what the trainer reports step by step (`record_training`): validation,
checkpoints and anything else between steps do not pay for copies (on the wall clock they did).
Guarantee: the newest snapshot is at most max(SNAPSHOT_STEPS, SNAPSHOT_MAX_STEPS) steps behind the
live state; a fast rollback loses at most that much progress. Overhead 0 restores the
plain every-N-steps cadence. A state bigger than the whole cap is not kept (counted): that run rolls
back from checkpoints. Its size is read off the live tensors before anything is copied, and after such
a refusal the next attempt waits SNAPSHOT_MAX_STEPS steps: an empty ring is otherwise always due, and a
model outgrowing the cap (a wide host on a GPU) would pay a full copy every step only to drop it.

Copies beside the next step (`TOLARIA_ROLLBACK_SNAPSHOT_ASYNC`, on by default; `copier.py`): the
trainer decides at the end of a step that a snapshot is due, starts its copy (`begin_snapshot`) at the
next step's start, once that boundary's commands are applied, and `settle()`s it before the update.
Forward and backward only read what is copied; buffers, which the forward writes, are copied at the
start. Every other entry point (`snapshot`, `rollback`, `drop_snapshots`) settles a copy in flight
first, so the ring never holds a half-copied state. A CUDA state is copied at once (`capture_state`).

Checkpoint tier: when no snapshot qualifies (none at or before the target step, evicted, too large,
or it no longer fits the model because its architecture changed) the newest retained checkpoint at
or before the target is verified and loaded (broken ones are passed over and reported).

Deadline (TOLARIA_ROLLBACK_DEADLINE_MS) covers the whole call and is checked at tier boundaries:
before the checkpoint tier starts (a miss there restores nothing) and when the restore finishes (a
miss there *has* restored the state, `restored=True`). A tier is never aborted halfway, and a state
is validated against the live model and optimizer before anything is written, so the model is
always either untouched or fully restored. A miss raises `RollbackDeadlineExceeded`; the trainer
escalates to HALT when TOLARIA_EMERGENCY_L4_ON_ROLLBACK_DEADLINE is set. The clock is injectable.

After a restore, snapshots newer than the restored step are dropped: they belong to the abandoned
trajectory. Rolling back architecture (seeds grafted after the snapshot) is Kasmina's job; until the
model is rebuilt, such a state is a `state_mismatch`.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from esper.core.errors import DeadlineExceededError, EsperError
from esper.tolaria.checkpoint import CheckpointError, CheckpointStore
from esper.tolaria.copier import CopyResult, SnapshotCopier
from esper.tolaria.instruments import TolariaMetrics
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.state import (
    StateMismatchError,
    TrainingState,
    capture_state,
    live_nbytes,
    prepare_capture,
    restore_state,
)

__all__ = [
    "RollbackDeadlineExceeded",
    "RollbackError",
    "RollbackManager",
    "RollbackResult",
    "RollbackTier",
    "Snapshot",
    "SnapshotRing",
]

RollbackTier = Literal["fast", "checkpoint"]
RollbackErrorReason = Literal["unavailable", "state_mismatch", "deadline"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    step: int
    epoch: int
    state: TrainingState


class SnapshotRing:
    """Snapshots by step, least recently used (taken or restored) evicted first, total bytes <= `cap_bytes`."""

    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes < 0:
            raise ValueError(f"cap_bytes must be >= 0, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        self._items: OrderedDict[int, Snapshot] = OrderedDict()
        self._nbytes = 0
        self.evictions = 0
        self.rejected = 0  # states bigger than the whole cap

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, step: object) -> bool:
        return step in self._items

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def steps(self) -> list[int]:
        return sorted(self._items)

    def put(self, snap: Snapshot) -> list[int]:
        """Keep `snap` (replacing one of the same step); returns the evicted steps. A state larger
        than the cap is not kept (`rejected` counts it) and evicts nothing."""
        if snap.state.nbytes > self.cap_bytes:
            self.rejected += 1
            return []
        self._remove(snap.step)
        evicted: list[int] = []
        while self._items and self._nbytes + snap.state.nbytes > self.cap_bytes:
            old_step, old = self._items.popitem(last=False)
            self._nbytes -= old.state.nbytes
            evicted.append(old_step)
        self.evictions += len(evicted)
        self._items[snap.step] = snap
        self._nbytes += snap.state.nbytes
        return evicted

    def make_room(self, nbytes: int) -> list[Snapshot]:
        """Evict now, least recently used first, what keeping a state of `nbytes` would evict; returns
        them (their memory may be filled again: `prepare_capture(reuse=)`)."""
        out: list[Snapshot] = []
        while self._items and nbytes <= self.cap_bytes and self._nbytes + nbytes > self.cap_bytes:
            _, old = self._items.popitem(last=False)
            self._nbytes -= old.state.nbytes
            out.append(old)
        self.evictions += len(out)
        return out

    def get(self, at_or_before: int | None = None) -> Snapshot | None:
        """The newest snapshot with step <= `at_or_before` (the newest of all if None); marks it used."""
        candidates = [s for s in self._items if at_or_before is None or s <= at_or_before]
        if not candidates:
            return None
        step = max(candidates)
        self._items.move_to_end(step)
        return self._items[step]

    def discard_after(self, step: int) -> int:
        """Drop snapshots newer than `step`; returns how many."""
        newer = [s for s in self._items if s > step]
        for s in newer:
            self._remove(s)
        return len(newer)

    def clear(self) -> None:
        self._items.clear()
        self._nbytes = 0

    def _remove(self, step: int) -> None:
        old = self._items.pop(step, None)
        if old is not None:
            self._nbytes -= old.state.nbytes


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A snapshot whose tensors the copier is still filling."""

    step: int
    epoch: int
    state: TrainingState
    copy: concurrent.futures.Future[CopyResult]
    prepare_s: float


@dataclass(frozen=True, slots=True)
class RollbackResult:
    """What a rollback restored and how: serving tier, restored step/epoch, time taken vs the deadline."""

    tier: RollbackTier
    step: int
    epoch: int
    elapsed_ms: float
    deadline_ms: float
    fast_miss: str | None = None  # why the fast tier did not serve (None when it did)
    skipped_checkpoints: tuple[CheckpointError, ...] = ()  # passed over as broken (the trainer reports each)


class RollbackError(EsperError):
    """Nothing was restored (`restored` False) or, for deadline misses, maybe it was; `reason` says why.
    `skipped`: broken checkpoints passed over before the failure (the trainer reports each)."""

    def __init__(self, reason: RollbackErrorReason, detail: str, *, elapsed_ms: float = 0.0,
                 restored: bool = False, skipped: tuple[CheckpointError, ...] = ()) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RollbackErrorReason = reason
        self.detail = detail
        self.elapsed_ms = elapsed_ms
        self.restored = restored
        self.skipped = skipped


class RollbackDeadlineExceeded(RollbackError, DeadlineExceededError):
    """The rollback ran past its deadline. `result` is set when the state *was* restored (late)."""

    def __init__(self, detail: str, *, elapsed_ms: float, deadline_ms: float, tier: RollbackTier | None,
                 result: RollbackResult | None) -> None:
        super().__init__("deadline", detail, elapsed_ms=elapsed_ms, restored=result is not None)
        self.deadline_ms = deadline_ms
        self.tier = tier
        self.result = result


class RollbackManager:
    """Snapshots every N steps and rolls back fast tier first, checkpoint tier second (module docstring)."""

    def __init__(self, *, fast_cap_bytes: int, snapshot_every_steps: int = 1, deadline_ms: float = 250.0,
                 checkpoints: CheckpointStore | None = None, clock: Callable[[], float] = time.perf_counter,
                 metrics: TolariaMetrics | None = None, snapshot_overhead: float = 0.0,
                 snapshot_max_steps: int = 1, copier: SnapshotCopier | None = None,
                 async_min_bytes: int = 0) -> None:
        """`snapshot_overhead` (fraction of training time, 0 = off) and `snapshot_max_steps` set the
        adaptive cadence (module docstring); `clock` times both the deadline and the snapshot cost.
        `copier`: `begin_snapshot` copies there, beside the caller's next forward and backward, states of
        at least `async_min_bytes` (a smaller one costs less to copy than to hand over)."""
        if snapshot_every_steps < 1:
            raise ValueError(f"snapshot_every_steps must be >= 1, got {snapshot_every_steps}")
        if not 0.0 <= snapshot_overhead < 1.0:
            raise ValueError(f"snapshot_overhead must be in [0, 1), got {snapshot_overhead}")
        if snapshot_max_steps < 1:
            raise ValueError(f"snapshot_max_steps must be >= 1, got {snapshot_max_steps}")
        self.snapshot_overhead = snapshot_overhead
        self.snapshot_max_steps = snapshot_max_steps
        self._last_step: int | None = None  # step of the last snapshot taken (kept or not)
        self._trained_s = 0.0  # training time reported since then (`record_training`)
        self._last_cost = 0.0  # seconds it took
        self.deferred = 0  # due snapshots deferred by the overhead budget
        self.taken = 0  # snapshots copied (each one kept: an oversize state is refused before copying)
        self._too_big = False  # the last attempt was refused, uncopied, as larger than the ring
        if deadline_ms < 0:
            raise ValueError(f"deadline_ms must be >= 0, got {deadline_ms}")
        self.ring = SnapshotRing(fast_cap_bytes)
        self.snapshot_every_steps = snapshot_every_steps
        self.deadline_ms = deadline_ms
        self.checkpoints = checkpoints
        self._clock = clock
        self.metrics = metrics
        self.copier = copier
        self.async_min_bytes = async_min_bytes
        self._own_s = 0.0  # time spent preparing and waiting for copies since the last `record_training`
        self._inflight: _InFlight | None = None
        self.last_copy: CopyResult | None = None  # the copier's last copy: where and how long

    @classmethod
    def from_settings(cls, settings: TolariaSettings, *, checkpoints: CheckpointStore | None,
                      metrics: TolariaMetrics | None = None) -> RollbackManager:
        return cls(fast_cap_bytes=settings.rollback_fast_cap_bytes,
                   snapshot_every_steps=settings.rollback_snapshot_steps, deadline_ms=settings.rollback_deadline_ms,
                   checkpoints=checkpoints, metrics=metrics, snapshot_overhead=settings.rollback_snapshot_overhead,
                   snapshot_max_steps=settings.rollback_snapshot_max_steps,
                   copier=SnapshotCopier(set(settings.rollback_copier_cores) if settings.rollback_copier_cores
                                         else None) if settings.rollback_snapshot_async else None,
                   async_min_bytes=settings.rollback_async_min_bytes)

    # -- snapshots ---------------------------------------------------------------------------------

    def record_training(self, seconds: float) -> None:
        """Training time since the last call (the trainer: each step's forward, backward and update).
        What a copy beside the step cost the caller in it (preparing it, waiting for it) is not training:
        it is taken out, or a slow copy would buy itself budget."""
        self._trained_s += max(0.0, seconds - self._own_s)
        self._own_s = 0.0

    def due(self, step: int) -> bool:
        """Every `snapshot_every_steps` steps; with an overhead budget, only once the time since the last
        snapshot pays for its cost (or `snapshot_max_steps` have passed, or the ring is empty)."""
        if step % self.snapshot_every_steps != 0:
            return False
        if self._too_big and self._last_step is not None and 0 <= step - self._last_step < self.snapshot_max_steps:
            return False
        if self.snapshot_overhead <= 0.0 or self._last_step is None or not len(self.ring):
            return True
        if step - self._last_step >= self.snapshot_max_steps or step < self._last_step:
            return True
        if self._last_cost <= self.snapshot_overhead * self._trained_s:
            return True
        self.deferred += 1
        return False

    def snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int, epoch: int,
                 force: bool = False) -> bool:
        """Copy the state after `step` into the ring when due (or `force`); True when it was kept."""
        if not (force or self.due(step)):
            return False
        self.settle()
        t0 = self._clock()
        if self._refused(live_nbytes(model, optimizer), step):
            return False
        self._keep(Snapshot(step, epoch, capture_state(model, optimizer)))
        self._last_step, self._trained_s = step, 0.0
        self._last_cost = self._clock() - t0
        return True

    def begin_snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int,
                       epoch: int) -> bool:
        """Start a snapshot of the state after `step` on the copier (no `due` check: the caller asked)
        and return; `settle()` keeps it. Until then nothing may write the parameters or the optimizer's
        state: the trainer starts it before a forward and backward and settles it before the update.
        Without a copier, for a small state (`copies_beside`) or one not on the CPU, the copy is made now
        (`snapshot`). True when a copy was made or started."""
        t0 = self._clock()
        nbytes = live_nbytes(model, optimizer)
        copier = self.copier
        if copier is None or not self._beside(model, nbytes):
            return self.snapshot(model, optimizer, step=step, epoch=epoch, force=True)
        self.settle()
        if self._refused(nbytes, step):
            return False
        # The ring's oldest snapshot, which keeping this one would evict, lends it its memory (not for a
        # step already held: keeping this one replaces that, and evicts nothing more).
        evicted = [] if step in self.ring else self.ring.make_room(nbytes)
        if evicted and self.metrics is not None:
            self.metrics.snapshot_evictions.inc(len(evicted))
        prepared = prepare_capture(model, optimizer, reuse=evicted[0].state if evicted else None)
        if prepared is None:  # a buffer or optimizer state off the CPU: copied as a CUDA state is (capture_state)
            return self.snapshot(model, optimizer, step=step, epoch=epoch, force=True)
        state, dst, src = prepared
        prepare_s = self._clock() - t0
        self._own_s += prepare_s
        self._inflight = _InFlight(step, epoch, state, copier.submit(dst, src), prepare_s)
        self._last_step, self._trained_s = step, 0.0
        return True

    def copies_beside(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> bool:
        """Would `begin_snapshot` hand this state to the copier (a copier, a CPU model, a state of at least
        `async_min_bytes`)? Read off the live tensors, nothing copied."""
        return self._beside(model, live_nbytes(model, optimizer))

    def _beside(self, model: nn.Module, nbytes: int) -> bool:
        return (self.copier is not None and nbytes >= self.async_min_bytes
                and all(p.device.type == "cpu" for p in model.parameters()))

    def settle(self) -> bool:
        """Wait for the snapshot in flight, if any, and keep it; True if there was one. Its cost, for the
        budget, is what it took to prepare plus the copy's own duration, wherever it ran."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return False
        t0 = self._clock()
        try:
            copied = self.last_copy = inflight.copy.result()
        finally:
            self._own_s += self._clock() - t0
        self._keep(Snapshot(inflight.step, inflight.epoch, inflight.state))
        self._last_cost = inflight.prepare_s + copied.seconds
        return True

    def drop_snapshots(self) -> None:
        """Forget every snapshot, the one in flight too (the model's structure changed)."""
        try:
            self.settle()
        finally:
            self.ring.clear()
            if self.metrics is not None:
                self.metrics.snapshot_bytes.set(0)
                self.metrics.snapshot_count.set(0)

    def close(self) -> None:
        try:
            self.settle()
        finally:
            if self.copier is not None:
                self.copier.close()

    def _refused(self, nbytes: int, step: int) -> bool:
        """A state of `nbytes`, bigger than the whole ring, is not copied (counted)."""
        self._too_big = nbytes > self.ring.cap_bytes
        if self._too_big:
            self.ring.rejected += 1
            self._last_step, self._trained_s, self._last_cost = step, 0.0, 0.0
            if self.metrics is not None:
                self.metrics.snapshot_rejected.inc()
        return self._too_big

    def _keep(self, snap: Snapshot) -> None:
        # The size was checked against the cap, so the ring keeps this state (evicting older ones).
        evicted = self.ring.put(snap)
        self.taken += 1
        if self.metrics is not None:
            m = self.metrics
            m.snapshots.inc()
            m.snapshot_evictions.inc(len(evicted))
            m.snapshot_bytes.set(self.ring.nbytes)
            m.snapshot_count.set(len(self.ring))

    # -- rollback ----------------------------------------------------------------------------------

    def rollback(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 to_step: int | None = None,
                 on_mismatch: Callable[[TrainingState], bool] | None = None) -> RollbackResult:
        """Restore the newest state at or before `to_step` (newest of all if None), fast tier first.
        `on_mismatch`: called once, with the checkpoint's state, when it does not fit the model
        (seeds grafted since it was saved: the trainer culls them if that makes it fit); when it returns
        True the checkpoint already read is restored again, inside the same deadline.

        Raises RollbackDeadlineExceeded (maybe restored, see `.restored`/`.result`) or RollbackError
        ("unavailable": no snapshot and no usable checkpoint; "state_mismatch": none fits the model).
        """
        t0 = self._clock()
        self.settle()  # a copy in flight is of the last good state: kept first (inside the deadline), it may serve

        def elapsed_ms() -> float:
            return (self._clock() - t0) * 1000.0

        fast_miss: str
        snap = self.ring.get(to_step)
        if snap is None:
            fast_miss = "no_snapshot"
        else:
            try:
                restore_state(model, optimizer, snap.state)
            except StateMismatchError as e:
                fast_miss = f"state_mismatch: {e}"
            else:
                self.ring.discard_after(snap.step)
                return self._finish(RollbackResult("fast", snap.step, snap.epoch, elapsed_ms(), self.deadline_ms))

        spent = elapsed_ms()
        if spent > self.deadline_ms:
            self._count_miss()
            raise RollbackDeadlineExceeded(
                f"fast tier missed ({fast_miss}) after {spent:.2f} ms; no time left for a checkpoint restore "
                f"(deadline {self.deadline_ms} ms)", elapsed_ms=spent, deadline_ms=self.deadline_ms, tier=None,
                result=None)
        if self.checkpoints is None:
            raise self._fail("unavailable", f"fast tier missed ({fast_miss}) and no checkpoint store", spent)
        try:
            ckpt, skipped = self.checkpoints.load_at_or_before(to_step)
        except CheckpointError as e:
            raise self._fail("unavailable", f"fast tier missed ({fast_miss}); checkpoint tier: {e}",
                             elapsed_ms(), skipped=e.skipped) from e
        try:
            try:
                ckpt.restore(model, optimizer)
            except StateMismatchError:
                if on_mismatch is None or not on_mismatch(ckpt.training_state()):
                    raise
                ckpt.restore(model, optimizer)
        except StateMismatchError as e:
            raise self._fail("state_mismatch", f"fast tier missed ({fast_miss}); checkpoint {ckpt.info.file}: {e}",
                             elapsed_ms(), skipped=tuple(skipped)) from e
        self.ring.discard_after(ckpt.step)
        return self._finish(RollbackResult("checkpoint", ckpt.step, ckpt.epoch, elapsed_ms(), self.deadline_ms,
                                           fast_miss=fast_miss, skipped_checkpoints=tuple(skipped)))

    def _finish(self, result: RollbackResult) -> RollbackResult:
        if self.metrics is not None:
            self.metrics.rollbacks.labels(result.tier).inc()
            self.metrics.rollback_seconds.labels(result.tier).observe(result.elapsed_ms / 1000.0)
            self.metrics.snapshot_bytes.set(self.ring.nbytes)
            self.metrics.snapshot_count.set(len(self.ring))
        if result.elapsed_ms > self.deadline_ms:
            self._count_miss()
            raise RollbackDeadlineExceeded(
                f"{result.tier} tier restored step {result.step} in {result.elapsed_ms:.2f} ms, past the "
                f"{self.deadline_ms} ms deadline", elapsed_ms=result.elapsed_ms, deadline_ms=self.deadline_ms,
                tier=result.tier, result=result)
        return result

    def _count_miss(self) -> None:
        if self.metrics is not None:
            self.metrics.rollback_deadline_misses.inc()

    def _fail(self, reason: RollbackErrorReason, detail: str, spent_ms: float,
              skipped: tuple[CheckpointError, ...] = ()) -> RollbackError:
        if self.metrics is not None:
            self.metrics.rollback_failures.labels(reason).inc()
        return RollbackError(reason, detail, elapsed_ms=spent_ms, skipped=skipped)

