"""Descriptors and graphs: fields per tier, introspection of the real module, unset-means-unknown."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.karn import ACTIVATION_PRIORS, CATALOGUE, BlueprintTemplate, blueprint_graph, descriptor, get_template
from esper.karn.designs import ResidualMLP
from esper.karn.graph import is_layer
from esper.leyline import pb

from .cases import CONV, VECTOR, first_slot

ALL = list(CATALOGUE.values())


@pytest.mark.parametrize("template", ALL, ids=list(CATALOGUE))
def test_descriptor_mirrors_the_template(template: BlueprintTemplate) -> None:
    d = descriptor(template)
    assert (d.blueprint_id, d.name, d.tier, d.description) == (
        template.blueprint_id, template.name, template.tier, template.description)
    assert d.risk == pytest.approx(template.risk)
    assert d.stage == 0
    assert d.quarantine_only == (template.tier == pb.BLUEPRINT_TIER_HIGH_RISK)
    assert d.approval_required == (template.tier == pb.BLUEPRINT_TIER_HIGH_RISK)
    assert set(d.allowed_parameters) == set(template.params)
    for name, spec in template.params.items():
        assert d.allowed_parameters[name].min_value == pytest.approx(spec.min_value)
        assert d.allowed_parameters[name].max_value == pytest.approx(spec.max_value)
    assert pb.BlueprintDescriptor.FromString(d.SerializeToString()) == d


@pytest.mark.parametrize("template", ALL, ids=list(CATALOGUE))
def test_graph_layers_account_for_every_parameter(template: BlueprintTemplate) -> None:
    slot = first_slot(template)
    torch.manual_seed(0)
    module = template.build(slot)
    graph = blueprint_graph(template, slot, module=module)
    owners = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    assert len(graph.layers) == len(owners)  # no pooling layers in the catalogue today
    assert sum(layer.parameter_count for layer in graph.layers) == sum(p.numel() for p in module.parameters())
    assert [layer.depth for layer in graph.layers] == list(range(len(graph.layers)))
    assert [(e.src, e.dst) for e in graph.adjacency] == [(i, i + 1) for i in range(len(graph.layers) - 1)]
    assert list(graph.monitored_layers) == sorted({0, len(graph.layers) - 1})
    assert list(graph.blend_methods) == list(template.blend_methods)
    assert graph.candidate_score == pytest.approx(1 - template.risk)
    assert [p.name for p in graph.parameters] == list(template.params)
    for param, spec in zip(graph.parameters, template.params.values(), strict=True):
        assert (param.min_value, param.max_value, param.default_value) == pytest.approx(
            (spec.min_value, spec.max_value, spec.default))
    for layer in graph.layers:
        assert not layer.HasField("latency_ms") and not layer.HasField("gradient_norm")  # not measured here


def test_simple_graph_reads_types_activations_dropout_and_norms() -> None:
    template = get_template("BP002")
    torch.manual_seed(0)
    module = template.build(VECTOR, {"dropout": 0.25, "hidden_ratio": 1.0})
    graph = blueprint_graph(template, VECTOR, module=module)
    fc1, fc2 = graph.layers
    assert (fc1.layer_type, fc1.activation, fc1.parameter_count) == ("linear", "gelu", 64 * 64 + 64)
    assert fc1.dropout == pytest.approx(0.25)
    assert not fc2.HasField("dropout") and fc2.activation == ""
    assert isinstance(module, ResidualMLP)
    assert fc1.weight_norm == pytest.approx(module.fc1.weight.detach().norm().item())
    assert [a.activation_type for a in graph.activations] == ["gelu"]


def test_zero_weight_norm_is_present_not_absent() -> None:
    graph = blueprint_graph(get_template("BP001"), VECTOR)
    (delta,) = graph.layers
    assert delta.HasField("weight_norm") and delta.weight_norm == 0.0


def test_unknown_activation_priors_stay_unset() -> None:
    graph = blueprint_graph(get_template("BP013"), VECTOR)  # softmax router: no prior
    by_type = {a.activation_type: a for a in graph.activations}
    assert set(by_type) == {"softmax", "gelu"}
    softmax = by_type["softmax"]
    assert not any(softmax.HasField(f) for f in ("saturation", "gradient_flow", "cost", "nonlinearity"))
    assert by_type["gelu"].HasField("saturation")
    assert by_type["gelu"].gradient_flow == pytest.approx(ACTIVATION_PRIORS["gelu"].gradient_flow)


def test_graph_builds_its_own_module_with_given_params() -> None:
    template = get_template("BP003")
    graph = blueprint_graph(template, CONV, {"reduction": 8})
    assert [layer.parameter_count for layer in graph.layers] == [16 * 2 + 2, 2 * 16 + 16]


def test_parameter_free_layers_are_recognised() -> None:
    assert is_layer(nn.AdaptiveAvgPool2d(1)) and not is_layer(nn.ReLU()) and not is_layer(nn.Dropout())


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "gelu"])
def test_activation_priors_match_their_documented_definitions(name: str) -> None:
    """Recompute the table's numbers (see ActivationPrior) on 400k samples."""
    fn = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": nn.functional.gelu}[name]
    gen = torch.Generator().manual_seed(0)

    def slope(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x).sum(), x)
        return g

    peak = slope(torch.linspace(-10, 10, 200_001, dtype=torch.float64)).abs().max()
    wide = 3 * torch.randn(400_000, generator=gen, dtype=torch.float64)
    unit = torch.randn(400_000, generator=gen, dtype=torch.float64)
    saturation = (slope(wide).abs() < 0.1 * peak).double().mean()
    flow = slope(unit).pow(2).mean().sqrt()
    corr = torch.corrcoef(torch.stack([unit, fn(unit)]))[0, 1]
    prior = ACTIVATION_PRIORS[name]
    assert saturation.item() == pytest.approx(prior.saturation, abs=0.02)
    assert flow.item() == pytest.approx(prior.gradient_flow, abs=0.02)
    assert (1 - corr**2).item() == pytest.approx(prior.nonlinearity, abs=0.02)
