"""Blend math checked against hand computation on tiny tensors, and the alpha schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from esper.kasmina import (
    AlphaSchedule,
    BlendSpec,
    apply_blend,
    blend_channel,
    blend_confidence,
    blend_convex,
    blend_residual,
    confidence_gate,
    confidence_gate_value,
)

HOST = torch.tensor([[1.0, 2.0]])
SEED = torch.tensor([[3.0, 5.0]])


def close(a: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(a, torch.tensor(expected), rtol=0, atol=1e-6)


def test_convex() -> None:
    # 0.25·3 + 0.75·1 = 1.5 ; 0.25·5 + 0.75·2 = 2.75
    close(blend_convex(HOST, SEED, 0.25), [[1.5, 2.75]])
    close(blend_convex(HOST, SEED, 0.0), [[1.0, 2.0]])
    close(blend_convex(HOST, SEED, 1.0), [[3.0, 5.0]])
    close(blend_convex(HOST, SEED, 1.7), [[3.0, 5.0]])  # clamped to 1


def test_residual() -> None:
    # 1 + 0.5·3 = 2.5 ; 2 + 0.5·5 = 4.5
    close(blend_residual(HOST, SEED, 0.5), [[2.5, 4.5]])


def test_channel() -> None:
    # a = 0.5·[1.0, 0.2] = [0.5, 0.1]: 0.5·3 + 0.5·1 = 2.0 ; 0.1·5 + 0.9·2 = 2.3
    close(blend_channel(HOST, SEED, 0.5, torch.tensor([1.0, 0.2])), [[2.0, 2.3]])
    # conv activations (N, C, H, W): the vector applies along dim 1
    host = torch.zeros(1, 2, 2, 2)
    seed = torch.ones(1, 2, 2, 2)
    out = blend_channel(host, seed, 1.0, torch.tensor([0.25, 0.75]))
    assert torch.equal(out[0, 0], torch.full((2, 2), 0.25)) and torch.equal(out[0, 1], torch.full((2, 2), 0.75))
    with pytest.raises(ValueError):
        blend_channel(HOST, SEED, 0.5, torch.tensor([1.0, 0.2, 0.3]))


def test_confidence_gate_and_blend() -> None:
    # logits [2, 1, 0.5]: margin 1 → sigmoid(4·(1 - 0.2)) = sigmoid(3.2)
    gate = 1.0 / (1.0 + math.exp(-3.2))
    assert float(confidence_gate(torch.tensor([2.0, 1.0, 0.5]))) == pytest.approx(gate, abs=1e-6)
    assert confidence_gate_value([0.5, 2.0, 1.0]) == pytest.approx(gate, abs=1e-12)
    a = 0.5 * gate  # alpha·gate
    close(blend_confidence(HOST, SEED, 0.5, gate), [[1 + 2 * a, 2 + 3 * a]])
    # clamped to [lo, hi]
    close(blend_confidence(HOST, SEED, 0.5, gate, alpha_hi=0.3), [[1 + 2 * 0.3, 2 + 3 * 0.3]])
    close(blend_confidence(HOST, SEED, 0.5, 0.01, alpha_lo=0.2), [[1 + 2 * 0.2, 2 + 3 * 0.2]])
    # per-sample gate from a [N, K] batch of logits
    host, seed = torch.zeros(2, 2), torch.ones(2, 2)
    g = confidence_gate(torch.tensor([[3.0, 0.0], [0.0, 0.0]]), k=1.0, tau=0.0)  # sigmoid(3), sigmoid(0)
    out = blend_confidence(host, seed, 1.0, g)
    torch.testing.assert_close(out[:, 0], torch.tensor([1 / (1 + math.exp(-3)), 0.5]))
    with pytest.raises(ValueError):
        confidence_gate(torch.tensor([1.0]))


def test_apply_blend_dispatches_per_spec() -> None:
    close(apply_blend(HOST, SEED, 0.25, BlendSpec()), [[1.5, 2.75]])
    close(apply_blend(HOST, SEED, 0.5, BlendSpec(mode="RESIDUAL")), [[2.5, 4.5]])
    close(apply_blend(HOST, SEED, 0.5, BlendSpec(mode="CHANNEL", alpha_vec=(1.0, 0.2))), [[2.0, 2.3]])
    spec = BlendSpec(mode="CONFIDENCE", gate=0.5, alpha_lo=0.0, alpha_hi=1.0)
    close(apply_blend(HOST, SEED, 0.5, spec), [[1.5, 2.75]])  # a = 0.25
    assert spec.effective_alpha(0.5) == 0.25 and BlendSpec().effective_alpha(2.0) == 1.0
    # CHANNEL: the mean of the per-channel weights, (0.5·1.0 + 0.5·0.2) / 2
    assert BlendSpec(mode="CHANNEL", alpha_vec=(1.0, 0.2)).effective_alpha(0.5) == pytest.approx(0.3)


BAD = torch.tensor([[math.inf, math.nan]])  # a diverged seed's output


def test_a_seed_at_weight_zero_leaves_the_host_exactly() -> None:
    # 0·inf is NaN: a weight-0 seed must not turn the host's activations into NaN
    assert torch.equal(blend_convex(HOST, BAD, 0.0), HOST)
    assert torch.equal(blend_convex(HOST, BAD, -0.5), HOST)  # clamped to 0
    assert torch.equal(blend_residual(HOST, BAD, 0.0), HOST)
    assert torch.equal(blend_channel(HOST, BAD, 0.0, torch.tensor([0.5, 1.0])), HOST)
    assert torch.equal(blend_confidence(HOST, BAD, 1.0, 0.0), HOST)  # a float gate of 0
    assert torch.equal(blend_confidence(HOST, BAD, 0.0, torch.tensor([0.7])), HOST)  # per-sample, alpha 0
    assert torch.equal(apply_blend(HOST, BAD, 1.0, BlendSpec(mode="CONFIDENCE", gate=0.0)), HOST)
    # weighed in (alpha > 0), a finite seed blends as before: 0.5·5 + 0.5·2 = 3.5 in channel 1
    mixed = blend_channel(HOST, torch.tensor([[3.0, 5.0]]), 1.0, torch.tensor([0.0, 0.5]))
    assert torch.equal(mixed, torch.tensor([[1.0, 3.5]]))
    assert not torch.isfinite(blend_residual(HOST, BAD, 0.5)).any()  # mixed in: non-finite, refused


def test_a_seed_at_weight_zero_still_receives_a_zero_gradient() -> None:
    # G1 culls a trained seed whose parameters saw no gradient at all: alpha 0 (a linear schedule's
    # first blend step) must give them a gradient of 0, not none; the host branch keeps its gradient 1.
    w = torch.tensor(2.0, requires_grad=True)
    host = torch.tensor([[1.0, 2.0]], requires_grad=True)
    blends: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        lambda h, s: blend_convex(h, s, 0.0), lambda h, s: blend_residual(h, s, 0.0),
        lambda h, s: blend_channel(h, s, 0.0, torch.tensor([1.0, 1.0])),
        lambda h, s: blend_confidence(h, s, 0.0, torch.tensor([0.9]))]
    for blend in blends:
        w.grad, host.grad = None, None
        blend(host, w * host.detach()).sum().backward()
        assert w.grad is not None and float(w.grad) == 0.0
        assert host.grad is not None and torch.equal(host.grad, torch.ones(1, 2))


def test_tanh_schedule_is_the_prototypes() -> None:
    s = AlphaSchedule()  # tanh, 20 steps, 0 → 1
    for step in range(21):
        assert s.value(step) == pytest.approx(0.5 * (1 + math.tanh(0.5 * (step - 10) / 2)), abs=1e-12)
    assert s.value(10) == 0.5 and not s.done(19) and s.done(20)


def test_other_schedules() -> None:
    linear = AlphaSchedule("linear", total_steps=10)
    assert [linear.value(i) for i in (0, 5, 10, 12)] == [0.0, 0.5, 1.0, 1.0]
    cosine = AlphaSchedule("cosine", total_steps=10)
    assert cosine.value(5) == pytest.approx(0.5) and cosine.value(0) == 0.0 and cosine.value(10) == 1.0
    hold = AlphaSchedule("warmup_hold", total_steps=10)
    assert [hold.value(i) for i in (0, 2, 5, 8)] == [0.0, 0.4, 1.0, 1.0]
    # Tamiyo's start/end fractions place the ramp inside the window; alpha0 is where it starts
    part = AlphaSchedule("linear", total_steps=10, start=0.2, end=0.6, alpha_start=0.1)
    assert [part.value(i) for i in (0, 2, 4, 6, 9)] == pytest.approx([0.1, 0.1, 0.55, 1.0, 1.0])
    step = AlphaSchedule("linear", total_steps=10, start=0.5, end=0.5)
    assert (step.value(4), step.value(5)) == (0.0, 1.0)
    with pytest.raises(ValueError):
        AlphaSchedule("linear", start=0.8, end=0.2)
