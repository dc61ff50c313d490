"""Karn: the catalogue of blueprint templates (module designs that graft into a host slot)."""

from esper.karn.catalogue import CATALOGUE, TIER_RANGES, get_template, templates_for
from esper.karn.graph import ACTIVATION_PRIORS, ActivationPrior, blueprint_graph, descriptor
from esper.karn.template import (
    BlueprintParameterError,
    BlueprintTemplate,
    Factory,
    KarnError,
    ParamSpec,
    SlotKind,
    SlotMismatchError,
    SlotShape,
    UnknownBlueprintError,
)

__all__ = [
    "ACTIVATION_PRIORS",
    "CATALOGUE",
    "TIER_RANGES",
    "ActivationPrior",
    "BlueprintParameterError",
    "BlueprintTemplate",
    "Factory",
    "KarnError",
    "ParamSpec",
    "SlotKind",
    "SlotMismatchError",
    "SlotShape",
    "UnknownBlueprintError",
    "blueprint_graph",
    "descriptor",
    "get_template",
    "templates_for",
]
