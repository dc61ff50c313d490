"""Host network: slot shapes, slot replacement changes outputs, bad modules are refused, seeded init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.karn import template as karn
from esper.karn.catalogue import templates_for
from esper.leyline import pb
from esper.tolaria.data import load_digits_dataset
from esper.tolaria.host import HostNetwork, SlotMismatchError, build_host
from tests.tolaria._helpers import META, make_model


class AddOne(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 1.0


def test_slot_shapes_depths_and_names() -> None:
    host = HostNetwork(64, 10)
    assert host.slot_names == ("hidden1", "hidden2")
    assert host.slot_shapes() == {"hidden1": karn.SlotShape(32), "hidden2": karn.SlotShape(32)}
    assert host.slot_depths() == {"hidden1": 1, "hidden2": 2}
    assert all(s.kind == "vector" for s in host.slot_shapes().values())
    wide = HostNetwork(64, 10, hidden=(16, 24, 8))
    assert {n: s.channels for n, s in wide.slot_shapes().items()} == {"hidden1": 16, "hidden2": 24, "hidden3": 8}
    assert wide(torch.randn(5, 8, 8)).shape == (5, 10)  # images are flattened


def test_the_input_slot_comes_first_and_is_as_wide_as_the_features() -> None:
    host = HostNetwork(64, 10, hidden=(4,), input_slot=True)
    assert host.slot_names == ("input", "hidden1")
    assert host.slot_shapes() == {"input": karn.SlotShape(64), "hidden1": karn.SlotShape(4)}
    assert host.slot_depths() == {"input": 1, "hidden1": 2}
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = host(x)
    host.set_slot("input", AddOne())
    after = host(x)
    torch.testing.assert_close(after, host.head(torch.relu(host.layers[0](x.flatten(1) + 1.0))))
    assert not torch.allclose(before, after)
    with pytest.raises(SlotMismatchError):  # the input slot takes 64 features, not the hidden width
        host.set_slot("input", nn.Linear(4, 4))
    assert [n for n, _ in host.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "head.weight", "head.bias"]  # AddOne has none: host only


def test_settings_shape_the_trainer_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from esper.tolaria.settings import TolariaSettings
    from esper.tolaria.trainer import Trainer

    s = TolariaSettings(var_dir=tmp_path, epochs=1, hidden_width=4, hidden_layers=1, input_slot=True)
    assert s.host_hidden() == (4,)
    trainer = Trainer(s, bus=None)
    assert trainer.host.slot_names == ("input", "hidden1") and trainer.host.hidden == (4,)
    assert TolariaSettings(var_dir=tmp_path, hidden_width=8, hidden_layers=3).host_hidden() == (8, 8, 8)


def test_setting_a_slot_changes_outputs_and_clearing_restores_them() -> None:
    host = make_model()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    before = host(x)
    previous = host.set_slot("hidden1", AddOne())
    assert isinstance(previous, nn.Identity) and host.occupied("hidden1") and not host.occupied("hidden2")
    after = host(x)
    assert not torch.allclose(before, after)
    host.clear_slot("hidden1")
    assert torch.equal(host(x), before)


def test_slot_modules_is_a_live_view_of_the_slots() -> None:
    host = make_model()
    view = host.slot_modules
    assert list(view) == list(host.slot_names)
    added = AddOne()
    host.set_slot("hidden2", added)
    assert view["hidden2"] is added and dict(view) == dict(host.slots.items())


def test_slot_modules_are_part_of_the_state_dict_but_not_host_parameters() -> None:
    host = make_model()
    seed = nn.Linear(6, 6)
    host.set_slot("hidden1", seed)
    assert {"slots.hidden1.weight", "slots.hidden1.bias"} <= set(host.state_dict())
    host_ids = {id(p) for p in host.host_parameters()}
    assert id(seed.weight) not in host_ids and len(host_ids) == 6  # 2 hidden layers + head, weight and bias
    assert [id(p) for p in host.slot_parameters("hidden1")] == [id(seed.weight), id(seed.bias)]
    out = host(torch.randn(3, 8)).sum()
    out.backward()
    assert seed.weight.grad is not None  # the slot is on the forward path


def test_every_safe_karn_template_fits_the_vector_slots() -> None:
    host = make_model()
    shape = host.slot_shapes()["hidden2"]
    safe = templates_for(shape, pb.BLUEPRINT_TIER_SAFE)
    assert safe
    for template in safe:
        host.set_slot("hidden2", template.build(shape))  # the probe checks (N, 5) -> (N, 5)
        assert host(torch.randn(2, 8)).shape == (2, 3)


def test_bad_slot_modules_and_names_are_refused() -> None:
    host = make_model()
    with pytest.raises(SlotMismatchError, match="hidden1"):
        host.set_slot("hidden1", nn.Linear(6, 4))  # wrong width out
    with pytest.raises(SlotMismatchError, match="probe failed"):
        host.set_slot("hidden1", nn.Linear(5, 6))  # wrong width in
    assert not host.occupied("hidden1")
    with pytest.raises(KeyError, match="unknown slot"):
        host.set_slot("hidden9", nn.Identity())
    bn = nn.BatchNorm1d(6)
    host.set_slot("hidden1", bn)  # the probe ran in eval mode and restored the training flag
    assert bn.training and int(bn.num_batches_tracked) == 0


def test_seeded_hosts_are_identical_and_leave_the_global_rng_alone() -> None:
    meta = load_digits_dataset(seed=0).meta
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_host(meta, seed=5), build_host(meta, seed=5)
    assert torch.equal(torch.rand(1), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = build_host(META, seed=6, hidden=(6, 5))
    assert not torch.equal(c.head.weight, make_model(seed=5).head.weight)
