"""What Tamiyo knows about a candidate blueprint: the Leyline descriptor plus optional graph extras.

Urza will supply these (issue 4: descriptor, BSDS safety sheet, and the ``graph`` extras of layers,
activations, parameters and adjacency); until then callers may pass none. Every field that may be
unknown is ``None`` or empty, never a made-up value: the graph builder turns each absence into a
mask bit and a coverage count, so the policy and the operators both see what was missing.

Indices inside ``adjacency`` and ``monitored_layers`` refer to positions in ``layers``; they are
checked here, once, when the metadata is built, so the hot path never meets a dangling index.
Treat instances (including the protobuf messages they hold) as immutable.
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.core.errors import DependencyViolationError
from esper.leyline import pb

__all__ = ["ActivationInfo", "BlueprintInfo", "LayerInfo", "ParameterInfo"]


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One layer of a blueprint. Empty names and ``None`` numbers mean "not reported"."""

    type_name: str = ""
    depth: float | None = None
    latency_ms: float | None = None
    parameter_count: float | None = None
    dropout: float | None = None
    activation_name: str = ""
    weight_norm: float | None = None
    gradient_norm: float | None = None


@dataclass(frozen=True, slots=True)
class ActivationInfo:
    """One activation function used by a blueprint, with its probe statistics when known."""

    type_name: str = ""
    saturation: float | None = None
    gradient_flow: float | None = None
    cost: float | None = None
    nonlinearity: float | None = None


@dataclass(frozen=True, slots=True)
class ParameterInfo:
    """A tunable parameter of a blueprint; the name ties it to ``descriptor.allowed_parameters``."""

    name: str
    min: float | None = None
    max: float | None = None
    default: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise DependencyViolationError("ParameterInfo needs a name (it is matched to allowed_parameters)")


@dataclass(frozen=True, slots=True)
class BlueprintInfo:
    """A blueprint candidate for the graph: descriptor (required) and everything else optional."""

    descriptor: pb.BlueprintDescriptor
    bsds: pb.BSDS | None = None
    layers: tuple[LayerInfo, ...] = ()
    activations: tuple[ActivationInfo, ...] = ()
    parameters: tuple[ParameterInfo, ...] = ()
    adjacency: tuple[tuple[int, int], ...] = ()  # (src layer, dst layer) positions in ``layers``
    monitored_layers: tuple[int, ...] = ()  # positions in ``layers`` that seeds watch
    blend_methods: tuple[str, ...] = ()
    candidate_score: float | None = None

    def __post_init__(self) -> None:
        n = len(self.layers)
        bad = [pair for pair in self.adjacency if not (0 <= pair[0] < n and 0 <= pair[1] < n)]
        bad_monitored = [i for i in self.monitored_layers if not 0 <= i < n]
        if bad or bad_monitored:
            raise DependencyViolationError(
                f"blueprint {self.descriptor.blueprint_id!r}: layer indices out of range 0..{n - 1}: "
                f"adjacency {bad}, monitored_layers {bad_monitored}"
            )

    @property
    def blueprint_id(self) -> str:
        return self.descriptor.blueprint_id
