"""Packet metrics: EWMA / volatility / grad variance arithmetic, non-finite refusal, gradient norm."""

from __future__ import annotations

import math

import pytest
import torch

from esper.tolaria.metrics import (
    EwmStats,
    NonFiniteMetricError,
    TrainingSignals,
    batch_accuracy,
    gradient_norm,
    step_readings,
    training_metrics,
)


def test_ewm_stats_match_the_recurrence() -> None:
    s = EwmStats(alpha=0.5)
    s.update(2.0)
    assert (s.mean, s.var) == (2.0, 0.0)
    s.update(4.0)  # diff 2, incr 1: mean 3, var 0.5 * (0 + 2 * 1) = 1
    assert (s.mean, s.var, s.std) == (3.0, 1.0, 1.0)
    s.update(3.0)  # diff 0: mean 3, var 0.5
    assert (s.mean, s.var) == (3.0, 0.5)
    with pytest.raises(ValueError):
        EwmStats(alpha=0.0)


def test_training_signals_deltas_and_reset() -> None:
    sig = TrainingSignals(alpha=0.5)
    first = sig.update(loss=2.0, grad_norm=1.0)
    assert (first.loss_delta, first.loss_ewma, first.loss_volatility, first.grad_norm_ewma, first.grad_var) == (
        0.0, 2.0, 0.0, 1.0, 0.0)
    second = sig.update(loss=1.5, grad_norm=3.0)
    assert second.loss_delta == -0.25 and second.loss_ewma == 1.75  # the smoothed loss's change, not 1.5 - 2.0
    assert second.loss_volatility == pytest.approx(math.sqrt(0.5 * 0.5 * 0.25))
    assert second.grad_norm_ewma == 2.0 and second.grad_var == 1.0
    with pytest.raises(NonFiniteMetricError, match="loss"):
        sig.update(loss=float("nan"), grad_norm=1.0)
    assert sig.last_loss == 1.5  # the NaN was not folded in
    sig.reset()
    assert sig.update(loss=9.0, grad_norm=0.0).loss_delta == 0.0


def test_loss_delta_ignores_batch_noise_but_shows_a_spike() -> None:
    """Alternating batch losses (noise) keep |loss_delta| under Tamiyo's 0.075 warning; a jump of 3
    nats still crosses its 0.15 spike limit."""
    sig = TrainingSignals()  # alpha 0.1, as the trainer
    deltas = [sig.update(loss=0.5 + (0.3 if i % 2 else -0.3), grad_norm=1.0).loss_delta for i in range(200)]
    assert max(abs(d) for d in deltas[50:]) < 0.075
    assert sig.update(loss=3.5, grad_norm=1.0).loss_delta > 0.15


def test_training_metrics_map_uses_the_reference_names_and_refuses_nan() -> None:
    sig = TrainingSignals().update(loss=1.0, grad_norm=2.0)
    m = training_metrics(loss=1.0, accuracy=0.5, gradient_norm=2.0, samples_per_s=1000.0, hook_latency_ms=0.1,
                         signals=sig, step_latency_ms=3.0, optimizer_family_index=2, extra={"input_wait_ms": 0.2})
    assert set(m) == {"loss", "accuracy", "gradient_norm", "samples_per_s", "hook_latency_ms", "loss_delta",
                      "loss_ewma", "loss_volatility", "grad_norm_ewma", "grad_var", "step_latency_ms",
                      "optimizer_family_index", "input_wait_ms"}
    assert m["optimizer_family_index"] == 2.0
    with pytest.raises(NonFiniteMetricError, match="samples_per_s"):
        training_metrics(loss=1.0, accuracy=0.5, gradient_norm=2.0, samples_per_s=math.inf, hook_latency_ms=0.1,
                         signals=sig)


def test_gradient_norm_and_accuracy() -> None:
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    c = torch.nn.Parameter(torch.zeros(1))  # no grad: ignored
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0])
    assert gradient_norm([a, b, c]) == 5.0 and gradient_norm([c]) == 0.0
    d = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # mixed dtypes: the per-tensor path
    d.grad = torch.tensor([12.0], dtype=torch.float64)
    assert gradient_norm([a, b, d]) == 13.0
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0], [0.0, 3.0]])
    assert batch_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75



def test_step_readings_read_loss_norm_and_accuracy_together() -> None:
    """The trainer's one read per step gives what the separate reads give (hand-computed)."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert step_readings(torch.tensor(1.5), [a, b], logits, labels) == (1.5, 5.0, 0.75)
    assert step_readings(torch.tensor(1.5), [a, b]) == (1.5, 5.0, None)  # no logits: no accuracy
    d = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # another dtype: the stack promotes it
    d.grad = torch.tensor([12.0], dtype=torch.float64)
    assert step_readings(torch.tensor(1.5), [a, b, d], logits, labels) == (1.5, 13.0, 0.75)
    inf = torch.nn.Parameter(torch.zeros(1))
    inf.grad = torch.tensor([float("inf")])
    assert step_readings(torch.tensor(1.5), [a, inf])[1] == float("inf")  # refused by the trainer
    loss, grad, _ = step_readings(torch.tensor(float("nan")), [torch.nn.Parameter(torch.zeros(1))])
    assert math.isnan(loss) and grad == 0.0  # a NaN loss is read as NaN (the trainer refuses the step)
    with pytest.raises(ValueError, match="empty batch"):
        step_readings(torch.tensor(1.0), [a], logits[:0], labels[:0])

def test_the_packet_carries_the_runs_planned_length() -> None:
    """Tamiyo grows no seed the run cannot finish: it reads how long the run is from the packet."""
    from esper.tolaria.packet import build_packet

    p = build_packet(run_id="r", step=300, epoch=14, epochs_total=16, steps_total=368, training_loss=0.4,
                     validation_loss=None, validation_accuracy=None, training_metrics={"loss": 0.4}, seed_states=[])
    assert (p.global_step, p.current_epoch, p.packet_id) == (300, 14, "r-300")
    assert p.training_metrics["epochs_total"] == 16.0 and p.training_metrics["steps_total"] == 368.0
    assert p.training_metrics["loss"] == pytest.approx(0.4)
