"""Column layout of every node type and the coverage accounting built on it.

``COLUMNS`` names each feature column (the table the builder fills and the GNN reads), so nobody
has to count offsets by hand. Optional inputs carry their presence in one of two ways:

* a ``<name>.mask`` column next to a z-scored value (z-scores have no spare value to mean "absent");
* in-band, for categorical and bounded inputs: the value is 0 if and only if the input is absent.
  Categoricals hold ``registry index / vocab`` (index 0 is reserved for "absent"); ratios in
  [0, 1] hold ``0.5 + 0.5 * ratio``; layer depth holds ``tanh((depth + 1) / MAX_LAYERS)``.

In-band presence exists because the fixed widths (schema.NODE_DIMS) cannot hold a mask column for
every optional input the prototype lists; an all-zero row still means "nothing known".

Coverage: for each optional input (``FEATURE_KEYS``) the share of real rows where it was present;
per node type (``node.<type>``) the share over all its keys and rows; per relation
(``edges.<name>``) 1.0 if the relation has at least one edge, else 0.0. A node type with no real
rows has coverage 0.0. ``feature_coverage`` is the mean over the per-key and per-relation values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from esper.tamiyo.schema import NODE_DIMS, NODE_TYPES, RELATIONS, EdgeType, NodeType

__all__ = ["COLUMNS", "EDGE_COVERAGE_KEYS", "FEATURE_KEYS", "column", "summarise"]


def _pair(name: str) -> tuple[str, str]:
    return (name, f"{name}.mask")


COLUMNS: Final[dict[NodeType, tuple[str, ...]]] = {
    "global": (
        *_pair("loss"), *_pair("validation_loss"), *_pair("training_loss"),
        *_pair("gradient_norm"), *_pair("samples_per_s"), *_pair("hook_latency_ms"),
        "log_step", "seed_count", "epoch_progress", "optimizer_family",
    ),
    "seed": (
        *_pair("learning_rate"), *_pair("risk_score"), *_pair("gradient_norm"),
        *_pair("age_epochs"), *_pair("stage"), *_pair("layer_depth"),
        "registry_index", "blend_allowed",
    ),
    "blueprint": (
        "registry_index", "risk", "stage", "tier", "quarantine_only", "approval_required",
        *_pair("parameter_count"), *_pair("bsds_risk"), "hazard_band", "handling_class",
        *_pair("candidate_score"),
    ),
    "layer": (
        "depth", *_pair("latency_ms"), *_pair("parameter_count"), "dropout", "type", "activation",
        *_pair("weight_norm"), *_pair("gradient_norm"),
    ),
    "activation": ("type", "saturation", *_pair("gradient_flow"), *_pair("cost"), *_pair("nonlinearity")),
    "parameter": (
        *_pair("min"), *_pair("max"), *_pair("span"), *_pair("default"), "allowed", "blueprint_risk",
    ),
}
for _t in NODE_TYPES:
    assert len(COLUMNS[_t]) == NODE_DIMS[_t], (_t, len(COLUMNS[_t]), NODE_DIMS[_t])

# The optional inputs of each node type, in the order the builder counts them.
FEATURE_KEYS: Final[dict[NodeType, tuple[str, ...]]] = {
    "global": ("loss", "validation_loss", "training_loss", "gradient_norm", "samples_per_s", "hook_latency_ms",
               "epoch_progress", "optimizer_family"),
    "seed": ("learning_rate", "risk_score", "gradient_norm", "age_epochs", "stage", "layer_depth"),
    "blueprint": ("tier", "parameter_count", "bsds_risk", "hazard_band", "handling_class", "candidate_score"),
    "layer": ("depth", "latency_ms", "parameter_count", "dropout", "type", "activation", "weight_norm",
              "gradient_norm"),
    "activation": ("type", "saturation", "gradient_flow", "cost", "nonlinearity"),
    "parameter": ("min", "max", "span", "default"),
}
for _t in NODE_TYPES:
    assert all(k in COLUMNS[_t] for k in FEATURE_KEYS[_t]), _t

# Relation → coverage group; prototype names (``edges.global_influences``, ``edges.seed_param_allowed``...).
EDGE_COVERAGE_KEYS: Final[dict[EdgeType, str]] = {
    et: "edges.seed_param_allowed" if et == ("seed", "allowed", "parameter") else f"edges.{et[0]}_{et[1]}"
    for et in RELATIONS
}
assert len(set(EDGE_COVERAGE_KEYS.values())) == len(RELATIONS)

_KEY_NAMES: Final[dict[NodeType, tuple[str, ...]]] = {
    t: tuple(f"{t}.{k}" for k in FEATURE_KEYS[t]) for t in NODE_TYPES
}
_GROUP_KEYS: Final[dict[NodeType, str]] = {t: f"node.{t}" for t in NODE_TYPES}
_LEAVES: Final[int] = sum(len(k) for k in _KEY_NAMES.values()) + len(RELATIONS)
_EDGE_KEYS: Final[tuple[str, ...]] = tuple(EDGE_COVERAGE_KEYS[et] for et in RELATIONS)


def column(node_type: NodeType, name: str) -> int:
    """Index of a named column, e.g. ``column("seed", "learning_rate.mask")``."""
    return COLUMNS[node_type].index(name)


def summarise(
    real_counts: Mapping[NodeType, int],
    present: Mapping[NodeType, Sequence[int]],
    edge_counts: Sequence[int],
) -> tuple[dict[str, float], float]:
    """Coverage map and its mean, from per-key presence counts and per-relation edge counts."""
    coverage: dict[str, float] = {}
    total = 0.0
    for t in NODE_TYPES:
        n = real_counts[t]
        counts = present[t]
        if n:
            inv = 1.0 / n
            for key, p in zip(_KEY_NAMES[t], counts, strict=True):
                ratio = p * inv
                coverage[key] = ratio
                total += ratio
            coverage[_GROUP_KEYS[t]] = sum(counts) * inv / len(counts)
        else:
            for key in _KEY_NAMES[t]:
                coverage[key] = 0.0
            coverage[_GROUP_KEYS[t]] = 0.0
    for key, e in zip(_EDGE_KEYS, edge_counts, strict=True):
        v = 1.0 if e else 0.0
        coverage[key] = v
        total += v
    return coverage, total / _LEAVES
