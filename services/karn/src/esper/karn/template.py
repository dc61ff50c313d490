"""What a blueprint template is: a trusted factory for a module that fits a host slot.

Karn is code, not data: an artifact (Tezzeret → Urza → Kasmina) records only a template id, its
parameters and initial weights, and every consumer rebuilds the module from this catalogue. That is
what lets artifacts load with `weights_only=True` and never unpickle a module.

A seed module maps the slot's activations to a tensor of the same shape (Kasmina blends it with the
host's output), so `build(slot, params)(slot.example_input(n)).shape == slot.example_input(n).shape`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from esper.leyline import pb

SlotKind = Literal["vector", "conv"]


class KarnError(Exception):
    """Base class for catalogue errors (unknown blueprint, bad parameters, unfit slot)."""


class UnknownBlueprintError(KarnError, KeyError):
    """No template has this blueprint id."""


class BlueprintParameterError(KarnError, ValueError):
    """A parameter is unknown, missing or outside its allowed range."""


class SlotMismatchError(KarnError, ValueError):
    """The template cannot be grafted into a slot of this kind or shape."""


@dataclass(frozen=True, slots=True)
class SlotShape:
    """The activations at a host slot: (N, channels) for a vector slot, (N, C, H, W) for a conv slot."""

    channels: int
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.channels <= 0:
            raise SlotMismatchError(f"slot channels must be positive, got {self.channels}")
        if (self.height is None) != (self.width is None):
            raise SlotMismatchError("a conv slot needs both height and width")
        if self.height is not None and (self.height <= 0 or (self.width or 0) <= 0):
            raise SlotMismatchError(f"bad conv slot size {self.height}x{self.width}")

    @property
    def kind(self) -> SlotKind:
        return "vector" if self.height is None else "conv"

    def batch_shape(self, batch: int) -> tuple[int, ...]:
        if self.height is None or self.width is None:
            return (batch, self.channels)
        return (batch, self.channels, self.height, self.width)

    def example_input(self, batch: int = 8, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Unit-normal activations of this slot's shape (probes, warm-up, shape checks)."""
        return torch.randn(self.batch_shape(batch), generator=generator, dtype=dtype, device=device)

    def as_key(self) -> str:
        """Stable text form, used in guard digests and catalogue rows: `v64` or `c16x8x8`."""
        return f"v{self.channels}" if self.height is None else f"c{self.channels}x{self.height}x{self.width}"

    @classmethod
    def from_key(cls, key: str) -> SlotShape:
        try:
            if key.startswith("v"):
                return cls(int(key[1:]))
            if key.startswith("c"):
                c, h, w = (int(x) for x in key[1:].split("x"))
                return cls(c, h, w)
        except ValueError:
            pass
        raise SlotMismatchError(f"bad slot key {key!r}")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One tunable parameter: its allowed range and default (integers are rounded on use)."""

    min_value: float
    max_value: float
    default: float
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.min_value <= self.default <= self.max_value:
            raise BlueprintParameterError(f"default {self.default} outside [{self.min_value}, {self.max_value}]")


Factory = Callable[[SlotShape, Mapping[str, float]], nn.Module]


@dataclass(frozen=True, slots=True)
class BlueprintTemplate:
    """A catalogue entry: identity, tier, risk prior, parameter ranges and the module factory.

    `factory` receives validated parameters (every key present, integers already rounded).
    """

    blueprint_id: str
    name: str
    tier: pb.BlueprintTier.ValueType
    description: str
    risk: float
    factory: Factory
    slot_kinds: frozenset[SlotKind] = frozenset({"vector", "conv"})
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    blend_methods: tuple[str, ...] = ("CONVEX", "RESIDUAL")
    approval_required: bool = False

    @property
    def quarantine_only(self) -> bool:
        return self.tier == pb.BLUEPRINT_TIER_HIGH_RISK

    def resolve_params(self, params: Mapping[str, float] | None = None) -> dict[str, float]:
        """Defaults filled in, ranges enforced, integers rounded; unknown keys are an error."""
        given = dict(params or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise BlueprintParameterError(f"{self.blueprint_id}: unknown parameters {unknown}")
        out: dict[str, float] = {}
        for name, spec in self.params.items():
            value = float(given.get(name, spec.default))
            if not spec.min_value <= value <= spec.max_value:
                raise BlueprintParameterError(
                    f"{self.blueprint_id}: {name}={value} outside [{spec.min_value}, {spec.max_value}]")
            out[name] = float(round(value)) if spec.integer else value
        return out

    def build(self, slot: SlotShape, params: Mapping[str, float] | None = None) -> nn.Module:
        """A fresh module for `slot` (random init from torch's global RNG; seed it for determinism)."""
        if slot.kind not in self.slot_kinds:
            raise SlotMismatchError(f"{self.blueprint_id} ({self.name}) does not fit a {slot.kind} slot")
        return self.factory(slot, self.resolve_params(params))
