"""The host network: a deliberately small MLP with named seed slots after its hidden layers.

Each hidden layer's activations pass through `self.slots[name]`, an `nn.Identity()` until the trainer
(through Kasmina) puts a module there with `set_slot`. With `input_slot`, the flattened input passes
through one more slot, `input`, before the first layer. No hooks: the slot is an ordinary submodule
call in `forward`, so its parameters show up in `state_dict()` (`slots.<name>.*`), move with `.to()`
and are saved by checkpoints. A slot module must map (N, width) to (N, width); `set_slot` checks that
on a two-sample probe before accepting it.

The default widths (64 → 32 → 32 → 10 for digits) are small on purpose: growth should have room to help.
On digits that is not small enough (the default host reaches ~0.96 by itself, and a seed at a hidden
slot works at that slot's width, so it adds depth, never width). The *bottleneck* host,
`hidden=(4,)` with `input_slot=True`, is where growth earns its keep: the 4-wide layer caps the host
at ~0.88, and a seed in the 64-wide input slot gives it the nonlinear features it lacks
(docs/tolaria.md, "A host where growth pays").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, cast

import torch
from torch import nn

from esper.karn.template import SlotMismatchError, SlotShape
from esper.tolaria.data import DatasetMeta

__all__ = ["DEFAULT_HIDDEN", "INPUT_SLOT", "HostNetwork", "SlotMismatchError", "build_host", "slot_name"]

DEFAULT_HIDDEN: Final[tuple[int, ...]] = (32, 32)
INPUT_SLOT: Final[str] = "input"


def slot_name(depth: int) -> str:
    """Name of the slot after hidden layer `depth` (1-based): `hidden1`, `hidden2`, ..."""
    return f"hidden{depth}"


class HostNetwork(nn.Module):
    """Flatten → [input slot] → [Linear → ReLU → slot] per hidden width → Linear head (logits)."""

    def __init__(self, num_features: int, num_classes: int, *, hidden: Sequence[int] = DEFAULT_HIDDEN,
                 input_slot: bool = False) -> None:
        super().__init__()
        if num_features <= 0 or num_classes < 2 or not hidden or min(hidden) <= 0:
            raise ValueError(f"bad host shape: features={num_features}, classes={num_classes}, hidden={hidden}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.hidden: tuple[int, ...] = tuple(int(h) for h in hidden)
        widths = (num_features, *self.hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.input_slot = input_slot
        names = ([INPUT_SLOT] if input_slot else []) + [slot_name(i + 1) for i in range(len(self.hidden))]
        self.slots = nn.ModuleDict({name: nn.Identity() for name in names})  # forward order: depth = position
        self.head = nn.Linear(self.hidden[-1], num_classes)
        self._slot_names: tuple[str, ...] = tuple(self.slots.keys())
        self._layer_slots: tuple[str, ...] = self._slot_names[1:] if input_slot else self._slot_names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        if self.input_slot:
            h = self.slots[INPUT_SLOT](h)
        for layer, name in zip(self.layers, self._layer_slots, strict=True):
            h = self.slots[name](torch.relu(layer(h)))
        out: torch.Tensor = self.head(h)
        return out

    # -- slots -------------------------------------------------------------------------------------

    @property
    def slot_names(self) -> tuple[str, ...]:
        """Slots in forward order (shallow first)."""
        return self._slot_names

    @property
    def slot_modules(self) -> Mapping[str, nn.Module]:
        """The modules in the slots by name, live (a property's lookup skips `Module.__getattr__`,
        which `self.slots` goes through: the trainer looks at every step)."""
        return cast("Mapping[str, nn.Module]", self._modules["slots"]._modules)  # type: ignore[union-attr]

    def slot_shapes(self) -> dict[str, SlotShape]:
        """Activations at each slot: a vector slot of `width` channels (the input slot: the features)."""
        widths = ((self.num_features,) if self.input_slot else ()) + self.hidden
        return {name: SlotShape(width) for name, width in zip(self._slot_names, widths, strict=True)}

    def slot_depths(self) -> dict[str, int]:
        """1-based depth of each slot (`SeedState.layer_depth`)."""
        return {name: i + 1 for i, name in enumerate(self._slot_names)}

    def slot(self, name: str) -> nn.Module:
        self._require(name)
        return self.slots[name]

    def occupied(self, name: str) -> bool:
        """True when something other than the default identity sits in the slot."""
        return not isinstance(self.slot(name), nn.Identity)

    def set_slot(self, name: str, module: nn.Module, *, check: bool = True) -> nn.Module:
        """Put `module` in slot `name`; returns the module it replaces.

        With `check`, a two-sample probe (no grad, eval mode, training flags restored) must come out
        with the slot's shape, else SlotMismatchError and the slot is left as it was.
        """
        self._require(name)
        if check:
            self._probe(name, module)
        previous = self.slots[name]
        self.slots[name] = module
        return previous

    def clear_slot(self, name: str) -> nn.Module:
        """Back to the identity; returns the module that was there."""
        return self.set_slot(name, nn.Identity(), check=False)

    def host_parameters(self) -> Iterator[nn.Parameter]:
        """The host's own parameters (hidden layers and head), not those of slot modules."""
        yield from self.layers.parameters()
        yield from self.head.parameters()

    def slot_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.slot(name).parameters()

    def _require(self, name: str) -> None:
        if name not in self.slots:
            raise KeyError(f"unknown slot {name!r}; slots: {', '.join(self._slot_names)}")

    def _probe(self, name: str, module: nn.Module) -> None:
        shape = self.slot_shapes()[name]
        ref = next(self.parameters())
        probe = shape.example_input(2, generator=torch.Generator().manual_seed(0)).to(ref.device, ref.dtype)
        modes = [(m, m.training) for m in module.modules()]
        try:
            module.eval()
            with torch.no_grad():
                out = module(probe)
        except Exception as e:  # wrong device, wrong width, anything: the slot does not take it
            raise SlotMismatchError(f"slot {name} ({shape.as_key()}): probe failed: {type(e).__name__}: {e}") from e
        finally:
            for m, training in modes:
                m.train(training)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SlotMismatchError(f"slot {name} expects {tuple(probe.shape)} out, module gave {got}")


def build_host(meta: DatasetMeta, *, hidden: Sequence[int] = DEFAULT_HIDDEN, input_slot: bool = False,
               seed: int | None = None) -> HostNetwork:
    """A host sized for `meta`; with `seed`, initial weights depend on it only (the global RNG is untouched)."""
    if seed is None:
        return HostNetwork(meta.num_features, meta.num_classes, hidden=hidden, input_slot=input_slot)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HostNetwork(meta.num_features, meta.num_classes, hidden=hidden, input_slot=input_slot)
