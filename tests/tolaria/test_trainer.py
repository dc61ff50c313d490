"""The training loop: static baseline, NaN step → rollback + emergency, OPTIMIZER bounds, and the loop
against a real Tamiyo and a real Urza over the bus (decisions, a signed germinate grows the model)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from esper.core.clock import now_ms
from esper.karn import CATALOGUE, SlotShape
from esper.kasmina import add_seed_params
from esper.leyline import CHANNELS, decode_envelope, pb, sign_command, unpack_as
from esper.oona import Consumer, Delivery, OonaSettings
from esper.tezzeret.forge import forge_once
from esper.tolaria.bus import BusThread
from esper.tolaria.commands import (
    CEILING,
    FLOOR,
    MAX_STEP,
    MOMENTUM_MAX,
    WEIGHT_DECAY_MAX,
    OptimizerCommandRefused,
    adjust_lr,
    check_hyperparameters,
)
from esper.tolaria.decisions import Decision, DecisionClient, ask
from esper.tolaria.rollback import RollbackManager
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza.library import UrzaLibrary
from esper.urza.settings import UrzaSettings
from tests.conftest import ClientFactory
from tests.tamiyo._fleet import running_tamiyo, tamiyo_settings
from tests.urza._service import running_urza, urza_settings


@pytest.fixture(autouse=True, params=["in_line", "beside"])
def copy_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every trainer test both ways: snapshots copied in line (these hosts are under the 4 MiB default)
    and beside the next step (`copier.py`), whose rollback paths must restore the same states."""
    if request.param == "beside":
        monkeypatch.setenv("TOLARIA_ROLLBACK_ASYNC_MIN_MB", "0")
    return str(request.param)


def _settings(tmp: Path, **overrides: object) -> TolariaSettings:
    base: dict[str, object] = {"var_dir": tmp / "tolaria", "epochs": 2, "hidden_width": 16, "seed": 3,
                               "learning_rate": 0.01, "emergency_enabled": False, "metrics_port": -1}
    base.update(overrides)
    return TolariaSettings(**base)


def test_static_run_learns_and_reports(tmp_path: Path) -> None:
    trainer = Trainer(_settings(tmp_path), bus=None)
    stats = trainer.run()
    summary = trainer.summary(clean_shutdown=True)
    assert stats.epochs == 2 and stats.steps == summary["steps"] > 0
    assert summary["final_val_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert summary["decisions"] == 0 and summary["seed_parameters"] == 0
    assert len(trainer.checkpoints.history()) == 2  # one per epoch


def test_train_mode_is_set_after_validation_and_for_a_module_that_joins(tmp_path: Path) -> None:
    """The step sets train mode only when it is off (it costs ~20 us a step); a module grafted in
    eval mode is brought to train mode at the next step boundary (Kasmina attaches kernels at a
    boundary, just before the structure check, so a seed never trains in eval mode)."""
    trainer = Trainer(_settings(tmp_path, epochs=1), bus=None)
    xb, yb = trainer.data.x_train[:32], trainer.data.y_train[:32]
    trainer.evaluate()
    assert not trainer.host.training
    trainer.train_step(xb, yb)
    assert trainer.host.training
    joined = torch.nn.Sequential(torch.nn.Dropout(0.5)).eval()
    trainer.host.set_slot(trainer.host.slot_names[0], joined)
    trainer.train_step(xb, yb)
    assert joined.training and all(m.training for m in trainer.host.modules())


def test_the_steps_gradient_norm_covers_the_host_and_a_seed_that_joined(tmp_path: Path) -> None:
    """The norm is read from the optimizer's parameter lists (no module walk per step): a seed's
    parameters count once Kasmina added its group, as they do in every germination."""
    trainer = Trainer(_settings(tmp_path, epochs=1), bus=None)
    xb, yb = trainer.data.x_train[:32], trainer.data.y_train[:32]
    seed = torch.nn.Linear(16, 16).to(trainer.device)  # on the host's device (CUDA where present)
    trainer.host.set_slot(trainer.host.slot_names[0], seed)
    add_seed_params(trainer.optimizer, "seed-0", seed.parameters())
    trainer.train_step(xb, yb)
    grads = [p.grad for p in trainer.host.parameters() if p.grad is not None]
    assert len(grads) == len(list(trainer.host.parameters()))  # the seed's weight and bias too
    expected = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert trainer.signals.grad.mean == pytest.approx(expected, rel=1e-6)  # the first sample of the EWMA
    without_seed = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in
                                                               trainer.host.host_parameters()])))
    assert expected > without_seed  # so the seed's gradients are in it


def test_nan_step_is_rolled_back_and_escalated(tmp_path: Path) -> None:
    s = _settings(tmp_path, enable_fault_injection=True, fault_nan_at_step=5, epochs=1)
    trainer = Trainer(s, bus=None)
    trainer.run()
    summary = trainer.summary(clean_shutdown=True)
    assert summary["step_failures"] == {"non_finite": 1}
    assert summary["rollbacks"] == {"fast": 1}
    assert summary["emergencies"] == 1 and summary["emergency_level"] == pb.EMERGENCY_LEVEL_ELEVATED
    assert summary["steps"] == math.ceil(trainer.data.meta.train_size / s.batch_size) - 1  # the bad step
    assert all(torch.isfinite(p).all() for p in trainer.host.parameters())


def _state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Copies of the host's weights and every Adam buffer, to compare bit for bit."""
    weights = {k: v.detach().clone() for k, v in trainer.host.state_dict().items()}
    buffers = [t.clone() for st in trainer.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return weights, buffers


def _same(a: tuple[dict[str, torch.Tensor], list[torch.Tensor]],
          b: tuple[dict[str, torch.Tensor], list[torch.Tensor]]) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True)))


def _batch(trainer: Trainer, i: int, *, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    xb, yb = trainer.data.x_train[32 * i:32 * (i + 1)].clone(), trainer.data.y_train[32 * i:32 * (i + 1)]
    if poison:
        xb[0, 0] = float("nan")  # a bad batch: non-finite loss, the step is refused
    return xb, yb


def test_a_failed_step_restores_the_snapshot_bit_for_bit(tmp_path: Path) -> None:
    """Snapshots at steps 3 and 6: step 5 fails, so the weights and Adam state are step 3's exactly, not
    step 4's (a refused step is never applied, so finite weights alone would not show a restore)."""
    trainer = Trainer(_settings(tmp_path, epochs=1, rollback_snapshot_steps=3, rollback_snapshot_overhead=0.0),
                      bus=None)
    for i in range(3):
        trainer.train_step(*_batch(trainer, i))
    at_3 = _state(trainer)
    trainer.train_step(*_batch(trainer, 3))
    assert not _same(_state(trainer), at_3)
    trainer.train_step(*_batch(trainer, 4, poison=True))
    assert trainer.stats.step_failures == {"non_finite": 1} and trainer.stats.rollbacks == {"fast": 1}
    assert trainer._applied_step == 3 and _same(_state(trainer), at_3)


def test_a_snapshot_of_broken_weights_is_passed_over_when_it_fails_again(tmp_path: Path) -> None:
    """The update of step 4 breaks the weights (NaN), and step 4's snapshot holds them. Step 5 fails and
    restores them; step 6 fails on them again before any step was applied, so the rollback goes back
    past them, to step 3, and training goes on. Restoring the newest each time failed every step after."""
    trainer = Trainer(_settings(tmp_path, epochs=1, rollback_snapshot_overhead=0.0), bus=None)  # every step

    def diverge(_opt: object, _args: object, _kwargs: object) -> None:
        if trainer.step == 4:
            with torch.no_grad():
                next(trainer.host.parameters()).fill_(float("nan"))

    trainer.optimizer.register_step_post_hook(diverge)  # type: ignore[arg-type]
    for i in range(3):
        trainer.train_step(*_batch(trainer, i))
    at_3 = _state(trainer)
    for i in range(3, 10):
        trainer.train_step(*_batch(trainer, i))
    assert trainer.stats.step_failures == {"non_finite": 2} and trainer.stats.rollbacks == {"fast": 2}
    assert trainer.stats.steps == 3 + 1 + 4  # steps 1-4, then 7-10 on step 3's weights
    assert all(torch.isfinite(p).all() for p in trainer.host.parameters())
    trainer2 = Trainer(_settings(tmp_path / "b", epochs=1), bus=None)
    for i in range(3):
        trainer2.train_step(*_batch(trainer2, i))
    assert _same(_state(trainer2), at_3)  # the reference run agrees on step 3 (same seed, same batches)


def test_a_loss_spike_after_warm_up_is_refused_rolled_back_and_escalated(tmp_path: Path) -> None:
    s = _settings(tmp_path, epochs=1, loss_spike_warmup_steps=6, rollback_snapshot_overhead=0.0)
    trainer = Trainer(s, bus=None)
    for i in range(6):
        trainer.train_step(*_batch(trainer, i))
        if i == 4:
            at_5 = _state(trainer)
    ewma = trainer.signals.loss.mean
    limit = max(s.loss_spike_factor * ewma, ewma + s.loss_spike_min_delta)  # both must be exceeded
    assert trainer._step_problem(limit * 1.001, 1.0) == "loss_spike"
    assert trainer._step_problem(limit * 0.999, 1.0) is None
    assert trainer._step_problem(float("inf"), 1.0) == trainer._step_problem(1.0, float("nan")) == "non_finite"
    before = _state(trainer)
    xb, yb = _batch(trainer, 6)
    trainer.train_step(xb * 1000.0, yb)  # finite, but far above the EWMA
    assert trainer.stats.step_failures == {"loss_spike": 1} and trainer.stats.rollbacks == {"fast": 1}
    assert trainer.emergency.level == pb.EMERGENCY_LEVEL_ELEVATED
    assert _same(_state(trainer), before)  # restored to step 6, the newest snapshot: the spike never applied
    # the statistics restarted empty after the rollback: the same spike again was not checked, applied,
    # and became the new level that hid the next ones
    trainer.train_step(xb * 1000.0, yb)
    assert trainer.stats.step_failures == {"loss_spike": 2}
    assert _same(_state(trainer), at_5)  # refused again; failing on a restored state walks back past it
    trainer.train_step(*_batch(trainer, 7))  # a healthy step is applied and restarts the statistics
    assert trainer.stats.steps == 7 and trainer.signals.loss.count == 1
    early = Trainer(_settings(tmp_path / "b", epochs=1, loss_spike_warmup_steps=6), bus=None)
    for i in range(5):
        early.train_step(*_batch(early, i))
    early.train_step(xb * 1000.0, yb)  # the same batch inside the warm-up: trained on
    assert early.stats.step_failures == {} and early.stats.steps == 6


def test_a_refused_step_is_discarded_by_kasmina_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the seeds observed in a refused step must not reach their gates (Kasmina's tests show a NaN
    batch culling a healthy seed when it does): the trainer hands every refusal to `discard_step`."""
    trainer = Trainer(_settings(tmp_path, epochs=1), bus=None)
    discarded: list[int] = []
    real = trainer.kasmina.discard_step

    def discard_step() -> None:
        discarded.append(trainer.step)
        real()

    monkeypatch.setattr(trainer.kasmina, "discard_step", discard_step)
    for i in range(3):
        trainer.train_step(*_batch(trainer, i, poison=i == 1))
    assert discarded == [2] and trainer.stats.step_failures == {"non_finite": 1}


def _trainer_with_local_seeds(tmp: Path) -> Trainer:
    """A bus-less trainer whose Kasmina grafts real Karn kernels built in-process (no Urza)."""
    from esper.kasmina import Kasmina, SeedSlot
    from tests.kasmina._helpers import KEYS, KarnKernelSource, clock, fast_settings

    trainer = Trainer(_settings(tmp, rollback_snapshot_overhead=0.0), bus=None)
    for name, shape in trainer.host.slot_shapes().items():
        trainer.host.set_slot(name, SeedSlot(name, shape).to(trainer.device))
    trainer.kasmina = Kasmina(keys=KEYS, settings=fast_settings(training_steps=50), kernels=KarnKernelSource(),
                              optimizer=trainer.optimizer, clock_ms=clock)
    trainer.kasmina.register_host(trainer.host)
    return trainer


def test_a_seed_culled_for_breaking_a_step_costs_no_other_seed_and_no_progress(tmp_path: Path) -> None:
    """Seed B's output overflows: the step is refused and Kasmina culls B. Every snapshot held B, so the
    rollback missed the fast tier and fell back to the checkpoint, which held both seeds: A was culled
    too and nothing restored. Now the model as it is (last applied step, less B) is snapshotted first."""
    from esper.kasmina import seed_id_for
    from tests.kasmina._helpers import command

    trainer = _trainer_with_local_seeds(tmp_path)
    a, b = (seed_id_for(n) for n in trainer.host.slot_names)
    for sid in (a, b):
        trainer.kasmina.apply_command(command(seed_id=sid))
    assert asyncio.run(trainer.kasmina.fetch_kernels()) == 2
    for i in range(10):
        trainer.train_step(*_batch(trainer, i))
    trainer.epoch = 1
    trainer.end_epoch()  # a checkpoint holding both seeds
    for i in range(10, 20):
        trainer.train_step(*_batch(trainer, i % 10))
    assert trainer.kasmina.stage(a) == trainer.kasmina.stage(b) == pb.SEED_STAGE_TRAINING
    with torch.no_grad():
        for p in trainer.host.slot_modules[trainer.host.slot_names[1]].seed.parameters():  # type: ignore[union-attr]
            p.mul_(1e38)  # finite weights whose output overflows
    trainer.train_step(*_batch(trainer, 0))
    assert trainer.stats.step_failures == {"non_finite": 1} and trainer.stats.rollbacks == {"fast": 1}
    assert trainer.kasmina.stage(b) == pb.SEED_STAGE_CULLED and trainer.kasmina.stage(a) == pb.SEED_STAGE_TRAINING
    assert trainer._applied_step == 20
    for i in range(1, 6):
        trainer.train_step(*_batch(trainer, i))
    assert trainer.stats.step_failures == {"non_finite": 1} and trainer.kasmina.stage(a) == pb.SEED_STAGE_TRAINING


def test_a_checkpoint_that_culling_cannot_fit_costs_no_seed(tmp_path: Path) -> None:
    """`on_mismatch` culled every active seed whatever the mismatch: for a checkpoint holding another
    seed (or predating a fossil) the restore still failed, and the healthy seeds were lost for nothing."""
    from esper.kasmina import seed_id_for
    from esper.tolaria.state import TrainingState, capture_state
    from tests.kasmina._helpers import command

    trainer = _trainer_with_local_seeds(tmp_path)
    trainer.train_step(*_batch(trainer, 0))
    before = capture_state(trainer.host, trainer.optimizer)  # no seed yet
    sid = seed_id_for(trainer.host.slot_names[0])
    trainer.kasmina.apply_command(command(seed_id=sid))
    assert asyncio.run(trainer.kasmina.fetch_kernels()) == 1
    for i in range(1, 4):
        trainer.train_step(*_batch(trainer, i))
    assert trainer.kasmina.active_slots() == [trainer.host.slot_names[0]]
    with_seed = capture_state(trainer.host, trainer.optimizer)
    gone = TrainingState(with_seed.model | {"slots.hidden2.seed.w": torch.zeros(1)}, with_seed.optimizer, 0)
    assert not trainer._cull_to_fit(gone)  # a seed gone since
    assert not trainer._cull_to_fit(with_seed)  # the same parameters: culling would only remove them
    other = {**before.optimizer, "param_groups": [*before.optimizer["param_groups"],
                                                   {"params": [], "kasmina_seed": sid, "kasmina_germination": "old"}]}
    assert not trainer._cull_to_fit(TrainingState(before.model, other, 0))  # another germination's group
    assert trainer.kasmina.stage(sid) == pb.SEED_STAGE_TRAINING
    assert trainer._cull_to_fit(before)  # saved before the seed: culling it makes the state fit
    assert trainer.kasmina.stage(sid) == pb.SEED_STAGE_CULLED and trainer.kasmina.active_slots() == []


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_tampered_checkpoint_a_rollback_passes_over_is_reported(tmp_path: Path) -> None:
    """The checkpoint tier walks back past a broken checkpoint; that used to leave no event, no count and
    no log line: an epoch of training lost without a word. Each one is now refused out loud."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    trainer = Trainer(_settings(tmp_path, epochs=2, rollback_fast_cap_mb=0.001), bus=None, registry=registry)
    trainer.run()  # every snapshot over the fast tier's cap: the checkpoint tier serves
    assert len(trainer.rollback.ring) == 0
    older, newest = sorted(trainer.checkpoints.history(), key=lambda i: i.step)
    _flip_last_byte(trainer.checkpoints.directory / newest.file)
    trainer._pending_events.clear()
    trainer._do_rollback("test")
    assert trainer.stats.rollbacks == {"checkpoint": 1} and trainer._applied_step == older.step
    trainer._do_rollback("again")  # walks past the same file: counted and announced once
    assert trainer.stats.rollbacks == {"checkpoint": 2}
    assert trainer.summary(clean_shutdown=True)["checkpoints_refused"] == {"checksum_mismatch": 1}
    assert registry.get_sample_value("tolaria_checkpoint_errors_total", {"reason": "checksum_mismatch"}) == 1
    refused = [e for e in trainer._pending_events if e.attributes["event"] == "checkpoint_refused"]
    assert [(e.level, e.attributes["reason"], e.attributes["file"]) for e in refused] == [
        (pb.TELEMETRY_LEVEL_ERROR, "checksum_mismatch", newest.file)]


def test_a_rollback_that_restores_nothing_is_an_event_and_names_every_refused_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(_settings(tmp_path, epochs=2, rollback_fast_cap_mb=0.001), bus=None)
    trainer.run()
    for info in trainer.checkpoints.history():
        _flip_last_byte(trainer.checkpoints.directory / info.file)
    trainer._pending_events.clear()
    trainer._do_rollback("test")
    assert trainer.stats.rollbacks == {"failed_unavailable": 1}
    assert sum(trainer.stats.checkpoints_refused.values()) == 2
    names = [e.attributes["event"] for e in trainer._pending_events]
    assert names == ["checkpoint_refused", "checkpoint_refused", "rollback_failed"]
    failed = trainer._pending_events[-1]
    assert failed.level == pb.TELEMETRY_LEVEL_ERROR and failed.attributes["failure"] == "unavailable"


def test_a_rollback_command_after_a_failure_restores_the_newest_state(tmp_path: Path) -> None:
    """The walk-back past a restored state is for a step that fails on it, not for Tamiyo's ROLLBACK
    arriving next (it used to discard the good state just restored)."""
    trainer = Trainer(_settings(tmp_path, epochs=1, rollback_snapshot_overhead=0.0), bus=None)
    for i in range(5):
        trainer.train_step(*_batch(trainer, i))
    trainer.train_step(*_batch(trainer, 5, poison=True))
    assert trainer._applied_step == 5
    trainer._trainer_command(pb.AdaptationCommand(command_type=pb.COMMAND_ROLLBACK, command_id="c1"))
    assert trainer._applied_step == 5 and trainer.rollback.ring.steps() == [1, 2, 3, 4, 5]
    assert trainer.stats.rollbacks == {"fast": 2}


def test_stopping_checkpoints_even_off_the_cadence(tmp_path: Path) -> None:
    """SIGTERM (`stop`) mid-epoch 3 with a checkpoint every 2 epochs: the state it stops with is saved
    (it was not: the newest checkpoint was epoch 2's). The last epoch of a run is saved too."""
    trainer = Trainer(_settings(tmp_path, epochs=4, checkpoint_every_epochs=2), bus=None)
    per_epoch = math.ceil(trainer.data.meta.train_size / trainer.settings.batch_size)
    step = trainer.train_step

    def stop_in_epoch_3(xb: torch.Tensor, yb: torch.Tensor) -> None:
        step(xb, yb)
        if trainer.step == 2 * per_epoch + 3:
            trainer.stop()

    trainer.train_step = stop_in_epoch_3  # type: ignore[method-assign]
    trainer.run()
    assert sorted((c.epoch, c.step) for c in trainer.checkpoints.history()) == [(2, 2 * per_epoch),
                                                                              (3, 2 * per_epoch + 3)]
    last = Trainer(_settings(tmp_path / "b", epochs=3, checkpoint_every_epochs=2), bus=None)
    last.run()
    assert sorted(c.epoch for c in last.checkpoints.history()) == [2, 3]


def test_a_rollback_out_of_time_before_restoring_anything_is_a_rollback_failed_event(tmp_path: Path) -> None:
    trainer = Trainer(_settings(tmp_path, epochs=1, rollback_deadline_ms=0.0, rollback_fast_cap_mb=0.001,
                                emergency_l4_on_rollback_deadline=False), bus=None)
    trainer.run()
    trainer._pending_events.clear()
    trainer._do_rollback("test")  # the fast tier has nothing and the 0 ms deadline is spent: no checkpoint tier
    assert trainer.stats.rollbacks == {"deadline_missed": 1} and not trainer.emergency.halted
    [event] = trainer._pending_events
    assert (event.attributes["event"], event.attributes["failure"]) == ("rollback_failed", "deadline")


def test_a_late_rollback_escalates_to_halt_and_restarts_the_loss_statistics(tmp_path: Path) -> None:
    """Restored past `TOLARIA_ROLLBACK_DEADLINE_MS`: counted, HALT, and the EWMAs restart from the
    restored weights (they did not)."""
    trainer = Trainer(_settings(tmp_path, epochs=1), bus=None)
    trainer.run()
    clock = itertools.count(0.0, 0.2)  # every read of the clock is 200 ms later: the restore ends late
    trainer.rollback = RollbackManager(fast_cap_bytes=1 << 30, deadline_ms=250.0, checkpoints=trainer.checkpoints,
                                       clock=lambda: float(next(clock)))
    assert trainer.signals.loss.count > 0
    trainer._do_rollback("test")
    assert trainer.stats.rollbacks["deadline_missed"] == 1
    assert trainer.emergency.level == pb.EMERGENCY_LEVEL_HALT and trainer.emergency.halted
    assert trainer.signals.loss.count == 0


def test_halt_stops_the_run_mid_epoch_checkpoints_that_step_and_exits_3(tmp_path: Path) -> None:
    """HALT (here: a rollback past a 0 ms deadline) ends the run at that step, not at the epochs' end;
    the step it stopped at is checkpointed, and the process exits 3 (EXIT_HALTED)."""
    from esper.tolaria.service import EXIT_HALTED, run_training

    s = _settings(tmp_path, epochs=3, enable_fault_injection=True, fault_nan_at_step=5, rollback_deadline_ms=0.0,
                  malloc_keep_mb=0)  # in process: leave glibc's heap settings alone for the tests after this one
    code, summary = run_training(s, static=True)
    assert code == EXIT_HALTED and summary["halted"] and summary["emergency_level"] == pb.EMERGENCY_LEVEL_HALT
    assert summary["rollbacks"] == {"deadline_missed": 1} and summary["epochs"] == 1
    assert summary["steps"] == 4  # the four good steps; the fifth failed and HALT stopped the loop there
    from esper.tolaria.checkpoint import CheckpointStore

    newest = CheckpointStore(s.var_dir / "checkpoints").history()[0]
    assert (newest.step, newest.epoch) == (5, 1)  # saved where HALT stopped it (the failed step made no update)


def test_faults_need_opt_in(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="ESPER_ENABLE_FAULT_INJECTION"):
        _settings(tmp_path, fault_nan_at_step=3)
    with pytest.raises(Exception, match="ESPER_ENABLE_FAULT_INJECTION"):
        _settings(tmp_path, fault_step_delay_ms=30.0)
    with pytest.raises(Exception, match="ESPER_ENABLE_FAULT_INJECTION"):
        _settings(tmp_path, fault_corrupt_weights_at_step=15)
    assert _settings(tmp_path, enable_fault_injection=True, fault_step_delay_ms=30.0).fault_step_delay_ms == 30.0


@pytest.mark.parametrize(("hyper", "expected"), [
    ({"lr_delta": 0.0}, 1e-3),
    ({"lr_delta": math.log(1.5)}, 1.5e-3),
    ({"lr_delta": 5.0}, 1e-3 * MAX_STEP),  # one command moves at most MAX_STEP x
    ({"lr_delta": 800.0}, 1e-3 * MAX_STEP),  # exp overflows a float: still one bounded step, no crash
    ({"lr_delta": -800.0}, 1e-3 / MAX_STEP),
    ({"learning_rate": 1e-9}, 1e-3 / MAX_STEP),
    ({"lr_delta": float("nan")}, 1e-3),
])
def test_optimizer_commands_are_bounded(hyper: dict[str, float], expected: float) -> None:
    change = adjust_lr(1e-3, 1e-3, hyper)
    assert change.new == pytest.approx(expected)
    assert adjust_lr(1e-3 * CEILING, 1e-3, {"lr_delta": 1.0}).new == pytest.approx(1e-3 * CEILING)
    assert adjust_lr(1e-3 / FLOOR, 1e-3, {"lr_delta": -1.0}).new == pytest.approx(1e-3 / FLOOR)


async def test_a_failure_reason_this_schema_does_not_define_is_a_failure_not_a_crash(
        make_client: ClientFactory) -> None:
    """A newer Tamiyo's DecisionFailure reason (proto3 keeps the number): `ask` names it instead of
    raising through the bus thread's future into the training thread."""
    trainer, tamiyo = await make_client("trainer"), await make_client("tamiyo")

    async def handler(d: Delivery) -> pb.DecisionFailure:
        return pb.DecisionFailure(packet_id=d.message_as(pb.SystemStatePacket).packet_id,
                                  reason=99)  # type: ignore[arg-type]

    stop = asyncio.Event()
    task = asyncio.create_task(Consumer(tamiyo, "state", group="tamiyo", handler=handler).run(stop))
    try:
        d = await ask(trainer, pb.SystemStatePacket(packet_id="p-1", global_step=1), 1, 2000.0)
    finally:
        stop.set()
        await task
    assert (d.kind, d.detail, d.packet_id) == ("failure", "UNKNOWN_99", "p-1")


async def test_a_redis_error_reply_is_an_error_decision_not_a_crash(make_client: ClientFactory,
                                                                    settings: OonaSettings) -> None:
    """A real Redis refusing writes (OOM past `maxmemory`; MISCONF and READONLY look the same) answers
    the request's XADD with an error reply, which Oona does not wrap: `ask` still returns an outcome, on
    the bus thread too, instead of raising into the training thread."""
    client = await make_client("trainer")
    await client.redis.config_set("maxmemory", "1")
    try:
        direct = await ask(client, pb.SystemStatePacket(packet_id="p-1"), 1, 500.0)
        bus = BusThread(TolariaSettings(redis_url=settings.redis_url, leyline_secret=settings.leyline_secret,
                                        metrics_port=-1))
        await asyncio.to_thread(bus.start)
        try:
            dc = DecisionClient(bus, budget_ms=500.0)
            assert dc.submit(pb.SystemStatePacket(packet_id="p-2"), 2)
            threaded = await asyncio.to_thread(dc.wait)
        finally:
            await asyncio.to_thread(bus.stop)
    finally:
        await client.redis.config_set("maxmemory", "0")
    assert direct.kind == "error" and "OutOfMemory" in direct.detail
    assert threaded is not None and (threaded.kind, threaded.step, threaded.packet_id) == ("error", 2, "p-2")


def _germinate(keys: object, seed_id: str, blueprint: str, command_id: str) -> pb.AdaptationCommand:
    cmd = pb.AdaptationCommand(version=1, command_id=command_id, command_type=pb.COMMAND_SEED,
                               target_seed_id=seed_id, issued_by="test")
    cmd.seed_operation.operation = pb.SEED_OP_GERMINATE
    cmd.seed_operation.blueprint_id = blueprint
    cmd.issued_at.FromMilliseconds(now_ms())
    return sign_command(cmd, keys)  # type: ignore[arg-type]


def _forged_urza(settings: OonaSettings, tmp_path: Path, *templates: str) -> UrzaSettings:
    """Urza's settings over a library holding real v16 kernels of `templates` (Karn's catalogue seeded)."""
    us = urza_settings(settings, tmp_path / "urza", seed_karn=True, seed_slot="v16")
    with UrzaLibrary(us.db_path, us.artifact_dir) as lib:
        forge_once(lib, [SlotShape(16)], device=torch.device("cpu"), compile_enabled=False, seed=0,
                   max_attempts=1, templates=[CATALOGUE[t] for t in templates])
    return us


def _germinate_bp002_at_step_1(trainer: Trainer, bus: BusThread, run_id: str, command_id: str) -> str:
    """Apply a signed GERMINATE of BP002 in the first seed slot at step 1; returns that seed's id."""
    seed_id = trainer.kasmina.seed_ids[0]
    trainer.step = 1
    trainer._take_decision(Decision(1, f"{run_id}-1", "command", 1.0,
                                    command=_germinate(bus.client.keys, seed_id, "BP002", command_id)))
    return seed_id


@pytest.mark.parametrize("transport", ["thread", "process"])
async def test_loop_against_real_tamiyo_and_urza(make_client: ClientFactory, settings: OonaSettings,
                                                 tmp_path: Path, transport: str) -> None:
    """Sync decisions from a real Tamiyo every step (on the bus thread, or through the sidecar process);
    a signed germinate fetches a real kernel from Urza over the bus, and the seed joins the model and
    its optimizer."""
    us = _forged_urza(settings, tmp_path, "BP002", "BP005")
    observer = await make_client("observer")
    ts = _settings(tmp_path, redis_url=settings.redis_url, leyline_secret=settings.leyline_secret, epochs=1,
                   decision_mode="sync", tamiyo_step_timeout_ms=500.0, artifact_dir=us.artifact_dir,
                   run_id="run-loop", decision_transport=transport)
    async with running_urza(us), running_tamiyo(tamiyo_settings(settings, tmp_path / "tamiyo")):
        bus = BusThread(ts)
        bus.start()
        trainer = Trainer(ts, bus=bus)
        try:
            _germinate_bp002_at_step_1(trainer, bus, "run-loop", "cmd-grow")
            await asyncio.to_thread(trainer.run)
        finally:
            trainer.close()
            await asyncio.to_thread(bus.stop)
    summary = trainer.summary(clean_shutdown=True)
    assert summary["decisions"] == summary["steps"] + 1  # one reply per step (sync) + the injected germinate
    assert summary["decision_commands"] + summary["decision_failures"] + summary["timeouts"] == summary["decisions"]
    assert summary["commands_by_type"].get("COMMAND_SEED", 0) >= 1
    assert summary["seed_parameters"] > 0  # BP002's kernel was fetched from Urza and grafted
    grafted = {id(p) for name, p in trainer.host.named_parameters() if ".seed." in name}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert grafted and grafted <= in_optimizer
    rows = await observer.redis.xrange(CHANNELS["telemetry"].normal_stream)
    sources = {unpack_as(decode_envelope(f[b"payload"]), pb.TelemetryPacket).source_subsystem for _, f in rows}
    assert {"tolaria", "kasmina"} <= sources


@contextlib.asynccontextmanager
async def _trainer_with_urza(settings: OonaSettings, tmp_path: Path, run_id: str,
                             kernel_wait_ms: float) -> AsyncIterator[tuple[Trainer, BusThread]]:
    """A one-epoch trainer on its bus, beside a real Urza serving BP002 kernels; closed after."""
    us = _forged_urza(settings, tmp_path, "BP002")
    ts = _settings(tmp_path, redis_url=settings.redis_url, leyline_secret=settings.leyline_secret, epochs=1,
                   artifact_dir=us.artifact_dir, run_id=run_id, kernel_wait_ms=kernel_wait_ms)
    async with running_urza(us):
        bus = BusThread(ts)
        bus.start()
        trainer = Trainer(ts, bus=bus)
        try:
            yield trainer, bus
        finally:
            trainer.close()
            await asyncio.to_thread(bus.stop)


async def test_the_trainers_kernel_breaker_reports_through_kasmina(make_client: ClientFactory,
                                                                   settings: OonaSettings, tmp_path: Path) -> None:
    """Tolaria builds the kernel-fetch breaker; its transitions used to reach only a gauge."""
    from esper.kasmina import KernelClient

    async with _trainer_with_urza(settings, tmp_path, "run-breaker", 0.001) as (trainer, _):
        kernels = trainer.kasmina.kernels
        assert isinstance(kernels, KernelClient)
        for _ in range(trainer.kasmina.settings.breaker_failures):
            kernels.breaker.record_failure()
        opened = [e.attributes for e in trainer.kasmina.drain_events() if e.attributes["event"] == "breaker_event"]
        assert [(e["breaker"], e["to_state"]) for e in opened] == [("kernel_fetch", "CIRCUIT_STATE_OPEN")]


@pytest.mark.parametrize(("wait_ms", "attached_next_boundary"), [(5000.0, True), (0.001, False)])
async def test_kernel_wait_fixes_the_attach_step(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path,
                                                 wait_ms: float, attached_next_boundary: bool) -> None:
    """TOLARIA_KERNEL_WAIT_MS: the boundary after a germination waits for its kernel, so it attaches at the
    next boundary whatever Urza's timing; a wait that runs out is counted, and the fetch goes on."""
    async with _trainer_with_urza(settings, tmp_path, "run-wait", wait_ms) as (trainer, bus):
        seed_id = _germinate_bp002_at_step_1(trainer, bus, "run-wait", "cmd-wait")
        assert trainer.kasmina.pending_kernels() == [seed_id]
        await asyncio.to_thread(trainer._start_kernel_fetches)
        assert trainer.stats.budget_misses["kernel_wait"] == (0 if attached_next_boundary else 1)
        if attached_next_boundary:  # (a wait that ran out says nothing about when the fetch lands)
            trainer.kasmina.advance(2)  # the next boundary
            assert sum(p.numel() for name, p in trainer.host.named_parameters() if ".seed." in name) > 0


async def test_a_cull_command_leaves_a_fast_snapshot_that_fits(make_client: ClientFactory, settings: OonaSettings,
                                                               tmp_path: Path) -> None:
    """A CULL applied between steps changes the model. The ring held only snapshots with the seed, so a
    step failing before the next boundary missed the fast tier (state_mismatch) and fell back to the
    last checkpoint, up to an epoch back. Now the cull is followed by a snapshot of the model as it is."""
    async with _trainer_with_urza(settings, tmp_path, "run-cull", 5000.0) as (trainer, bus):
        seed_id = _germinate_bp002_at_step_1(trainer, bus, "run-cull", "cmd-grow")
        await asyncio.to_thread(trainer._start_kernel_fetches)
        trainer.step = 2
        trainer.train_step(trainer.data.x_train[:32], trainer.data.y_train[:32])  # attaches, snapshots step 3
        assert trainer.summary(clean_shutdown=True)["seed_parameters"] > 0 and len(trainer.rollback.ring)
        cull = _germinate(bus.client.keys, seed_id, "BP002", "cmd-cull")
        cull.seed_operation.operation = pb.SEED_OP_CULL
        trainer._take_decision(Decision(3, "run-cull-3", "command", 1.0,
                                        command=sign_command(cull, bus.client.keys)))
        assert trainer.summary(clean_shutdown=True)["seed_parameters"] == 0
        result = trainer.rollback.rollback(trainer.host, trainer.optimizer)
        assert (result.tier, result.step) == ("fast", 3)


def test_lr_policies() -> None:
    from esper.tolaria.commands import scheduled_lr

    kw = {"step": 50, "epoch": 3, "total_steps": 100}
    assert scheduled_lr("off", 1.0, **kw) is None
    assert scheduled_lr("constant", 1.0, **kw) == 1.0
    assert scheduled_lr("cosine", 1.0, **kw) == pytest.approx(0.5)  # halfway down the cosine
    assert scheduled_lr("cosine", 1.0, step=100, epoch=9, total_steps=100) == pytest.approx(0.0)
    assert scheduled_lr("step", 1.0, step=1, epoch=11, total_steps=100, step_epochs=10, gamma=0.5) == 0.5
    assert scheduled_lr("constant", 1.0, step=5, epoch=1, total_steps=100, warmup_steps=10) == 0.5


def test_cosine_policy_drives_the_optimizer(tmp_path: Path) -> None:
    trainer = Trainer(_settings(tmp_path, lr_policy="cosine", epochs=1), bus=None)
    trainer.run()
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert 0.0 <= lr < 0.01 * 0.05  # the last step of a one-epoch cosine: almost zero


def _lr_command(**hyper: float) -> pb.AdaptationCommand:
    cmd = pb.AdaptationCommand(command_type=pb.COMMAND_OPTIMIZER, command_id="c-lr")
    cmd.optimizer_adjustment.hyperparameters.update(hyper)
    return cmd


def test_commands_under_a_schedule_bound_the_scale_that_persists(tmp_path: Path) -> None:
    """The bounds held the rate of the moment: ten 'raise' commands in warm-up built a scale of 100
    (10x the ceiling once warm-up ended), and a decrease at a scheduled rate below the floor jumped
    to the floor. Now each command steps the schedule's scale by at most 2x, within [1/100, 10]."""
    base = 0.01
    trainer = Trainer(_settings(tmp_path, epochs=1, learning_rate=base, lr_policy="constant", lr_warmup_steps=1000),
                      bus=None)
    trainer.step = 1
    trainer._apply_lr_policy()  # warm-up: base / 1000
    for _ in range(10):
        trainer._trainer_command(_lr_command(lr_delta=1.0))
    assert trainer.lr_scale == CEILING
    trainer.step = 1000
    trainer._apply_lr_policy()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(base * CEILING)  # not base x 100
    trainer.lr_scale, trainer.step = 1.0, 1
    trainer._apply_lr_policy()
    before = trainer.optimizer.param_groups[0]["lr"]
    trainer._trainer_command(_lr_command(lr_delta=-0.5))  # a decrease below the floor's rate
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(before * math.exp(-0.5))
    trainer._trainer_command(_lr_command(learning_rate=base * 8))  # explicit rate: one 2x step toward it
    assert trainer.lr_scale == pytest.approx(math.exp(-0.5) * MAX_STEP)
    trainer.lr_scale = 1.0
    for _ in range(5):  # "the base rate", asked in warm-up: read against the schedule past its warm-up
        trainer._trainer_command(_lr_command(learning_rate=base))
    assert trainer.lr_scale == pytest.approx(1.0)  # not 10 (each compared with the warm-up's tiny rate)


def test_a_command_at_a_cosines_end_does_not_crash(tmp_path: Path) -> None:
    """At the last step the cosine rate is exactly 0; the old code divided by it (ZeroDivisionError)."""
    trainer = Trainer(_settings(tmp_path, epochs=1, lr_policy="cosine"), bus=None)
    trainer.step = trainer.total_steps
    trainer._apply_lr_policy()
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0
    trainer._trainer_command(_lr_command(lr_delta=-0.1))
    trainer._trainer_command(_lr_command(learning_rate=0.5))  # no factor reaches it from 0: nothing asked
    assert trainer.lr_scale == pytest.approx(math.exp(-0.1)) and trainer.optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize(("hyper", "reason"), [
    ({}, "no_hyperparameters"),
    ({"beta2": 0.9}, "unsupported_hyperparameter"),
    ({"lr_delta": 0.1, "bogus": 1.0}, "unsupported_hyperparameter"),  # nothing of it applies
    ({"lr_delta": float("nan")}, "invalid_hyperparameter"),
    ({"learning_rate": -1.0}, "invalid_hyperparameter"),
    ({"learning_rate": 0.0}, "invalid_hyperparameter"),
    ({"weight_decay": -0.1}, "invalid_hyperparameter"),
    ({"momentum": 1.0}, "invalid_hyperparameter"),
])
def test_an_optimizer_command_that_would_change_nothing_meant_is_refused(
        tmp_path: Path, hyper: dict[str, float], reason: str) -> None:
    """Names other than the rate were ignored and the command counted as applied, and a learning_rate of
    -1 halved the rate (the 2x step bound) with the default policy."""
    with pytest.raises(OptimizerCommandRefused) as caught:
        check_hyperparameters(hyper)
    assert caught.value.reason == reason
    trainer = Trainer(_settings(tmp_path, epochs=1), bus=None)
    before = [dict(g) for g in trainer.optimizer.param_groups]
    assert not trainer._optimizer_command(_lr_command(**hyper))
    assert trainer.stats.rejected == {reason: 1} and [dict(g) for g in trainer.optimizer.param_groups] == before
    [event] = [e.attributes for e in trainer._pending_events]
    assert (event["event"], event["reason"], event["command_type"]) == ("command_rejected", reason, "COMMAND_OPTIMIZER")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_and_momentum_commands_change_every_group_within_bounds(tmp_path: Path, optimizer: str) -> None:
    trainer = Trainer(_settings(tmp_path, epochs=1, optimizer=optimizer), bus=None)
    add_seed_params(trainer.optimizer, "seed-x", [torch.nn.Parameter(torch.zeros(3))])  # a seed's group too
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert trainer._optimizer_command(_lr_command(weight_decay=0.5, momentum=0.5))
    for group in trainer.optimizer.param_groups:
        assert group["weight_decay"] == WEIGHT_DECAY_MAX  # 0.5 asked: clamped
        assert (group["betas"][0] if "betas" in group else group["momentum"]) == 0.5
        assert group["lr"] == lr  # no rate asked, none changed
    assert trainer._optimizer_command(_lr_command(momentum=0.999))
    group = trainer.optimizer.param_groups[0]
    assert (group["betas"][0] if "betas" in group else group["momentum"]) == MOMENTUM_MAX
    events = [e.attributes for e in trainer._pending_events]  # old and new on the event, not only in its text
    assert [(e["hyperparameter"], e["old"], e["new"], e["clamped"]) for e in events] == [
        ("weight_decay", "0", "0.1", "True"), ("momentum", "0.9", "0.5", "False"), ("momentum", "0.5", "0.99", "True")]
    trainer._pending_events.clear()
    assert trainer._optimizer_command(_lr_command(weight_decay=0.1))  # the bound itself, sent as float32
    assert trainer._pending_events[-1].attributes["clamped"] == "False"
    trainer.run()  # the optimizer steps with the new values
    assert trainer.stats.steps > 0 and trainer.stats.rejected == {}


def test_momentum_turned_back_on_does_not_resume_a_stale_buffer(tmp_path: Path) -> None:
    """SGD stops updating its momentum buffer at momentum 0 but keeps it: turned back on, the first
    steps followed a gradient history from before the pause."""
    trainer = Trainer(_settings(tmp_path, epochs=1, optimizer="sgd"), bus=None)
    params = trainer.optimizer.param_groups[0]["params"]
    for p in params:
        p.grad = torch.ones_like(p)
    trainer.optimizer.step()
    assert all("momentum_buffer" in trainer.optimizer.state[p] for p in params)
    assert trainer._optimizer_command(_lr_command(momentum=0.0))
    trainer.optimizer.step()
    assert all("momentum_buffer" in trainer.optimizer.state[p] for p in params)  # kept, not updated, by torch
    assert trainer._optimizer_command(_lr_command(momentum=0.5))
    assert not any("momentum_buffer" in trainer.optimizer.state[p] for p in params)
    trainer.optimizer.step()  # starts a fresh buffer
    assert all(torch.equal(trainer.optimizer.state[p]["momentum_buffer"], p.grad) for p in params)


def test_a_command_the_trainer_does_not_carry_out_is_not_counted_as_applied(tmp_path: Path) -> None:
    """Kasmina hands CIRCUIT_BREAKER back to the trainer, which has no such knob: it was counted in
    `commands_by_type` as applied, with no log line and no event."""
    trainer = Trainer(_settings(tmp_path, epochs=1), bus=None)
    breaker = pb.AdaptationCommand(command_type=pb.COMMAND_CIRCUIT_BREAKER, command_id="c-cb")
    breaker.circuit_breaker.desired_state = pb.CIRCUIT_STATE_OPEN
    assert not trainer._trainer_command(breaker)
    assert trainer.stats.rejected == {"unsupported_by_trainer": 1}
    assert [e.attributes["event"] for e in trainer._pending_events] == ["command_unsupported"]
    assert trainer._trainer_command(_lr_command(lr_delta=0.1))  # carried out


def test_a_reply_is_as_old_at_either_look_of_one_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of step k and the start of step k+1 are one boundary (no update between them); a reply
    taken at the second look was one step older, so TOLARIA_MAX_STALENESS_STEPS=0 dropped every
    pipelined reply that missed the first. Stale is strictly more steps than the setting."""
    trainer = Trainer(_settings(tmp_path, epochs=1, max_staleness_steps=0), bus=None)
    seen: list[int] = []
    monkeypatch.setattr(trainer, "_poll_decision", lambda: seen.append(trainer.step))
    for i in range(3):
        trainer.train_step(*_batch(trainer, i))
    assert seen == [0, 1, 2]  # the start of steps 1-3 is the boundary after steps 0-2
    trainer.step = 7
    trainer._take_decision(Decision(6, "p-6", "command", 1.0, command=_lr_command(lr_delta=0.1)))
    assert trainer.stats.stale == 1
    trainer._take_decision(Decision(7, "p-7", "command", 1.0, command=_lr_command(lr_delta=0.1)))
    assert trainer.stats.stale == 1  # the boundary's own packet: age 0, not stale (Kasmina judges it next)


def test_budgets_are_reported_and_the_profiler_writes_a_trace(tmp_path: Path) -> None:
    s = _settings(tmp_path, epochs=1, epoch_budget_ms=1e-3, hook_budget_ms=1e-3, profiler_dir=tmp_path / "prof")
    trainer = Trainer(s, bus=None)
    trainer.run()
    summary = trainer.summary(clean_shutdown=True)
    assert summary["budget_misses"] == {"epoch": 1, "hook": summary["steps"]}
    assert summary["epochs"] == 1 and summary["step_failures"] == {}  # reported, not a failure
    traces = list((tmp_path / "prof").iterdir())
    assert traces and all(t.stat().st_size > 0 for t in traces)
    one_step = Trainer(_settings(tmp_path / "one", epochs=1, batch_size=4096, profiler_dir=tmp_path / "prof1"),
                       bus=None)  # the whole training set in one batch: a 1-step run
    one_step.run()
    assert one_step.stats.steps == 1 and [t.stat().st_size > 0 for t in (tmp_path / "prof1").iterdir()] == [True]


def test_a_seed_in_a_long_epoch_gets_its_verdict_from_evidence_not_a_no_evidence_cull(tmp_path: Path) -> None:
    """Evidence comes at epoch ends only. With 180 steps an epoch (batch 8) and Kasmina's default grace
    (20 + 100 steps past probation), a seed on probation from step 52 was culled `no_evidence` at step
    172, eight steps before its first report. The trainer raises the grace to cover one report per epoch."""
    from esper.kasmina import Kasmina, SeedSlot
    from tests.kasmina._helpers import KEYS, KarnKernelSource, command

    s = TolariaSettings(var_dir=tmp_path, epochs=2, batch_size=8, hidden_width=16, hidden_layers=1,
                        rollback_enabled=False, emergency_enabled=False, metrics_port=-1)
    class KeepsEvents(Trainer):  # no bus: the epoch's events would be dropped
        kept: list[dict[str, str]] = []

        def _publish_epoch_telemetry(self, loss: float, acc: float) -> None:
            self.kept.extend(dict(e.attributes) for e in self._pending_events)
            super()._publish_epoch_telemetry(loss, acc)

    trainer = KeepsEvents(s, bus=None)
    steps_per_epoch = math.ceil(trainer.data.meta.train_size / s.batch_size)
    assert steps_per_epoch == 180 and trainer.kasmina.settings.evidence_grace_steps == steps_per_epoch
    for name, shape in trainer.host.slot_shapes().items():
        trainer.host.set_slot(name, SeedSlot(name, shape))
    # the trainer's own Kasmina settings, with keys and a kernel source (bus=None builds it without them)
    trainer.kasmina = Kasmina(keys=KEYS, settings=trainer.kasmina.settings, kernels=KarnKernelSource(),
                              optimizer=trainer.optimizer)
    trainer.kasmina.register_host(trainer.host)
    seed = trainer.kasmina.seed_ids[0]
    trainer.kasmina.apply_command(command(seed_id=seed, blueprint="BP002", issued_at_ms=now_ms()))
    asyncio.run(trainer.kasmina.fetch_kernels())
    trainer.run()
    moves = {t.to_stage: (t.step, t.reason) for t in trainer.kasmina.history(seed)}
    assert moves[pb.SEED_STAGE_PROBATIONARY][0] < steps_per_epoch - 120  # probation began early in the epoch
    [g4] = [e for e in trainer.kept if e["event"] == "gate_event" and e["gate"] == "G4_SYSTEM_IMPACT"]
    assert (g4["baseline"], g4["steps"]) == ("paired", str(trainer.kasmina.settings.shadow_steps))  # same batches
    verdict = moves.get(pb.SEED_STAGE_FOSSILIZED) or moves.get(pb.SEED_STAGE_CULLED)
    assert verdict is not None and verdict[1] in ("evidence_of_benefit", "no_benefit"), moves
    assert verdict[0] == steps_per_epoch + 1  # the step after the first epoch's report
