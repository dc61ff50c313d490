"""Every SAFE and EXPERIMENTAL design, on every slot it fits: shape, dtypes, determinism, one real training step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.karn import BlueprintTemplate, SlotShape, get_template
from esper.karn.designs import LoRAAdapter

from .cases import CONV, TRAINABLE, VECTOR, case_id, first_slot


def _build(template: BlueprintTemplate, slot: SlotShape, params: dict[str, float] | None = None) -> nn.Module:
    torch.manual_seed(0)
    return template.build(slot, params)


@pytest.mark.parametrize(("template", "slot"), TRAINABLE, ids=[case_id(c) for c in TRAINABLE])
class TestDesign:
    def test_output_keeps_the_slot_shape_in_float32_and_float64(self, template: BlueprintTemplate,
                                                               slot: SlotShape) -> None:
        module = _build(template, slot).eval()
        for dtype in (torch.float32, torch.float64):
            x = slot.example_input(8, dtype=dtype)
            y = module.to(dtype)(x)
            assert y.shape == x.shape == slot.batch_shape(8)
            assert y.dtype == dtype
            assert torch.isfinite(y).all()

    def test_eval_mode_is_deterministic(self, template: BlueprintTemplate, slot: SlotShape) -> None:
        module = _build(template, slot).eval()
        x = slot.example_input(8)
        assert torch.equal(module(x), module(x))

    def test_one_training_step_learns(self, template: BlueprintTemplate, slot: SlotShape) -> None:
        module = _build(template, slot).train()
        x, target = slot.example_input(8), slot.example_input(8)
        before = [p.detach().clone() for p in module.parameters()]
        loss = nn.functional.mse_loss(module(x), target)
        loss.backward()
        grads = [p.grad for p in module.parameters()]
        assert torch.isfinite(loss)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        torch.optim.SGD(module.parameters(), lr=0.1).step()
        assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
        assert nn.functional.mse_loss(module(x), target).item() != loss.item()

    def test_every_parameter_changes_the_module(self, template: BlueprintTemplate, slot: SlotShape) -> None:
        """Factories honour their knobs: min and max differ in size, train-mode output or gradients.

        Gradients matter for knobs that act only once training starts (LoRA's alpha scales a zero B).
        """
        x, target = slot.example_input(8), slot.example_input(8)
        for name, spec in template.params.items():
            seen = []
            for value in (spec.min_value, spec.max_value):
                module = _build(template, slot, {name: value}).train()
                torch.manual_seed(1)  # same dropout mask draw for both
                out = module(x)
                grads = torch.autograd.grad(nn.functional.mse_loss(out, target), list(module.parameters()))
                seen.append((out.detach(), torch.cat([g.reshape(-1) for g in grads])))
            (out_lo, grad_lo), (out_hi, grad_hi) = seen
            same_grads = grad_lo.shape == grad_hi.shape and torch.allclose(grad_lo, grad_hi)
            assert not (torch.allclose(out_lo, out_hi) and same_grads), name


def test_identity_passthrough_starts_as_identity_and_still_learns() -> None:
    """BP001's delta is all zeros at build: output == input, yet dL/dW = δ·xᵀ is nonzero from step one."""
    module = _build(get_template("BP001"), VECTOR)
    x = VECTOR.example_input(8)
    assert torch.equal(module(x), x)
    nn.functional.mse_loss(module(x), VECTOR.example_input(8)).backward()
    weight = next(module.parameters())
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("blueprint_id", ["BP005", "BP019"])
def test_zero_or_small_init_designs_start_near_identity(blueprint_id: str) -> None:
    template = get_template(blueprint_id)
    slot = first_slot(template)
    x = slot.example_input(8)
    params = {"init_scale": 0.0} if "init_scale" in template.params else None
    assert torch.allclose(_build(template, slot, params).eval()(x), x)


@pytest.mark.parametrize("blueprint_id", ["BP002", "BP003", "BP005", "BP009", "BP011"])
def test_dropout_acts_only_in_train_mode(blueprint_id: str) -> None:
    template = get_template(blueprint_id)
    slot = first_slot(template)
    module = _build(template, slot, {"dropout": 0.5, "init_scale": 1.0} if "init_scale" in template.params
                    else {"dropout": 0.5})
    if isinstance(module, LoRAAdapter):  # LoRA's up-projection is zero at build; give it weight so dropout shows
        nn.init.normal_(module.lora_b.weight)
    x = slot.example_input(8)
    assert not torch.equal(module.train()(x), module(x))
    assert torch.equal(module.eval()(x), module(x))


def test_conv_designs_mix_neighbouring_pixels() -> None:
    """A spatial design's output at one pixel depends on its neighbours; a per-pixel design's does not."""
    x = CONV.example_input(1).requires_grad_()
    for blueprint_id, spatial in (("BP007", True), ("BP016", True), ("BP002", False)):
        module = _build(get_template(blueprint_id), CONV, {"init_scale": 1.0})
        (grad,) = torch.autograd.grad(module(x)[0, :, 4, 4].sum(), x)
        neighbours = grad[0, :, 3:6, 3:6].abs().sum() - grad[0, :, 4, 4].abs().sum()
        assert (neighbours > 0) == spatial, blueprint_id
