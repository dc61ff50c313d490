"""Snapshots copied beside the next step (`TOLARIA_ROLLBACK_SNAPSHOT_ASYNC`): the ring holds the state the
copy began with, whatever the forward, backward and the waiting update do; every entry point settles it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper.core.errors import ConfigurationError
from esper.leyline import pb
from esper.tolaria.copier import CopyResult, SnapshotCopier, _copy
from esper.tolaria.instruments import TolariaMetrics
from esper.tolaria.rollback import RollbackManager
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.state import capture_state, prepare_capture
from esper.tolaria.trainer import Trainer
from tests.tolaria._helpers import assert_same, make_model, make_optimizer, train_steps

BIG = 1 << 30


class SlowCopier(SnapshotCopier):
    """Starts each copy `delay_s` late, on the worker: an update that does not wait for it would land first."""

    def __init__(self, delay_s: float = 0.2) -> None:
        super().__init__()
        self.delay_s = delay_s

    def submit(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> concurrent.futures.Future[CopyResult]:
        return self._pool.submit(_late_copy, dst, src, self.delay_s)


def _late_copy(dst: list[torch.Tensor], src: list[torch.Tensor], delay_s: float) -> CopyResult:
    """A copy that takes `delay_s` longer, on the worker (the caller does not wait)."""
    t0 = time.perf_counter()
    time.sleep(delay_s)
    return dataclasses.replace(_copy(dst, src), seconds=time.perf_counter() - t0)


def _forward_backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(7)
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(16, 8, generator=gen)),
                                torch.randint(0, 3, (16,), generator=gen)).backward()


def test_the_copy_runs_on_the_worker_and_holds_the_state_it_began_with() -> None:
    model = make_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 3)
    before = capture_state(model, opt)
    mgr = RollbackManager(fast_cap_bytes=BIG, copier=SlowCopier())
    try:
        assert mgr.begin_snapshot(model, opt, step=3, epoch=1)
        assert len(mgr.ring) == 0  # in flight, not kept yet
        _forward_backward(model, opt)  # reads what is being copied, as the next step does
        assert mgr.settle()
        opt.step()
        assert mgr.last_copy is not None and mgr.last_copy.thread_id != threading.get_ident()
        assert mgr.ring.steps() == [3] and mgr.taken == 1
        assert_same(mgr.ring.get(3).state.model, before.model, "model")  # type: ignore[union-attr]
        assert_same(mgr.ring.get(3).state.optimizer, before.optimizer, "optimizer")  # type: ignore[union-attr]
        train_steps(model, opt, 2, seed=5)
        result = mgr.rollback(model, opt)
        assert (result.tier, result.step) == ("fast", 3)
        assert_same(capture_state(model, opt).model, before.model, "restored model")
        assert_same(capture_state(model, opt).optimizer, before.optimizer, "restored optimizer")
    finally:
        mgr.close()


def test_every_entry_point_settles_the_copy_in_flight() -> None:
    """`rollback` keeps the copy in flight first (it is the newest good state) and serves from it;
    `drop_snapshots` drops it with the rest; `snapshot` keeps it before its own copy."""
    model = make_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 2)
    at_2 = capture_state(model, opt)
    mgr = RollbackManager(fast_cap_bytes=BIG, copier=SlowCopier(0.05))
    try:
        mgr.begin_snapshot(model, opt, step=2, epoch=1)
        _forward_backward(model, opt)  # a failed step: gradients, no update
        result = mgr.rollback(model, opt)
        assert (result.tier, result.step) == ("fast", 2)
        assert_same(capture_state(model, opt).model, at_2.model)

        mgr.begin_snapshot(model, opt, step=3, epoch=1)
        mgr.drop_snapshots()
        assert len(mgr.ring) == 0 and mgr.settle() is False

        mgr.begin_snapshot(model, opt, step=4, epoch=1)
        assert mgr.snapshot(model, opt, step=5, epoch=1, force=True)
        assert mgr.ring.steps() == [4, 5]
    finally:
        mgr.close()


def test_buffers_are_copied_when_the_copy_begins() -> None:
    """BatchNorm's running statistics change in the forward pass that runs beside the copy: they are
    copied at once, so the snapshot holds the values of the step it is of."""
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, opt, 2)
    before = capture_state(model, opt)
    mgr = RollbackManager(fast_cap_bytes=BIG, copier=SlowCopier(0.5))
    try:
        mgr.begin_snapshot(model, opt, step=2, epoch=1)
        _forward_backward(model, opt)
        assert not torch.equal(model[1].running_mean, before.model["1.running_mean"])  # type: ignore[index]
        mgr.settle()
        assert_same(mgr.ring.get(2).state.model, before.model)  # type: ignore[union-attr]
    finally:
        mgr.close()


def test_a_state_not_on_the_cpu_is_not_prepared_for_the_copier() -> None:
    model = make_model().to("meta")
    assert prepare_capture(model, None) is None


def _budgeted(delay_s: float) -> tuple[nn.Module, torch.optim.Optimizer, RollbackManager]:
    """A trained model and a manager with a 50 % snapshot budget whose copies take `delay_s` longer."""
    model = make_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 1)
    return model, opt, RollbackManager(fast_cap_bytes=BIG, copier=SlowCopier(delay_s), snapshot_overhead=0.5,
                                       snapshot_max_steps=100)


def test_the_budget_charges_the_copy_wherever_it_ran() -> None:
    model, opt, mgr = _budgeted(0.05)
    try:
        mgr.begin_snapshot(model, opt, step=1, epoch=1)
        time.sleep(0.06)  # the step's forward and backward: the copy finishes meanwhile, nothing to wait for
        t0 = time.perf_counter()
        mgr.settle()
        mgr.record_training(0.06 + time.perf_counter() - t0)
        assert mgr.last_copy is not None and mgr.last_copy.seconds >= 0.05
        assert not mgr.due(2)  # 50 % of 0.06 s trained does not pay for a copy of >= 0.05 s
        mgr.record_training(1.0)
        assert mgr.due(3)
    finally:
        mgr.close()


def _settings(tmp_path: Path, **kw: object) -> TolariaSettings:
    """A tiny host whose state is handed to the copier all the same (`rollback_async_min_mb` 0)."""
    return TolariaSettings(**{"var_dir": tmp_path / "v", "epochs": 1, "hidden_width": 8, "metrics_port": -1,
                              "rollback_snapshot_overhead": 0.0, "rollback_async_min_mb": 0.0, **kw})


def _steps(trainer: Trainer, first: int, last: int) -> None:
    x, y = trainer.data.x_train, trainer.data.y_train
    for i in range(first, last + 1):
        trainer.train_step(x[32 * (i - 1):32 * i], y[32 * (i - 1):32 * i])


def test_the_trainer_waits_for_the_copy_before_its_update(tmp_path: Path) -> None:
    """A copy started at a step's start and still running when the update comes: the update waits, so
    the snapshot is of the weights before it. The run's first snapshot (an empty ring) is in line."""
    trainer = Trainer(_settings(tmp_path), bus=None)
    trainer.rollback.copier = SlowCopier(0.1)
    try:
        _steps(trainer, 1, 1)
        assert trainer.rollback.ring.steps() == [1] and trainer.rollback.last_copy is None  # in line
        _steps(trainer, 2, 2)
        after_2 = capture_state(trainer.host, trainer.optimizer)
        assert trainer.rollback.ring.steps() == [1]  # step 2's is due ...
        _steps(trainer, 3, 3)  # ... and copied beside step 3's forward and backward
        assert trainer.rollback.ring.steps() == [1, 2] and trainer.rollback.last_copy is not None
        assert_same(trainer.rollback.ring.get(2).state.model, after_2.model)  # type: ignore[union-attr]
        assert_same(trainer.rollback.ring.get(2).state.optimizer, after_2.optimizer)  # type: ignore[union-attr]
    finally:
        trainer.close()


def test_a_rollback_at_the_boundary_takes_the_due_snapshot_first(tmp_path: Path) -> None:
    """Tamiyo's ROLLBACK between the step that found a snapshot due and the next: what an in-line copy
    would have restored (that step's state), not the snapshot before it."""
    trainer = Trainer(_settings(tmp_path), bus=None)
    try:
        _steps(trainer, 1, 3)
        after_3 = capture_state(trainer.host, trainer.optimizer)
        assert trainer.rollback.ring.steps() == [1, 2] and trainer._snapshot_due == (3, trainer.epoch)
        trainer._trainer_command(pb.AdaptationCommand(command_type=pb.COMMAND_ROLLBACK, command_id="c1"))
        assert trainer.stats.rollbacks == {"fast": 1} and trainer._applied_step == 3
        assert trainer.rollback.ring.steps() == [1, 2, 3] and trainer._snapshot_due is None
        assert_same(capture_state(trainer.host, trainer.optimizer).model, after_3.model)
    finally:
        trainer.close()


def test_settings_choose_the_copier(tmp_path: Path) -> None:
    inline = Trainer(_settings(tmp_path / "a", rollback_snapshot_async=False), bus=None)
    assert inline.rollback.copier is None
    _steps(inline, 1, 3)
    assert inline.rollback.ring.steps() == [1, 2, 3]  # copied in line at each step's end
    inline.close()
    small = Trainer(_settings(tmp_path / "c", rollback_async_min_mb=4.0), bus=None)  # the default: 4 MiB
    assert small.rollback.copier is not None and not small.rollback.copies_beside(small.host, small.optimizer)
    _steps(small, 1, 3)
    assert small.rollback.ring.steps() == [1, 2, 3] and small.rollback.last_copy is None  # too small to hand over
    small.close()
    core = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    pinned = Trainer(_settings(tmp_path / "b", rollback_copier_cores=[core]), bus=None)
    try:
        assert pinned.rollback.copier is not None and pinned.rollback.copier.cores == {core}
        _steps(pinned, 1, 3)
        assert pinned.rollback.ring.steps() == [1, 2]  # 3's is due, copied beside the next step
        last = pinned.rollback.last_copy
        assert last is not None and last.thread_id != threading.get_ident()
        if last.cores is not None:
            assert last.cores == {core}
    finally:
        pinned.close()


def test_cores_are_checked_at_start(tmp_path: Path) -> None:
    """A core the copier may not run on failed mid-run: the worker's pinning raised, and the first copy
    handed over broke its step. Now numbers this machine lacks are refused by the settings, and a core
    the OS refuses by the copier as it starts (the trainer's start-up)."""
    beyond = (os.cpu_count() or 1) + 1
    for name in ("rollback_copier_cores", "decision_sidecar_cores"):
        with pytest.raises(ValueError, match=f"TOLARIA_{name.upper()}"):
            TolariaSettings(**{name: [beyond]})
        with pytest.raises(ValueError, match="non-empty"):
            TolariaSettings(**{name: []})
    if hasattr(os, "sched_getaffinity"):
        with pytest.raises(ConfigurationError, match="TOLARIA_ROLLBACK_COPIER_CORES"):
            SnapshotCopier({beyond + 4096})


def test_preparing_and_waiting_for_a_copy_is_not_training_time() -> None:
    """A slow copy waited for inside the step would otherwise count as training and buy itself budget."""
    model, opt, mgr = _budgeted(0.1)
    try:
        mgr.begin_snapshot(model, opt, step=1, epoch=1)
        t0 = time.perf_counter()
        mgr.settle()  # the step waits ~0.1 s for it
        mgr.record_training(time.perf_counter() - t0 + 0.01)  # that step's reported time: the wait and 10 ms
        assert mgr._trained_s < 0.05  # ~10 ms: the ~0.1 s wait is not in it
    finally:
        mgr.close()


def test_a_model_off_the_cpu_is_not_handed_over() -> None:
    mgr = RollbackManager(fast_cap_bytes=BIG, copier=SnapshotCopier())
    try:
        assert mgr.copies_beside(make_model(), None)
        assert not mgr.copies_beside(make_model().to("meta"), None)
    finally:
        mgr.close()


def test_dropping_the_snapshots_resets_the_gauges() -> None:
    registry = CollectorRegistry()
    mgr = RollbackManager(fast_cap_bytes=BIG, copier=SnapshotCopier(), metrics=TolariaMetrics(registry))
    model = make_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 1)
    try:
        mgr.begin_snapshot(model, opt, step=1, epoch=1)
        mgr.drop_snapshots()
        assert len(mgr.ring) == 0
        assert registry.get_sample_value("tolaria_rollback_snapshot_count") == 0.0
        assert registry.get_sample_value("tolaria_rollback_snapshot_bytes") == 0.0
    finally:
        mgr.close()


@pytest.mark.parametrize("async_copy", [True, False])
def test_both_ways_restore_the_same_state(tmp_path: Path, async_copy: bool) -> None:
    trainer = Trainer(_settings(tmp_path, rollback_snapshot_async=async_copy), bus=None)
    x, y = trainer.data.x_train, trainer.data.y_train
    try:
        _steps(trainer, 1, 3)
        at_3 = capture_state(trainer.host, trainer.optimizer)
        bad = x[96:128].clone()
        bad[0, 0] = float("nan")
        trainer.train_step(bad, y[96:128])
        assert trainer.stats.rollbacks == {"fast": 1} and trainer._applied_step == 3
        assert_same(capture_state(trainer.host, trainer.optimizer).model, at_3.model)
    finally:
        trainer.close()


def test_a_step_already_copied_in_line_is_not_copied_again(tmp_path: Path) -> None:
    """A command at the boundary that changed the structure has the step copied in line at once
    (`_snapshot_if_restructured`); the due copy of the same step is then not made a second time."""
    trainer = Trainer(_settings(tmp_path), bus=None)
    try:
        _steps(trainer, 1, 3)
        assert trainer._snapshot_due == (3, trainer.epoch)
        trainer.rollback.snapshot(trainer.host, trainer.optimizer, step=3, epoch=trainer.epoch, force=True)
        taken = trainer.rollback.taken
        trainer._begin_snapshot()
        assert trainer.rollback.settle() is False and trainer.rollback.taken == taken
    finally:
        trainer.close()


def test_a_refused_steps_wait_is_not_taken_from_the_next_step(tmp_path: Path) -> None:
    """The wait for a copy in flight when a step is refused is that step's, and it trained nothing."""
    trainer = Trainer(_settings(tmp_path), bus=None)
    trainer.rollback.copier = SlowCopier(0.2)
    try:
        _steps(trainer, 1, 2)
        x, y = trainer.data.x_train[64:96].clone(), trainer.data.y_train[64:96]
        x[0, 0] = float("nan")
        trainer.train_step(x, y)  # copies step 2 beside it, waits for it, is refused
        assert trainer.stats.step_failures == {"non_finite": 1} and trainer.rollback.last_copy is not None
        assert trainer.rollback._own_s == 0.0
    finally:
        trainer.close()


def _ptrs(state: object) -> set[int]:
    if isinstance(state, torch.Tensor):
        return {state.data_ptr()} if state.dim() else set()
    if isinstance(state, dict):
        return set().union(*(_ptrs(v) for v in state.values())) if state else set()
    if isinstance(state, list | tuple):
        return set().union(*(_ptrs(v) for v in state)) if state else set()
    return set()


def test_a_full_ring_copies_into_the_evicted_snapshots_memory() -> None:
    """Fresh allocations beside the step moved the heap under the step's own tensors (page faults on
    the training thread); a full ring now fills the snapshot it evicts, and the copy is still exact."""
    model = make_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 1)
    size = capture_state(model, opt).nbytes
    mgr = RollbackManager(fast_cap_bytes=2 * size, copier=SnapshotCopier())
    try:
        lent: set[int] = set()
        for step in (1, 2):
            mgr.begin_snapshot(model, opt, step=step, epoch=1)
            mgr.settle()
            if step == 1:  # read before step 2 is kept: `get` counts as use, and step 1 must stay the oldest
                oldest = mgr.ring.get(1)
                assert oldest is not None
                lent = _ptrs(oldest.state.model) | _ptrs(oldest.state.optimizer)
                del oldest
            train_steps(model, opt, 1, seed=step)
        at_3 = capture_state(model, opt)
        mgr.begin_snapshot(model, opt, step=3, epoch=1)
        mgr.settle()
        assert mgr.ring.steps() == [2, 3] and mgr.ring.evictions == 1
        third = mgr.ring.get(3)
        assert third is not None
        assert _ptrs(third.state.model) | _ptrs(third.state.optimizer) == lent  # the same memory, filled again
        assert_same(third.state.model, at_3.model)
        assert_same(third.state.optimizer, at_3.optimizer)
    finally:
        mgr.close()


def test_an_evicted_snapshot_of_another_structure_lends_nothing() -> None:
    small, big = make_model(hidden=(6, 5)), make_model(hidden=(7, 5))
    opt_small, opt_big = make_optimizer(small), make_optimizer(big)
    train_steps(small, opt_small, 1)
    train_steps(big, opt_big, 1)
    mgr = RollbackManager(fast_cap_bytes=capture_state(big, opt_big).nbytes, copier=SnapshotCopier())
    try:
        mgr.begin_snapshot(small, opt_small, step=1, epoch=1)
        mgr.settle()
        at_2 = capture_state(big, opt_big)
        mgr.begin_snapshot(big, opt_big, step=2, epoch=1)  # evicts step 1, whose shapes differ
        mgr.settle()
        assert mgr.ring.steps() == [2]
        assert_same(mgr.ring.get(2).state.model, at_2.model)  # type: ignore[union-attr]
        assert_same(mgr.ring.get(2).state.optimizer, at_2.optimizer)  # type: ignore[union-attr]
    finally:
        mgr.close()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_a_prepared_capture_once_filled_is_what_capture_state_takes(kind: str) -> None:
    model = make_model()
    opt = make_optimizer(model, kind)
    train_steps(model, opt, 2)
    prepared = prepare_capture(model, opt)
    assert prepared is not None
    state, dst, src = prepared
    _copy(dst, src)
    whole = capture_state(model, opt)
    assert state.nbytes == whole.nbytes
    assert_same(state.model, whole.model, "model")
    assert_same(state.optimizer, whole.optimizer, "optimizer")
