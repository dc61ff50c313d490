"""Leyline views of a template: its `BlueprintDescriptor`, and a `BlueprintGraph` read off a real module.

The graph feeds Tamiyo's layer / activation / parameter nodes, so it describes the module actually
built, not a hand-written summary. Unknown values stay unset: the graph's numeric fields are proto3
`optional`, and an absent field is masked by the policy whereas a 0 would be read as a measurement.

Approximations, by design:
- A *layer* is any module holding parameters directly (Linear, Conv, norms, custom units) or a known
  parameter-free layer (pooling), in registration order. Parameter counts therefore sum to the module's.
- `adjacency` chains the layers in registration order (i → i+1). Templates register submodules in
  data-flow order, so this is exact for sequential designs and a linearisation of branching ones
  (GLU's value/gate, attention's q/k/v, experts).
- A layer's `activation` is the first activation module registered after it and before the next
  layer; `dropout` likewise from an `nn.Dropout`. Functional calls (e.g. `torch.sin`) are invisible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from esper.karn.template import BlueprintTemplate, SlotShape
from esper.leyline import pb


class ActivationPrior(NamedTuple):
    """Priors for one activation; None where we have no defensible number (the field stays unset).

    saturation: P(|f'(x)| < 0.1·max|f'|) for x ~ N(0, 3²), pre-activations with a broad spread.
    gradient_flow: sqrt(E[f'(x)²]) for x ~ N(0, 1); 1 for the identity.
    cost: rough elementwise cost relative to ReLU (a prior, not a measurement).
    nonlinearity: 1 - corr(x, f(x))² for x ~ N(0, 1); 0 for any affine map.
    """

    saturation: float | None
    gradient_flow: float | None
    cost: float | None
    nonlinearity: float | None


# Computed once numerically (2M samples, float64) per the definitions above; see tests/karn/test_graph.py.
ACTIVATION_PRIORS: Mapping[str, ActivationPrior] = {
    "relu": ActivationPrior(0.5, 0.71, 1.0, 0.27),
    "relu6": ActivationPrior(0.52, 0.71, 1.0, 0.27),
    "leakyrelu": ActivationPrior(0.5, 0.71, 1.0, 0.26),
    "gelu": ActivationPrior(0.36, 0.68, 5.0, 0.28),
    "silu": ActivationPrior(0.38, 0.62, 4.0, 0.2),
    "sigmoid": ActivationPrior(0.23, 0.21, 3.0, 0.02),
    "tanh": ActivationPrior(0.54, 0.68, 3.0, 0.07),
    "elu": ActivationPrior(0.22, 0.82, 3.0, 0.06),
    "softplus": ActivationPrior(0.23, 0.54, 4.0, 0.08),
    "hardswish": ActivationPrior(0.26, 0.6, 2.0, 0.18),
    "hardsigmoid": ActivationPrior(0.32, 0.17, 1.5, 0.0),
    "mish": ActivationPrior(0.33, 0.69, 6.0, 0.19),
}

_PARAMETER_FREE_LAYERS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def descriptor(template: BlueprintTemplate) -> pb.BlueprintDescriptor:
    """The catalogue row Urza serves and Tamiyo scores (stage 0: a template, not a seed)."""
    return pb.BlueprintDescriptor(
        blueprint_id=template.blueprint_id,
        name=template.name,
        tier=template.tier,
        allowed_parameters={name: pb.ParameterRange(min_value=spec.min_value, max_value=spec.max_value)
                            for name, spec in template.params.items()},
        risk=template.risk,
        stage=0,
        quarantine_only=template.quarantine_only,
        approval_required=template.approval_required,
        description=template.description,
    )


def is_activation(module: nn.Module) -> bool:
    """A parameter-free leaf from torch's activation zoo (ReLU, GELU, Softmax, ...)."""
    return (type(module).__module__ == "torch.nn.modules.activation"
            and next(module.children(), None) is None and next(module.parameters(), None) is None)


def is_layer(module: nn.Module) -> bool:
    """Holds parameters directly, or is a known parameter-free layer (pooling)."""
    return next(module.parameters(recurse=False), None) is not None or isinstance(module, _PARAMETER_FREE_LAYERS)


def _layer(module: nn.Module, depth: int) -> pb.BlueprintLayer:
    own = list(module.parameters(recurse=False))
    layer = pb.BlueprintLayer(layer_type=type(module).__name__.lower(), depth=float(depth),
                              parameter_count=float(sum(p.numel() for p in own)))
    weight = getattr(module, "weight", None)
    with torch.no_grad():
        if isinstance(weight, torch.Tensor):
            layer.weight_norm = float(weight.detach().norm())
        elif own:
            layer.weight_norm = float(torch.cat([p.detach().reshape(-1) for p in own]).norm())
    return layer


def _activation(name: str) -> pb.BlueprintActivation:
    act = pb.BlueprintActivation(activation_type=name)
    prior = ACTIVATION_PRIORS.get(name)
    if prior is not None:
        for field, value in prior._asdict().items():
            if value is not None:
                setattr(act, field, value)
    return act


def blueprint_graph(template: BlueprintTemplate, slot: SlotShape, params: Mapping[str, float] | None = None,
                    module: nn.Module | None = None) -> pb.BlueprintGraph:
    """Introspect `module` (built fresh from torch's global RNG when not given) into a BlueprintGraph.

    `BlueprintParameter.default_value` is the template's default, whatever `params` chose.
    """
    built = module if module is not None else template.build(slot, params)
    layers: list[pb.BlueprintLayer] = []
    activations: dict[str, pb.BlueprintActivation] = {}
    for sub in built.modules():
        if is_layer(sub):
            layers.append(_layer(sub, len(layers)))
        elif is_activation(sub):
            name = type(sub).__name__.lower()
            activations.setdefault(name, _activation(name))
            if layers and not layers[-1].activation:
                layers[-1].activation = name
        elif isinstance(sub, nn.Dropout) and layers and not layers[-1].HasField("dropout"):
            layers[-1].dropout = sub.p
    graph = pb.BlueprintGraph(
        layers=layers,
        activations=list(activations.values()),
        parameters=[pb.BlueprintParameter(name=name, min_value=spec.min_value, max_value=spec.max_value,
                                          default_value=spec.default) for name, spec in template.params.items()],
        adjacency=[pb.LayerEdge(src=i, dst=i + 1) for i in range(len(layers) - 1)],
        monitored_layers=sorted({0, len(layers) - 1}) if layers else [],
        blend_methods=list(template.blend_methods),
        candidate_score=1.0 - template.risk,
    )
    return graph
