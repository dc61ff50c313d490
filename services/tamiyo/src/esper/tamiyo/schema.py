"""The shape of Tamiyo's heterogeneous graph: node types, feature widths and the 21 relations.

One table shared by the graph builder (which fills it) and the GNN (which is built from it), so the
two can never disagree. Names and widths follow the prototype (REFERENCE_PROTOTYPE §6.1).
"""

from __future__ import annotations

from typing import Final

NodeType = str
EdgeType = tuple[str, str, str]

# Node types and their feature widths (value columns plus one mask column per optional feature).
NODE_DIMS: Final[dict[NodeType, int]] = {
    "global": 16,
    "seed": 14,
    "blueprint": 14,
    "layer": 12,
    "activation": 8,
    "parameter": 10,
}
NODE_TYPES: Final[tuple[NodeType, ...]] = tuple(NODE_DIMS)

EDGE_ATTR_DIM: Final[int] = 3

# Per-blueprint structural caps (prototype: 4 layers, 2 activations, 2 parameters).
MAX_LAYERS: Final[int] = 4
MAX_ACTIVATIONS: Final[int] = 2
MAX_PARAMETERS: Final[int] = 2

# Categorical vocabularies (prototype: 1024, and 256 for optimizer family / hazard class).
VOCAB_SIZE: Final[int] = 1024
SMALL_VOCAB_SIZE: Final[int] = 256

# The 21 relations, in a fixed order (the GNN stacks per-relation weights in this order).
RELATIONS: Final[tuple[EdgeType, ...]] = (
    ("global", "influences", "seed"),
    ("seed", "reports", "global"),
    ("global", "annotates", "blueprint"),
    ("blueprint", "monitored_by", "global"),
    ("seed", "peer", "seed"),
    ("global", "operates", "layer"),
    ("layer", "feedback", "global"),
    ("layer", "activates", "activation"),
    ("activation", "affects", "layer"),
    ("layer", "feeds", "activation"),
    ("activation", "configures", "parameter"),
    ("parameter", "modulates", "activation"),
    ("seed", "allowed", "parameter"),
    ("parameter", "associated", "seed"),
    ("blueprint", "composes", "layer"),
    ("layer", "belongs_to", "blueprint"),
    ("blueprint", "energizes", "activation"),
    ("parameter", "targets", "blueprint"),
    ("layer", "connects", "layer"),
    ("seed", "monitors", "layer"),
    ("layer", "monitored_by", "seed"),
)
assert len(RELATIONS) == 21 and len(set(RELATIONS)) == 21

# Policy heads (prototype §6.2).
POLICY_CLASSES: Final[int] = 32
PARAM_DIM: Final[int] = 4
BLEND_METHODS: Final[tuple[str, ...]] = ("linear", "cosine", "warmup_hold")
SCHEDULE_DIM: Final[int] = 2
RISK_CLASSES: Final[int] = 5
BREAKER_DIM: Final[int] = 2

POLICY_VERSION: Final[str] = "tamiyo_gnn_v2"
"""v2: blueprint scores are per (seed, blueprint) pair; v1 scored a blueprint the same for every seed."""
