"""Rollback: bit-identical restores from both tiers, byte-capped LRU eviction, deadline misses reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from esper.tolaria.checkpoint import CheckpointError, CheckpointStore
from esper.tolaria.instruments import TolariaMetrics
from esper.tolaria.rollback import (
    RollbackDeadlineExceeded,
    RollbackError,
    RollbackManager,
    Snapshot,
    SnapshotRing,
)
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.state import StateMismatchError, TrainingState, capture_state, live_nbytes, restore_state
from tests.tolaria._helpers import assert_same, assert_state_equal, make_model, make_optimizer, train_steps

BIG = 1 << 30


class FakeClock:
    """Advances `tick` seconds on every read: the rollback's elapsed time is exact and machine-independent."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 100.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _reference_after(steps: int, kind: str = "adam") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = make_optimizer(model, kind)
    train_steps(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_fast_tier_restores_bit_identical_state_and_the_snapshot_stays_pristine(kind: str) -> None:
    model, opt = _reference_after(0, kind)
    mgr = RollbackManager(fast_cap_bytes=BIG, clock=FakeClock())
    train_steps(model, opt, 3)
    assert mgr.snapshot(model, opt, step=3, epoch=0)
    ref_model, ref_opt = _reference_after(3, kind)
    train_steps(model, opt, 4, seed=9)  # diverge
    result = mgr.rollback(model, opt)
    assert (result.tier, result.step, result.epoch, result.fast_miss) == ("fast", 3, 0, None)
    assert result.elapsed_ms == 0.0 and result.deadline_ms == 250.0
    assert_state_equal(model, opt, ref_model, ref_opt)
    # training from the restored state mutates live tensors, never the snapshot: a second rollback is exact too
    train_steps(model, opt, 2, seed=4)
    mgr.rollback(model, opt)
    assert_state_equal(model, opt, ref_model, ref_opt)


def test_rollback_to_a_step_picks_the_newest_snapshot_at_or_before_it_and_drops_newer_ones() -> None:
    model, opt = _reference_after(0)
    mgr = RollbackManager(fast_cap_bytes=BIG, snapshot_every_steps=2)
    states = {}
    for step in range(1, 7):
        train_steps(model, opt, 1, seed=step)
        if mgr.snapshot(model, opt, step=step, epoch=step // 3):
            states[step] = capture_state(model, opt)
    assert mgr.ring.steps() == [2, 4, 6] == sorted(states)
    result = mgr.rollback(model, opt, to_step=5)
    assert (result.tier, result.step, result.epoch) == ("fast", 4, 1)
    assert_same(dict(model.state_dict()), states[4].model)
    assert mgr.ring.steps() == [2, 4]  # 6 belonged to the abandoned trajectory


def test_ring_evicts_least_recently_used_by_bytes() -> None:
    model, opt = _reference_after(1)
    size = capture_state(model, opt).nbytes
    ring = SnapshotRing(cap_bytes=3 * size)
    for step in (1, 2, 3):
        assert ring.put(Snapshot(step, 0, capture_state(model, opt))) == []
    assert ring.nbytes == 3 * size
    assert ring.get(1) is not None  # use 1: now 2 is the least recently used
    assert ring.put(Snapshot(4, 0, capture_state(model, opt))) == [2]
    assert ring.steps() == [1, 3, 4] and ring.evictions == 1 and ring.nbytes == 3 * size
    assert ring.put(Snapshot(4, 0, capture_state(model, opt))) == []  # same step replaces, no eviction
    tiny = SnapshotRing(cap_bytes=size - 1)
    assert tiny.put(Snapshot(1, 0, capture_state(model, opt))) == [] and len(tiny) == 0 and tiny.rejected == 1


def test_manager_cap_counts_evictions_and_rejections_in_metrics() -> None:
    model, opt = _reference_after(1)
    size = capture_state(model, opt).nbytes
    metrics = TolariaMetrics(CollectorRegistry())
    mgr = RollbackManager(fast_cap_bytes=2 * size, metrics=metrics)
    for step in range(1, 6):
        assert mgr.snapshot(model, opt, step=step, epoch=0)
    assert mgr.ring.steps() == [4, 5]
    assert metrics.snapshot_evictions._value.get() == 3 and metrics.snapshot_bytes._value.get() == 2 * size
    too_small = RollbackManager(fast_cap_bytes=size // 2, metrics=metrics)
    assert not too_small.snapshot(model, opt, step=1, epoch=0)
    assert metrics.snapshot_rejected._value.get() == 1


def test_a_state_larger_than_the_ring_is_refused_uncopied_and_retried_only_after_max_steps() -> None:
    """An empty ring is always due; a model that outgrew the cap must not pay a full copy every step
    to have it dropped: the size is read off the live tensors, nothing is copied, and the next
    attempt waits `snapshot_max_steps` steps."""
    model, opt = _reference_after(1)
    size = capture_state(model, opt).nbytes
    assert live_nbytes(model, opt) == size
    metrics = TolariaMetrics(CollectorRegistry())
    mgr = RollbackManager(fast_cap_bytes=size - 1, metrics=metrics, snapshot_overhead=0.01, snapshot_max_steps=4)
    refused = [step for step in range(1, 10)
               if mgr.due(step) and not mgr.snapshot(model, opt, step=step, epoch=0, force=True)]
    assert refused == [1, 5, 9]
    assert mgr.taken == 0 and mgr.ring.rejected == 3 and metrics.snapshot_rejected._value.get() == 3
    mgr.ring.cap_bytes = BIG  # room again (a seed left, or the cap was raised): the next due attempt keeps it
    assert [mgr.snapshot(model, opt, step=s, epoch=0) for s in (10, 13)] == [False, True]
    assert mgr.taken == 1 and mgr.ring.steps() == [13]


def _store_with(tmp_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> CheckpointStore:
    store = CheckpointStore(tmp_path)
    store.save_training(model, opt, epoch=1, step=step)
    return store


def test_checkpoint_tier_serves_when_no_snapshot_fits_and_is_bit_identical(tmp_path: Path) -> None:
    model, opt = _reference_after(3)
    store = _store_with(tmp_path, model, opt, 3)
    ref_model, ref_opt = _reference_after(3)
    mgr = RollbackManager(fast_cap_bytes=16, checkpoints=store, clock=FakeClock())  # no snapshot fits 16 bytes
    assert not mgr.snapshot(model, opt, step=4, epoch=1)
    train_steps(model, opt, 5, seed=8)
    result = mgr.rollback(model, opt)
    assert (result.tier, result.step, result.epoch, result.fast_miss) == ("checkpoint", 3, 1, "no_snapshot")
    assert_state_equal(model, opt, ref_model, ref_opt)


def test_checkpoint_tier_serves_when_the_snapshot_no_longer_fits_the_model(tmp_path: Path) -> None:
    model, opt = _reference_after(2)
    store = _store_with(tmp_path, model, opt, 2)
    mgr = RollbackManager(fast_cap_bytes=BIG, checkpoints=store)
    model.set_slot("hidden1", torch.nn.Linear(6, 6))  # a seed grafted after the checkpoint...
    mgr.snapshot(model, opt, step=3, epoch=1)  # ...and before this snapshot
    model.clear_slot("hidden1")  # then culled: the snapshot has keys the model lacks
    result = mgr.rollback(model, opt)
    assert result.tier == "checkpoint" and result.fast_miss is not None
    assert result.fast_miss.startswith("state_mismatch")


def test_nothing_to_restore_is_a_typed_error_that_changes_nothing(tmp_path: Path) -> None:
    model, opt = _reference_after(2)
    before = capture_state(model, opt)
    with pytest.raises(RollbackError) as info:
        RollbackManager(fast_cap_bytes=BIG).rollback(model, opt)
    assert info.value.reason == "unavailable" and not info.value.restored
    with pytest.raises(RollbackError) as info:
        RollbackManager(fast_cap_bytes=BIG, checkpoints=CheckpointStore(tmp_path)).rollback(model, opt)
    assert info.value.reason == "unavailable" and "no checkpoint saved" in info.value.detail
    assert_same(before.model, dict(model.state_dict()))


def test_a_checkpoint_from_before_a_seed_is_restored_once_the_seed_is_dropped(tmp_path: Path) -> None:
    """`on_mismatch` (the trainer culls its seeds) runs once, and the checkpoint already read is
    restored again: one read, one deadline. Without it the mismatch is the typed error."""
    model, opt = _reference_after(2)
    store = _store_with(tmp_path, model, opt, 2)
    ref_model, ref_opt = _reference_after(2)
    model.set_slot("hidden1", torch.nn.Linear(6, 6))  # a seed grafted after the checkpoint
    train_steps(model, opt, 2, seed=9)
    with pytest.raises(RollbackError) as info:
        RollbackManager(fast_cap_bytes=BIG, checkpoints=store).rollback(model, opt)
    assert info.value.reason == "state_mismatch"
    dropped: list[str] = []

    def cull(saved: TrainingState) -> bool:
        assert set(saved.model) == set(ref_model.state_dict())  # the checkpoint's state, read once
        dropped.append("hidden1")
        model.clear_slot("hidden1")
        return True

    clock = FakeClock(tick=0.15)  # 150 ms a read: the restore lands past the 250 ms deadline, restored
    with pytest.raises(RollbackDeadlineExceeded) as late:
        RollbackManager(fast_cap_bytes=BIG, checkpoints=store, clock=clock).rollback(model, opt, on_mismatch=cull)
    assert dropped == ["hidden1"] and late.value.restored and late.value.tier == "checkpoint"
    assert_state_equal(model, opt, ref_model, ref_opt)


def _seeded(germinations: dict[str, str]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The reference host with a Linear seed in each named slot, added to Adam as Kasmina adds them."""
    from esper.kasmina import add_seed_params

    model, opt = _reference_after(1)
    for slot, germination in germinations.items():
        torch.manual_seed(0)
        model.set_slot(slot, torch.nn.Linear(6, 6) if slot == "hidden1" else torch.nn.Linear(5, 5))
        add_seed_params(opt, f"seed-{slot}", model.slot(slot).parameters(), germination=germination)
    train_steps(model, opt, 2, seed=4)
    return model, opt


@pytest.mark.parametrize("live", [{"hidden1": "cmd-b"}, {"hidden2": "cmd-2", "hidden1": "cmd-1"}])
def test_a_state_of_other_seeds_of_the_same_shapes_is_refused(live: dict[str, str]) -> None:
    """Keys, shapes and group sizes all fit, but the state belongs to other seeds: seed A's (culled,
    then B germinated in the slot), or the same two seeds' groups in the other order. It used to load
    A's weights and Adam moments into B, or one slot's moments and tags onto the other's parameters."""
    saved_model, saved_opt = _seeded({"hidden1": "cmd-a"} if len(live) == 1 else {"hidden1": "cmd-1",
                                                                                  "hidden2": "cmd-2"})
    saved = capture_state(saved_model, saved_opt)
    model, opt = _seeded(live)
    before = capture_state(model, opt)
    with pytest.raises(StateMismatchError, match="optimizer group"):
        restore_state(model, opt, saved)
    assert_same(before.model, dict(model.state_dict()))  # nothing was loaded
    restore_state(model, opt, before)  # its own state still fits


def test_a_state_from_before_its_seed_fossilised_still_restores() -> None:
    """The fossil tag is the seed's lifecycle, not its identity: the same seed, fossilised since."""
    from esper.kasmina.optim import FOSSIL_GROUP_KEY

    model, opt = _seeded({"hidden1": "cmd-a"})
    saved = capture_state(model, opt)
    opt.param_groups[1][FOSSIL_GROUP_KEY] = "seed-hidden1"
    restore_state(model, opt, saved)
    assert opt.param_groups[1][FOSSIL_GROUP_KEY] == "seed-hidden1"  # the saved group dict had none: kept


def test_the_checkpoint_tier_never_restores_another_runs_weights(tmp_path: Path) -> None:
    """Runs share the checkpoint directory. Run B, before its first save, finds only run A's
    checkpoint (same shapes): it is passed over as `foreign_run`, said so, and nothing is restored."""
    a_model, a_opt = _reference_after(5)
    CheckpointStore(tmp_path, run_id="run-a").save_training(a_model, a_opt, epoch=9, step=900)
    model, opt = _reference_after(1)
    before = capture_state(model, opt)
    store_b = CheckpointStore(tmp_path, run_id="run-b")
    with pytest.raises(RollbackError) as info:
        RollbackManager(fast_cap_bytes=BIG, checkpoints=store_b).rollback(model, opt)
    assert info.value.reason == "unavailable" and not info.value.restored
    assert "1 checkpoints failed verification" in info.value.detail
    assert_same(before.model, dict(model.state_dict()))
    with pytest.raises(CheckpointError) as refused:
        store_b.load(store_b.history()[0])
    assert refused.value.reason == "foreign_run" and "run-a" in refused.value.detail
    # ... and once B has saved, its own checkpoint serves, with A's still passed over behind it
    store_b.save_training(model, opt, epoch=0, step=1)
    train_steps(model, opt, 3, seed=4)
    result = RollbackManager(fast_cap_bytes=BIG, checkpoints=store_b).rollback(model, opt)
    assert (result.tier, result.step) == ("checkpoint", 1)
    assert_same(before.model, dict(model.state_dict()))


def test_deadline_miss_after_a_late_fast_restore_reports_the_result() -> None:
    model, opt = _reference_after(1)
    metrics = TolariaMetrics(CollectorRegistry())
    mgr = RollbackManager(fast_cap_bytes=BIG, deadline_ms=250.0, clock=FakeClock(tick=0.3), metrics=metrics)
    mgr.snapshot(model, opt, step=1, epoch=0)
    with pytest.raises(RollbackDeadlineExceeded) as info:
        mgr.rollback(model, opt)
    err = info.value
    assert err.restored and err.tier == "fast" and err.result is not None and err.result.step == 1
    assert err.elapsed_ms == pytest.approx(300.0) and err.deadline_ms == 250.0
    assert isinstance(err, TimeoutError)  # DeadlineExceededError: generic timeout handling sees it
    assert metrics.rollback_deadline_misses._value.get() == 1


def test_deadline_spent_before_the_checkpoint_tier_restores_nothing(tmp_path: Path) -> None:
    model, opt = _reference_after(1)
    store = _store_with(tmp_path, model, opt, 1)
    train_steps(model, opt, 2, seed=3)
    before = capture_state(model, opt)
    mgr = RollbackManager(fast_cap_bytes=BIG, deadline_ms=100.0, checkpoints=store, clock=FakeClock(tick=0.2))
    with pytest.raises(RollbackDeadlineExceeded) as info:
        mgr.rollback(model, opt)
    assert not info.value.restored and info.value.tier is None and info.value.result is None
    assert_same(before.model, dict(model.state_dict()))


def test_zero_deadline_is_always_missed_with_the_real_clock() -> None:
    model, opt = _reference_after(1)
    mgr = RollbackManager(fast_cap_bytes=BIG, deadline_ms=0.0)
    mgr.snapshot(model, opt, step=1, epoch=0)
    with pytest.raises(RollbackDeadlineExceeded) as info:
        mgr.rollback(model, opt)
    assert info.value.restored and info.value.result is not None and info.value.result.tier == "fast"


def test_from_settings_reads_the_prototype_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLARIA_ROLLBACK_FAST_CAP_MB", "2")
    monkeypatch.setenv("TOLARIA_ROLLBACK_SNAPSHOT_STEPS", "5")
    monkeypatch.setenv("TOLARIA_ROLLBACK_DEADLINE_MS", "40")
    mgr = RollbackManager.from_settings(TolariaSettings(), checkpoints=None)
    assert (mgr.ring.cap_bytes, mgr.snapshot_every_steps, mgr.deadline_ms) == (2 * 1024 * 1024, 5, 40.0)
    assert not mgr.due(4) and mgr.due(10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_both_tiers_restore_a_cuda_model_bit_identically(tmp_path: Path) -> None:
    model = make_model().cuda()
    opt = make_optimizer(model)
    x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 3, (16,), device="cuda")

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    store = CheckpointStore(tmp_path)
    store.save_training(model, opt, epoch=0, step=1)
    mgr = RollbackManager(fast_cap_bytes=BIG, checkpoints=store)
    mgr.snapshot(model, opt, step=1, epoch=0)
    expected = capture_state(model, opt)
    for _ in range(3):
        step()
    assert mgr.rollback(model, opt).tier == "fast"
    assert_same(expected.model, {k: v.cpu() for k, v in model.state_dict().items()})
    assert_same(expected.optimizer, capture_state(model, opt).optimizer)
    mgr.ring.clear()
    step()
    assert mgr.rollback(model, opt).tier == "checkpoint"
    assert_same(expected.optimizer, capture_state(model, opt).optimizer)
    assert next(model.parameters()).is_cuda


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_snapshot_overhead_budget_defers_until_paid_for_and_bounds_age() -> None:
    """A due snapshot waits until the training time reported since the last one pays for its cost at
    the budget (time between steps does not count), never past `snapshot_max_steps`, and never while
    the ring is empty (injected clock: no wall time)."""
    clock = _Clock()
    mgr = RollbackManager(fast_cap_bytes=BIG, clock=clock, snapshot_overhead=0.1, snapshot_max_steps=5)
    mgr._last_cost = 0.0
    assert mgr.due(1)  # empty ring: always due
    mgr.ring.put(Snapshot(1, 0, TrainingState({}, {}, 0)))
    mgr._last_step, mgr._last_cost = 1, 0.01  # a 10 ms snapshot
    clock.t = 10.0  # ten seconds of validation, checkpoints, ... : not training
    mgr.record_training(0.05)  # 50 ms trained: 10% of it is 5 ms < 10 ms
    assert not mgr.due(2)
    mgr.record_training(0.05)  # 100 ms trained: 10 ms at 10% pays for it
    assert mgr.due(3)
    model = torch.nn.Linear(2, 2)
    assert mgr.snapshot(model, None, step=3, epoch=0, force=True)  # the count starts again
    mgr._last_cost = 0.01
    assert not mgr.due(5) and mgr.due(8)  # 5 steps since the last: due whatever was trained
    assert mgr.deferred == 2
    mgr.ring.clear()
    assert mgr.due(2)


def test_snapshot_overhead_zero_keeps_every_n_steps() -> None:
    mgr = RollbackManager(fast_cap_bytes=BIG, snapshot_every_steps=2)
    model = torch.nn.Linear(2, 2)
    assert [mgr.snapshot(model, None, step=s, epoch=0) for s in range(1, 6)] == [False, True, False, True, False]
    assert mgr.taken == 2 and mgr.deferred == 0


def test_snapshot_settings_reach_the_manager() -> None:
    s = TolariaSettings(rollback_snapshot_overhead=0.05, rollback_snapshot_max_steps=7)
    mgr = RollbackManager.from_settings(s, checkpoints=None)
    assert (mgr.snapshot_overhead, mgr.snapshot_max_steps) == (0.05, 7)
    with pytest.raises(ValueError):
        RollbackManager(fast_cap_bytes=BIG, snapshot_overhead=1.0)
