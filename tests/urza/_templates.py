"""Tiny trusted templates for the artifact tests (Karn's real catalogue is tested in tests/karn)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from esper.karn.template import BlueprintTemplate, ParamSpec, SlotShape, UnknownBlueprintError
from esper.leyline import pb


def _mlp(slot: SlotShape, params: Mapping[str, float]) -> nn.Module:
    hidden = int(params["hidden"])
    return nn.Sequential(nn.Linear(slot.channels, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Dropout(params["dropout"]), nn.Linear(hidden, slot.channels))


def _conv(slot: SlotShape, params: Mapping[str, float]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(slot.channels, slot.channels, 3, padding=1), nn.GroupNorm(1, slot.channels),
                         nn.ReLU())


MLP = BlueprintTemplate(
    blueprint_id="TST001", name="test_mlp", tier=pb.BLUEPRINT_TIER_SAFE, description="test MLP adapter", risk=0.1,
    factory=_mlp, slot_kinds=frozenset({"vector"}),
    params={"hidden": ParamSpec(4, 64, 16, integer=True), "dropout": ParamSpec(0.0, 0.5, 0.1)},
)
CONV = BlueprintTemplate(
    blueprint_id="TST002", name="test_conv", tier=pb.BLUEPRINT_TIER_EXPERIMENTAL, description="test conv adapter",
    risk=0.3, factory=_conv, slot_kinds=frozenset({"conv"}),
)
TEMPLATES = {t.blueprint_id: t for t in (MLP, CONV)}


def lookup(blueprint_id: str) -> BlueprintTemplate:
    try:
        return TEMPLATES[blueprint_id]
    except KeyError:
        raise UnknownBlueprintError(blueprint_id) from None


def trained_module(template: BlueprintTemplate, slot: SlotShape, params: Mapping[str, float] | None = None,
                   *, seed: int = 0) -> nn.Module:
    """A module with non-default weights *and* buffers (BatchNorm running stats moved by a few steps)."""
    torch.manual_seed(seed)
    module = template.build(slot, params)
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(slot.example_input(16))
    return module.eval()


def descriptor(template: BlueprintTemplate) -> pb.BlueprintDescriptor:
    d = pb.BlueprintDescriptor(blueprint_id=template.blueprint_id, name=template.name, tier=template.tier,
                               risk=template.risk, description=template.description,
                               quarantine_only=template.quarantine_only)
    for name, spec in template.params.items():
        d.allowed_parameters[name].min_value = spec.min_value
        d.allowed_parameters[name].max_value = spec.max_value
    return d


def graph() -> pb.BlueprintGraph:
    return pb.BlueprintGraph(
        layers=[pb.BlueprintLayer(layer_type="linear", depth=0.0, parameter_count=1040.0),
                pb.BlueprintLayer(layer_type="linear", depth=1.0, latency_ms=0.02)],
        activations=[pb.BlueprintActivation(activation_type="gelu", saturation=0.0)],
        parameters=[pb.BlueprintParameter(name="hidden", min_value=4, max_value=64, default_value=16)],
        adjacency=[pb.LayerEdge(src=0, dst=1)], monitored_layers=[1], blend_methods=["CONVEX"],
    )
