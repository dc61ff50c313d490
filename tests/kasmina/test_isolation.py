"""Gradient isolation: host gradients untouched by a TRAINING seed, the host·seed dot product ≤ 1e-6
while training and blending, and the deliberate leak makes it exceed the threshold."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina import BlendSpec, SeedSlot
from esper.kasmina.gates import GradientObservation, gate_g1_gradient_health
from tests.kasmina._helpers import TinyHost, data

THRESHOLD = 1e-6


def _seed(width: int = 8) -> nn.Module:
    """A seed whose output differs from its input (so a leak, if any, carries real gradient)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))


def _host_grads(model: TinyHost, *, with_aux: bool) -> dict[str, torch.Tensor]:
    x, y = data()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    aux = model.slot.pop_auxiliary_loss()
    if with_aux:
        assert aux is not None
        loss = loss + aux
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("slot.") and p.grad is not None}


def _pair() -> tuple[TinyHost, TinyHost]:
    torch.manual_seed(0)
    plain = TinyHost()
    return plain, copy.deepcopy(plain)


def test_training_seed_leaves_host_gradients_identical() -> None:
    plain, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec())
    expected = _host_grads(plain, with_aux=False)
    got = _host_grads(seeded, with_aux=True)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    stats = seeded.slot.collect()
    assert stats.trained and stats.grads_observed and stats.grad_norm > 0  # the seed did learn something
    assert abs(stats.isolation.dot) <= THRESHOLD and stats.isolation.seed_norm == 0.0
    assert stats.isolation.host_norm > 0 and stats.isolation.samples == 1
    assert len(stats.local_losses) == 1 and stats.local_losses[0] > 0


def test_training_output_is_the_hosts() -> None:
    plain, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec())
    x, _ = data()
    assert torch.equal(plain(x), seeded(x))
    seeded.eval()
    assert torch.equal(plain(x), seeded(x))


def test_blending_isolation_holds_and_the_seed_learns_from_the_task() -> None:
    _, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec())
    seeded.slot.start_blending(0.4)
    _host_grads(seeded, with_aux=False)
    stats = seeded.slot.collect()
    assert stats.grads_observed and stats.grad_norm > 0
    assert abs(stats.isolation.dot) <= THRESHOLD and stats.isolation.seed_norm == 0.0
    # the host branch still gets (1 - alpha) of the gradient arriving at the slot
    assert stats.isolation.host_norm > 0


@pytest.mark.parametrize("mode", ["train", "blend"])
def test_deliberate_leak_is_detected(mode: str) -> None:
    plain, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec())
    if mode == "blend":
        seeded.slot.start_blending(0.4)
    seeded.slot.leak_gradients = True
    got = _host_grads(seeded, with_aux=mode == "train")
    stats = seeded.slot.collect()
    assert abs(stats.isolation.dot) > THRESHOLD and stats.isolation.seed_norm > 0
    if mode == "train":  # the leak changes the host's gradients: exactly what isolation forbids
        expected = _host_grads(plain, with_aux=False)
        assert not all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_a_leak_the_dot_cannot_see_still_fails_g1(scale: float) -> None:
    """At alpha 1 (SHADOWING, PROBATIONARY) the host branch carries no gradient, so the dot is exactly 0
    while the seed pushes gradient into the host; and the dot shrinks with the loss squared. The seed
    branch's own gradient is exactly 0 when isolated, so G1 judges by it too."""
    plain, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec())
    seeded.slot.start_blending(1.0 if scale == 1.0 else 0.4)
    seeded.slot.leak_gradients = True
    x, y = data()
    seeded.zero_grad(set_to_none=True)
    (scale * F.cross_entropy(seeded(x), y)).backward()
    stats = seeded.slot.collect()
    assert abs(stats.isolation.dot) <= THRESHOLD and stats.isolation.seed_norm > 0  # the dot says "holds"
    assert not stats.isolation.holds()
    g1 = gate_g1_gradient_health(GradientObservation(True, stats.grad_norm, stats.isolation.dot,
                                                     stats.isolation.seed_norm))
    assert (g1.passed, g1.reason) == (False, "isolation_violation")
    isolated = copy.deepcopy(plain)
    isolated.slot.attach(_seed(), BlendSpec())
    isolated.slot.start_blending(1.0)
    isolated.zero_grad(set_to_none=True)
    F.cross_entropy(isolated(x), y).backward()
    held = isolated.slot.collect().isolation
    assert held.seed_norm == 0.0 and held.holds()


def test_fossil_is_part_of_the_host() -> None:
    _, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec())
    seeded.slot.fossilize(1.0)
    assert seeded.slot.hooks == 0
    x, y = data()
    F.cross_entropy(seeded(x), y).backward()
    # gradients reach the host layer upstream *through* the seed (its input is no longer detached)
    assert seeded.fc1.weight.grad is not None and seeded.fc1.weight.grad.abs().sum() > 0
    assert seeded.slot.collect().isolation.samples == 0  # not monitored any more


def test_detach_and_bypass() -> None:
    plain, seeded = _pair()
    slot: SeedSlot = seeded.slot
    slot.attach(_seed(), BlendSpec())
    slot.start_blending(1.0)
    x, _ = data()
    assert not torch.equal(plain(x), seeded(x))
    slot.bypass = True
    assert torch.equal(plain(x), seeded(x))
    slot.bypass = False
    assert slot.hooks > 0
    assert slot.detach_seed() is not None
    assert slot.seed is None and slot.hooks == 0 and slot.mode == "host"
    assert torch.equal(plain(x), seeded(x))


@pytest.mark.parametrize("mode", ["CONVEX", "RESIDUAL"])
def test_local_objective_makes_the_blend_start_at_the_host(mode: str) -> None:
    """Isolated training drives the seed toward what leaves its blend equal to the host: s ≈ h for
    CONVEX (y = a·s + (1-a)·h), s ≈ 0 for RESIDUAL (y = h + a·s; reproducing h would double it)."""
    _, seeded = _pair()
    seeded.slot.attach(_seed(), BlendSpec(mode=mode))  # type: ignore[arg-type]
    x, _ = data()
    h = seeded.act(seeded.fc1(x)).detach()
    target = torch.zeros_like(h) if mode == "RESIDUAL" else h
    seed = seeded.slot.seed
    assert seed is not None
    before = F.mse_loss(seed(h), target).item()
    opt = torch.optim.Adam(seed.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        seeded(x)
        aux = seeded.slot.pop_auxiliary_loss()
        assert aux is not None
        aux.backward()
        opt.step()
    after = F.mse_loss(seed(h), target).item()
    assert after < 0.1 * before
    blended = F.mse_loss(_blend_at_one(mode, h, seed(h)), h).item()
    assert blended < 0.1 * before  # at alpha = 1 the blend is (nearly) the host


def _blend_at_one(mode: str, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return h + s if mode == "RESIDUAL" else s
