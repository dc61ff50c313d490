"""HIGH_RISK hazards: each builds and runs, and each misbehaves in its own measurable way (no timing asserts)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esper.karn import BlueprintTemplate, SlotShape, get_template
from esper.karn.hazards import MemoryLeak

from .cases import CONV, HAZARDS, VECTOR


def _build(blueprint_id: str, params: dict[str, float] | None = None, slot: SlotShape = VECTOR) -> nn.Module:
    torch.manual_seed(0)
    return get_template(blueprint_id).build(slot, params)


def _input_gain(module: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """‖∂L/∂x‖ and ‖∂L/∂θ‖ relative to ‖∂L/∂y‖ for a random upstream gradient."""
    x = x.clone().requires_grad_()
    y = module(x)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *module.parameters()], upstream)
    params = torch.cat([g.reshape(-1) for g in grads[1:]])
    return (grads[0].norm() / upstream.norm()).item(), (params.norm() / upstream.norm()).item()


@pytest.mark.parametrize("template", HAZARDS, ids=[t.name for t in HAZARDS])
@pytest.mark.parametrize("slot", [VECTOR, CONV], ids=["v64", "c16x8x8"])
def test_hazard_builds_and_runs_one_forward(template: BlueprintTemplate, slot: SlotShape) -> None:
    torch.manual_seed(0)
    module = template.build(slot).eval()
    x = slot.example_input(8)
    with torch.no_grad():
        y = module(x)
    assert y.shape == x.shape
    copy.deepcopy(module)  # rebuildable state only: no locks or generators held


def test_exploding_gradient_amplifies_gradients_over_a_unit_gain_stack() -> None:
    x = VECTOR.example_input(8)
    hazard_x, hazard_p = _input_gain(_build("BP043"), x)
    unit_x, unit_p = _input_gain(_build("BP043", {"gain": 1.0}), x)
    assert hazard_x > 1e3 * unit_x and hazard_p > 1e3 * unit_p
    assert torch.isfinite(_build("BP043")(x)).all()


def test_vanishing_gradient_starves_inputs_and_parameters() -> None:
    x = VECTOR.example_input(8)
    hazard_x, hazard_p = _input_gain(_build("BP044"), x)
    torch.manual_seed(0)
    normal_x, normal_p = _input_gain(nn.Linear(64, 64), x)
    assert 0 < hazard_x < 1e-6 * normal_x
    assert 0 < hazard_p < 1e-6 * normal_p


def test_nan_injection_poisons_every_sample_on_every_call() -> None:
    module = _build("BP045").eval()
    for _ in range(5):
        y = module(VECTOR.example_input(8))
        assert torch.isnan(y).any(dim=1).all()
        assert not torch.isnan(y).all()


def test_memory_leak_grows_linearly_up_to_its_cap() -> None:
    module = _build("BP047", {"leak_kib": 64, "cap_mib": 1})
    assert isinstance(module, MemoryLeak)
    x = VECTOR.example_input(8)
    held = []
    for _ in range(20):
        module(x)
        held.append(module.retained_bytes)
    assert held[:16] == [64 * 1024 * (i + 1) for i in range(16)]  # 16 x 64 KiB fills 1 MiB exactly
    assert held[16:] == [1024 * 1024] * 4


@pytest.mark.parametrize("blueprint_id", ["BP049", "BP050"])
def test_identical_inputs_give_different_outputs_in_eval_mode(blueprint_id: str) -> None:
    module = _build(blueprint_id).eval()
    x = VECTOR.example_input(8)
    with torch.no_grad():
        first, second = module(x), module(x)
    assert (first - second).abs().mean() > 0.5 * x.std()


def test_adversarial_noise_dwarfs_the_signal() -> None:
    module = _build("BP050").eval()
    x = VECTOR.example_input(8)
    with torch.no_grad():
        spread = torch.stack([module(x) for _ in range(4)]).std(dim=0)
    assert spread.mean() > 5 * x.std()


@pytest.mark.parametrize("blueprint_id", ["BP046", "BP048"])
def test_latency_hazards_compute_what_a_plain_linear_does(blueprint_id: str) -> None:
    """Their symptom is time alone (measured by Urabrask, not here): outputs stay finite and deterministic."""
    module = _build(blueprint_id, {"max_ms": 1.0} if blueprint_id == "BP046" else {"wait_ms": 1.0}).eval()
    x = VECTOR.example_input(8)
    with torch.no_grad():
        assert torch.equal(module(x), module(x))
        assert torch.isfinite(module(x)).all()
