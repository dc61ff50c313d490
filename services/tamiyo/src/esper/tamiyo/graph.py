"""Graph builder: one ``SystemStatePacket`` (plus optional blueprint metadata) → Tamiyo's hetero graph.

Columns per node type (names in ``coverage.COLUMNS``; "z" = EWMA z-score via the normaliser with
a ``.mask`` column beside it; "in-band" = 0 exactly when absent, see ``coverage``):

========== ===================================================================================
global 16  0-11 z+mask: loss, validation_loss, training_loss, gradient_norm, samples_per_s,
           hook_latency_ms (``training_metrics``; the two losses fall back to the packet fields) ·
           12 z log1p(global_step) · 13 tanh(#seeds) · 14 in-band epoch_progress
           (current_epoch / ``epochs_total``) · 15 in-band optimizer family
           ((``optimizer_family_index`` + 1) / 256). Raw ``epoch`` is not a column: 16 columns
           cannot hold the prototype's whole list, and the epoch clock is carried by log_step and
           epoch_progress.
seed 14    0-11 z+mask: learning_rate, risk_score, gradient_norm, age_epochs; stage (stage / 11)
           + mask; layer_depth z + mask · 12 seed registry index / 1024 · 13 blend_allowed (seed
           metric ``blend_allowed`` > 0, stage BLENDING..FOSSILIZED, or a blueprint lists blend
           methods)
blueprint  0 registry index / 1024 · 1 descriptor risk · 2 stage / 10 · 3 in-band tier / 3 ·
14         4 quarantine_only · 5 approval_required · 6-7 z+mask log1p(parameter count = sum over
           layers, only when every layer reports one) · 8-9 BSDS risk_score + mask · 10 in-band
           hazard band / 4 · 11 in-band handling class / 3 · 12-13 z+mask candidate_score
layer 12   0 in-band depth · 1-2 latency_ms · 3-4 log1p(parameter_count) · 5 in-band dropout ·
           6 in-band layer type · 7 in-band activation type · 8-9 weight_norm · 10-11 gradient_norm
activation 0 in-band type · 1 in-band saturation · 2-3 gradient_flow · 4-5 log1p(cost) ·
8          6-7 nonlinearity
parameter  0-7 z+mask: min, max, span (max - min, when both known), default · 8 allowed by the
10         descriptor · 9 descriptor risk of its blueprint
========== ===================================================================================

Presence. ``training_metrics`` is a map, so a key is present when it is there. ``SeedState`` and
the packet's loss fields are proto3 scalars without presence: as in the prototype, 0 reads as
absent (a real 0.0 risk or depth is indistinguishable on the wire). NaN/inf read as absent, so one
bad number never poisons the EWMA statistics. Descriptor ranges beat extras for parameter min/max;
extras fill what the descriptor lacks. Nothing is ever invented.

Placeholders. A node type with no real rows (no seeds, no blueprint metadata...) gets exactly one
all-zero row (every mask and in-band column 0) so every type exists and message passing is well
defined; it has no edges, and ``counts`` holds the real row counts, which coverage and the
seed/blueprint heads must use. Real rows come first; seed row i is ``seed_ids[i]``.

Edges are built only from what the inputs support: global↔seed, global↔blueprint, seed↔seed peer
(all ordered pairs), per blueprint: composes/belongs_to, energizes, targets (membership),
global↔layer, layer↔activation activates/affects (all pairs), feeds (layer's activation name ==
activation type), activation↔parameter (all pairs), layer connects (``adjacency``), every seed ↔
each ``monitored_layers`` layer, every seed ↔ each parameter the descriptor allows. Edge attributes
are ``[weight, known, distance]``: weight = 1 / in-degree of the destination in that relation;
distance = tanh(|depth difference| / MAX_LAYERS) for seed↔seed, layer→layer and seed↔layer edges
when both depths are known (then known = 1), else known = distance = 0.

Speed (ARCHITECTURE §11, p95 ≤ 0.5 ms): features go into plain Python lists, then one tensor for
all node features, one for all edge indices and one for all edge attributes; per-type and
per-relation tensors are views of those three (``torch.split``), moved to a non-CPU device once,
with ``non_blocking=True``. Lists become tensors through numpy (~3x faster than ``torch.tensor``
on a list), and ``torch.from_numpy`` shares that memory: no second copy.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import torch
from torch import Tensor

from esper.core.errors import ConfigurationError, DependencyViolationError
from esper.leyline import pb
from esper.tamiyo.coverage import FEATURE_KEYS, summarise
from esper.tamiyo.metadata import BlueprintInfo, LayerInfo
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.registry import RegistrySet
from esper.tamiyo.schema import (
    MAX_ACTIVATIONS,
    MAX_LAYERS,
    MAX_PARAMETERS,
    NODE_DIMS,
    NODE_TYPES,
    RELATIONS,
    SMALL_VOCAB_SIZE,
    VOCAB_SIZE,
    EdgeType,
    NodeType,
)

if TYPE_CHECKING:
    from torch_geometric.data import HeteroData

__all__ = ["DEFAULT_MAX_BLUEPRINTS", "DEFAULT_MAX_SEEDS", "GraphBuilder", "GraphInputs", "candidate_rank"]

DEFAULT_MAX_SEEDS: Final[int] = 64
DEFAULT_MAX_BLUEPRINTS: Final[int] = 8

_R: Final[dict[EdgeType, int]] = {et: i for i, et in enumerate(RELATIONS)}
_INFLUENCES, _REPORTS = _R[("global", "influences", "seed")], _R[("seed", "reports", "global")]
_ANNOTATES, _BP_MONITORED = _R[("global", "annotates", "blueprint")], _R[("blueprint", "monitored_by", "global")]
_PEER = _R[("seed", "peer", "seed")]
_OPERATES, _FEEDBACK = _R[("global", "operates", "layer")], _R[("layer", "feedback", "global")]
_ACTIVATES, _AFFECTS = _R[("layer", "activates", "activation")], _R[("activation", "affects", "layer")]
_FEEDS = _R[("layer", "feeds", "activation")]
_CONFIGURES, _MODULATES = _R[("activation", "configures", "parameter")], _R[("parameter", "modulates", "activation")]
_ALLOWED, _ASSOCIATED = _R[("seed", "allowed", "parameter")], _R[("parameter", "associated", "seed")]
_COMPOSES, _BELONGS = _R[("blueprint", "composes", "layer")], _R[("layer", "belongs_to", "blueprint")]
_ENERGIZES, _TARGETS = _R[("blueprint", "energizes", "activation")], _R[("parameter", "targets", "blueprint")]
_CONNECTS = _R[("layer", "connects", "layer")]
_MONITORS, _LAYER_MONITORED = _R[("seed", "monitors", "layer")], _R[("layer", "monitored_by", "seed")]
_DST_TYPE: Final[tuple[NodeType, ...]] = tuple(et[2] for et in RELATIONS)

_STAGE_MAX: Final[float] = float(max(pb.SeedLifecycleStage.values()))
_BLEND_FIRST: Final[int] = pb.SEED_STAGE_BLENDING
_BLEND_LAST: Final[int] = pb.SEED_STAGE_FOSSILIZED
_TIER_MAX: Final[float] = float(max(pb.BlueprintTier.values()))
_HAZARD_MAX: Final[float] = float(max(pb.HazardBand.values()))
_HANDLING_MAX: Final[float] = float(max(pb.HandlingClass.values()))
_ZERO2: Final[tuple[float, float]] = (0.0, 0.0)
_GLOBAL_METRICS: Final[tuple[str, ...]] = (
    "loss", "validation_loss", "training_loss", "gradient_norm", "samples_per_s", "hook_latency_ms",
)
_IndexFn = Callable[[str], int]
_isfinite = math.isfinite
_tanh = math.tanh
_log1p = math.log1p


@dataclass(slots=True)
class GraphInputs:
    """The built graph as plain dicts (what the GNN consumes) plus ids, counts and coverage.

    ``x[t]`` is float32 ``[max(counts[t], 1), NODE_DIMS[t]]`` for every type in ``NODE_TYPES``;
    ``edge_index[r]`` long ``[2, E]`` and ``edge_attr[r]`` float32 ``[E, 3]`` for every relation
    (E may be 0). Rows past ``counts[t]`` are placeholders (see the module docstring).
    ``truncated[t]`` counts rows dropped by the builder's caps.
    """

    x: dict[NodeType, Tensor]
    edge_index: dict[EdgeType, Tensor]
    edge_attr: dict[EdgeType, Tensor]
    counts: dict[NodeType, int]
    seed_ids: list[str]
    blueprint_ids: list[str]
    coverage: dict[str, float]
    feature_coverage: float
    truncated: dict[NodeType, int]

    @property
    def num_nodes(self) -> int:
        return sum(int(v.shape[0]) for v in self.x.values())

    @property
    def num_edges(self) -> int:
        return sum(int(v.shape[1]) for v in self.edge_index.values())

    def metadata(self) -> tuple[list[NodeType], list[EdgeType]]:
        """PyG-style ``(node_types, edge_types)``, always the full schema."""
        return list(NODE_TYPES), list(RELATIONS)

    def to_hetero_data(self) -> HeteroData:
        """A PyG ``HeteroData`` sharing these tensors (no copies); ~0.15 ms, so the hot path uses the dicts."""
        mapping: dict[NodeType | EdgeType, dict[str, Tensor]] = {t: {"x": self.x[t]} for t in NODE_TYPES}
        for et in RELATIONS:
            mapping[et] = {"edge_index": self.edge_index[et], "edge_attr": self.edge_attr[et]}
        return _hetero_data_cls().from_dict(mapping)


@functools.cache
def _hetero_data_cls() -> type[HeteroData]:
    """PyG imported on first use, quietly: PyG 2.8's import trips torch's ``jit.script`` deprecation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch_geometric.data import HeteroData
    return HeteroData  # type: ignore[no-any-return]


class _Acc:
    """Per-build accumulators: flat feature lists, presence counts, edge lists."""

    __slots__ = ("blueprint_ids", "counts", "dist", "dst", "feats", "present", "seed_ids", "src", "truncated")

    def __init__(self, seed_ids: list[str], blueprint_ids: list[str]) -> None:
        self.seed_ids = seed_ids
        self.blueprint_ids = blueprint_ids
        self.feats: dict[NodeType, list[float]] = {t: [] for t in NODE_TYPES}
        self.present: dict[NodeType, list[int]] = {t: [0] * len(FEATURE_KEYS[t]) for t in NODE_TYPES}
        self.counts: dict[NodeType, int] = dict.fromkeys(NODE_TYPES, 0)
        self.truncated: dict[NodeType, int] = dict.fromkeys(NODE_TYPES, 0)
        self.src: list[list[int]] = [[] for _ in RELATIONS]
        self.dst: list[list[int]] = [[] for _ in RELATIONS]
        self.dist: list[list[float]] = [[] for _ in RELATIONS]  # -1.0 = distance unknown

    def edges(self, rel: int, src: Sequence[int], dst: Sequence[int]) -> None:
        self.src[rel].extend(src)
        self.dst[rel].extend(dst)
        self.dist[rel].extend([-1.0] * len(src))

    def both(self, fwd: int, back: int, src: Sequence[int], dst: Sequence[int]) -> None:
        self.edges(fwd, src, dst)
        self.edges(back, dst, src)


def _num(value: float | None) -> float | None:
    """A usable number or None (None, NaN and inf are all "absent")."""
    return value if value is not None and _isfinite(value) else None


def _nz(value: float) -> float | None:
    """Proto3 scalar presence: 0 (and NaN/inf) read as absent."""
    return value if value != 0 and _isfinite(value) else None


def _unit(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def candidate_rank(b: BlueprintInfo) -> tuple[bool, bool, float, str]:
    """Which blueprints make the graph when the catalogue has more than `max_blueprints`: not
    quarantined first, then those with a graph (Urza stores graphs for the trainer's slot kind, so a
    graph means the design fits), then by candidate score (1 - risk when absent), then by id."""
    d = b.descriptor
    quarantined = d.quarantine_only or (b.bsds is not None and b.bsds.handling_class == pb.HANDLING_CLASS_QUARANTINE)
    risk = float(b.bsds.risk_score) if b.bsds is not None else float(d.risk)
    score = b.candidate_score if b.candidate_score is not None else 1.0 - risk
    return (quarantined, not b.layers, -score, d.blueprint_id)


class GraphBuilder:
    """Builds ``GraphInputs`` from packets; updates the normaliser and registries as it goes.

    Not thread-safe (the normaliser is not): one builder per worker thread.
    """

    __slots__ = ("_device", "_max_blueprints", "_max_seeds", "_move", "normaliser", "registries")

    def __init__(
        self,
        normaliser: FeatureNormaliser,
        registries: RegistrySet,
        *,
        max_seeds: int = DEFAULT_MAX_SEEDS,
        max_blueprints: int = DEFAULT_MAX_BLUEPRINTS,
        device: torch.device = torch.device("cpu"),  # noqa: B008 - immutable value
    ) -> None:
        if max_seeds < 1 or max_blueprints < 1:
            raise ConfigurationError(f"max_seeds and max_blueprints must be >= 1, got {max_seeds}, {max_blueprints}")
        self.normaliser = normaliser
        self.registries = registries
        self._max_seeds = max_seeds
        self._max_blueprints = max_blueprints
        self._device = device
        self._move = device.type != "cpu"

    @property
    def max_blueprints(self) -> int:
        """Blueprint nodes a graph holds at most (the best ranked by `candidate_rank`)."""
        return self._max_blueprints

    def build(self, packet: pb.SystemStatePacket, blueprints: Sequence[BlueprintInfo] = ()) -> GraphInputs:
        """Build the graph; raises ``DependencyViolationError`` on a missing or duplicate id."""
        return self._assemble(self._collect(packet, blueprints))

    def _collect(self, packet: pb.SystemStatePacket, blueprints: Sequence[BlueprintInfo]) -> _Acc:
        """Phase 1, plain Python: every feature row, presence count and edge list."""
        all_seeds = packet.seed_states
        seed_ids = [s.seed_id for s in all_seeds]
        blueprint_ids = [b.descriptor.blueprint_id for b in blueprints]
        _check_ids("seed", seed_ids)
        _check_ids("blueprint", blueprint_ids)
        seeds = all_seeds[: self._max_seeds]
        bps = sorted(blueprints, key=candidate_rank)[: self._max_blueprints]
        acc = _Acc(seed_ids[: len(seeds)], [b.descriptor.blueprint_id for b in bps])
        acc.truncated["seed"] = len(all_seeds) - len(seeds)
        acc.truncated["blueprint"] = len(blueprints) - len(bps)
        self._global_row(acc, packet, len(all_seeds))
        blend_any = any(b.blend_methods for b in bps)
        seed_depths = self._seed_rows(acc, seeds, blend_any)
        self._seed_edges(acc, seed_depths)
        for b_idx, bp in enumerate(bps):
            self._blueprint(acc, b_idx, bp, seed_depths)
        return acc

    # -- node rows ---------------------------------------------------------------------------

    def _masked(self, out: list[float], present: list[int], i: int, key: str, value: float | None) -> None:
        if value is None:
            out += _ZERO2
        else:
            out += (self.normaliser.observe(key, value), 1.0)
            present[i] += 1

    def _global_row(self, acc: _Acc, packet: pb.SystemStatePacket, n_seeds: int) -> None:
        out, present, metrics = acc.feats["global"], acc.present["global"], packet.training_metrics
        fallback = {"validation_loss": packet.validation_loss, "training_loss": packet.training_loss}
        for i, key in enumerate(_GLOBAL_METRICS):
            raw = metrics.get(key)
            value = _num(raw) if raw is not None else _nz(fallback.get(key, 0.0))
            self._masked(out, present, i, key, value)
        out += (self.normaliser.observe("global_log_step", _log1p(packet.global_step)), _tanh(n_seeds))
        total = _num(metrics.get("epochs_total"))
        if total is not None and total > 0:
            out.append(0.5 + 0.5 * _unit(packet.current_epoch / total))
            present[6] += 1
        else:
            out.append(0.0)
        opt = _num(metrics.get("optimizer_family_index"))
        if opt is not None and opt >= 0:
            out.append(min(int(opt) + 1, SMALL_VOCAB_SIZE - 1) / SMALL_VOCAB_SIZE)
            present[7] += 1
        else:
            out.append(0.0)
        acc.counts["global"] = 1

    def _seed_rows(self, acc: _Acc, seeds: Sequence[pb.SeedState], blend_any: bool) -> list[float | None]:
        out, present, masked = acc.feats["seed"], acc.present["seed"], self._masked
        registry = self.registries.seed
        depths: list[float | None] = []
        for s in seeds:
            masked(out, present, 0, "seed_learning_rate", _nz(s.learning_rate))
            masked(out, present, 1, "seed_risk", _nz(s.risk_score))
            masked(out, present, 2, "seed_gradient_norm", _nz(s.gradient_norm))
            masked(out, present, 3, "seed_age", _nz(s.age_epochs))
            stage = s.stage
            if stage:
                out += (stage / _STAGE_MAX, 1.0)
                present[4] += 1
            else:
                out += _ZERO2
            depth = _nz(s.layer_depth)
            masked(out, present, 5, "seed_layer_depth", depth)
            depths.append(depth)
            blend = blend_any or _BLEND_FIRST <= stage <= _BLEND_LAST or s.metrics.get("blend_allowed", 0.0) > 0
            out += (registry.index(s.seed_id) / VOCAB_SIZE, 1.0 if blend else 0.0)
        acc.counts["seed"] = len(seeds)
        return depths

    def _blueprint_row(self, acc: _Acc, bp: BlueprintInfo) -> None:
        out, present, masked = acc.feats["blueprint"], acc.present["blueprint"], self._masked
        d = bp.descriptor
        out += (
            self.registries.blueprint.index(d.blueprint_id) / VOCAB_SIZE,
            _unit(d.risk),
            d.stage / 10.0,
            d.tier / _TIER_MAX,
            1.0 if d.quarantine_only else 0.0,
            1.0 if d.approval_required else 0.0,
        )
        if d.tier:
            present[0] += 1
        total = _total_parameters(bp.layers)
        masked(out, present, 1, "blueprint_log_parameter_count", None if total is None else _log1p(max(total, 0.0)))
        bsds = bp.bsds
        if bsds is None:
            out += (0.0, 0.0, 0.0, 0.0)
        else:
            out += (_unit(bsds.risk_score), 1.0, bsds.hazard_band / _HAZARD_MAX, bsds.handling_class / _HANDLING_MAX)
            present[2] += 1
            present[3] += 1 if bsds.hazard_band else 0
            present[4] += 1 if bsds.handling_class else 0
        masked(out, present, 5, "blueprint_candidate_score", _num(bp.candidate_score))

    def _layer_row(self, acc: _Acc, layer: LayerInfo) -> float | None:
        out, present, masked = acc.feats["layer"], acc.present["layer"], self._masked
        depth = _num(layer.depth)
        if depth is None:
            out.append(0.0)
        else:
            out.append(_tanh((max(depth, 0.0) + 1.0) / MAX_LAYERS))
            present[0] += 1
        masked(out, present, 1, "layer_latency_ms", _num(layer.latency_ms))
        params = _num(layer.parameter_count)
        masked(out, present, 2, "layer_log_parameter_count", None if params is None else _log1p(max(params, 0.0)))
        dropout = _num(layer.dropout)
        if dropout is None:
            out.append(0.0)
        else:
            out.append(0.5 + 0.5 * _unit(dropout))
            present[3] += 1
        self._category(out, present, 4, self.registries.layer_type.index, layer.type_name)
        self._category(out, present, 5, self.registries.activation_type.index, layer.activation_name)
        masked(out, present, 6, "layer_weight_norm", _num(layer.weight_norm))
        masked(out, present, 7, "layer_gradient_norm", _num(layer.gradient_norm))
        return depth

    @staticmethod
    def _category(out: list[float], present: list[int], i: int, index: _IndexFn, name: str) -> None:
        if name:
            out.append(index(name) / VOCAB_SIZE)
            present[i] += 1
        else:
            out.append(0.0)

    def _activation_rows(self, acc: _Acc, bp: BlueprintInfo) -> list[str]:
        out, present, masked = acc.feats["activation"], acc.present["activation"], self._masked
        acts = bp.activations[:MAX_ACTIVATIONS]
        acc.truncated["activation"] += len(bp.activations) - len(acts)
        for a in acts:
            self._category(out, present, 0, self.registries.activation_type.index, a.type_name)
            saturation = _num(a.saturation)
            if saturation is None:
                out.append(0.0)
            else:
                out.append(0.5 + 0.5 * _unit(saturation))
                present[1] += 1
            masked(out, present, 2, "activation_gradient_flow", _num(a.gradient_flow))
            cost = _num(a.cost)
            masked(out, present, 3, "activation_log_cost", None if cost is None else _log1p(max(cost, 0.0)))
            masked(out, present, 4, "activation_nonlinearity", _num(a.nonlinearity))
        acc.counts["activation"] += len(acts)
        return [a.type_name for a in acts]

    def _parameter_rows(self, acc: _Acc, bp: BlueprintInfo) -> list[bool]:
        out, present, masked = acc.feats["parameter"], acc.present["parameter"], self._masked
        rows = _merged_parameters(bp)
        acc.truncated["parameter"] += max(len(rows) - MAX_PARAMETERS, 0)
        rows = rows[:MAX_PARAMETERS]
        risk = _unit(bp.descriptor.risk)
        for lo, hi, default, allowed in rows:
            masked(out, present, 0, "parameter_min", lo)
            masked(out, present, 1, "parameter_max", hi)
            masked(out, present, 2, "parameter_span", None if lo is None or hi is None else hi - lo)
            masked(out, present, 3, "parameter_default", default)
            out += (1.0 if allowed else 0.0, risk)
        acc.counts["parameter"] += len(rows)
        return [row[3] for row in rows]

    # -- blueprint subgraph and edges --------------------------------------------------------

    def _blueprint(self, acc: _Acc, b_idx: int, bp: BlueprintInfo, seed_depths: list[float | None]) -> None:
        self._blueprint_row(acc, bp)
        acc.counts["blueprint"] += 1
        acc.both(_ANNOTATES, _BP_MONITORED, (0,), (b_idx,))
        l0, a0, p0 = acc.counts["layer"], acc.counts["activation"], acc.counts["parameter"]
        layers = bp.layers[:MAX_LAYERS]
        acc.truncated["layer"] += len(bp.layers) - len(layers)
        depths = [self._layer_row(acc, layer) for layer in layers]
        acc.counts["layer"] += len(layers)
        act_names = self._activation_rows(acc, bp)
        allowed = self._parameter_rows(acc, bp)
        lids = range(l0, l0 + len(layers))
        aids = range(a0, a0 + len(act_names))
        pids = range(p0, p0 + len(allowed))
        acc.both(_COMPOSES, _BELONGS, [b_idx] * len(lids), lids)
        acc.edges(_ENERGIZES, [b_idx] * len(aids), aids)
        acc.edges(_TARGETS, pids, [b_idx] * len(pids))
        acc.both(_OPERATES, _FEEDBACK, [0] * len(lids), lids)
        ls = [li for li in lids for _ in aids]
        as_ = [ai for _ in lids for ai in aids]
        acc.both(_ACTIVATES, _AFFECTS, ls, as_)
        feeds = [(l0 + i, a0 + j) for i, layer in enumerate(layers) if layer.activation_name
                 for j, name in enumerate(act_names) if name == layer.activation_name]
        acc.edges(_FEEDS, [f[0] for f in feeds], [f[1] for f in feeds])
        acc.both(_CONFIGURES, _MODULATES, [ai for ai in aids for _ in pids], [pi for _ in aids for pi in pids])
        n_seeds = acc.counts["seed"]
        allowed_ids = [p0 + i for i, ok in enumerate(allowed) if ok]
        acc.both(_ALLOWED, _ASSOCIATED, [s for s in range(n_seeds) for _ in allowed_ids],
                 [pi for _ in range(n_seeds) for pi in allowed_ids])
        self._depth_edges(acc, bp, l0, depths, seed_depths)

    @staticmethod
    def _depth_edges(
        acc: _Acc, bp: BlueprintInfo, l0: int, depths: list[float | None], seed_depths: list[float | None]
    ) -> None:
        n = len(depths)
        src, dst, dist = acc.src[_CONNECTS], acc.dst[_CONNECTS], acc.dist[_CONNECTS]
        for a, b in bp.adjacency:
            if a < n and b < n:
                src.append(l0 + a)
                dst.append(l0 + b)
                da, db = depths[a], depths[b]
                dist.append(-1.0 if da is None or db is None else abs(da - db))
        monitored = sorted({i for i in bp.monitored_layers if i < n})
        for s, sd in enumerate(seed_depths):
            for i in monitored:
                ld = depths[i]
                gap = -1.0 if sd is None or ld is None else abs(sd - ld)
                for rel, a, b in ((_MONITORS, s, l0 + i), (_LAYER_MONITORED, l0 + i, s)):
                    acc.src[rel].append(a)
                    acc.dst[rel].append(b)
                    acc.dist[rel].append(gap)

    @staticmethod
    def _seed_edges(acc: _Acc, seed_depths: list[float | None]) -> None:
        n = len(seed_depths)
        acc.both(_INFLUENCES, _REPORTS, [0] * n, range(n))
        src, dst, dist = acc.src[_PEER], acc.dst[_PEER], acc.dist[_PEER]
        for i, di in enumerate(seed_depths):
            for j, dj in enumerate(seed_depths):
                if i != j:
                    src.append(i)
                    dst.append(j)
                    dist.append(-1.0 if di is None or dj is None else abs(di - dj))

    # -- tensors -----------------------------------------------------------------------------

    def _assemble(self, acc: _Acc) -> GraphInputs:
        """Phase 2: three tensors (features, edge indices, edge attributes) split into views."""
        flat: list[float] = []
        sizes: list[int] = []
        rows: list[int] = []
        for t in NODE_TYPES:
            n = acc.counts[t]
            feats = acc.feats[t] if n else [0.0] * NODE_DIMS[t]
            flat += feats
            sizes.append(len(feats))
            rows.append(max(n, 1))
        index: list[int] = []
        attr: list[float] = []
        edge_counts: list[int] = []
        for rel in range(len(RELATIONS)):
            src = acc.src[rel]
            edge_counts.append(len(src))
            if src:
                index += src
                index += acc.dst[rel]
                attr += _edge_attrs(acc, rel)
        # numpy converts a list of Python numbers ~3x faster than torch.tensor; from_numpy shares memory.
        x_all = torch.from_numpy(np.array(flat, dtype=np.float32))
        index_all = torch.from_numpy(np.array(index, dtype=np.int64))
        attr_all = torch.from_numpy(np.array(attr, dtype=np.float32))
        if self._move:
            x_all = x_all.to(self._device, non_blocking=True)
            index_all = index_all.to(self._device, non_blocking=True)
            attr_all = attr_all.to(self._device, non_blocking=True)
        x_parts = torch.split(x_all, sizes)
        x = {t: part.view(n, NODE_DIMS[t]) for t, part, n in zip(NODE_TYPES, x_parts, rows, strict=True)}
        index_parts = torch.split(index_all, [2 * e for e in edge_counts])
        attr_parts = torch.split(attr_all.view(-1, 3), edge_counts)
        edge_index = {et: part.view(2, -1) for et, part in zip(RELATIONS, index_parts, strict=True)}
        edge_attr = dict(zip(RELATIONS, attr_parts, strict=True))
        coverage, mean = summarise(acc.counts, acc.present, edge_counts)
        return GraphInputs(
            x=x,
            edge_index=edge_index,
            edge_attr=edge_attr,
            counts=acc.counts,
            seed_ids=acc.seed_ids,
            blueprint_ids=acc.blueprint_ids,
            coverage=coverage,
            feature_coverage=mean,
            truncated=acc.truncated,
        )


def _edge_attrs(acc: _Acc, rel: int) -> list[float]:
    """Flat ``[weight, known, distance] * E`` for one relation (see the module docstring)."""
    dst = acc.dst[rel]
    deg = [0] * acc.counts[_DST_TYPE[rel]]
    for d in dst:
        deg[d] += 1
    out: list[float] = []
    inv_scale = 1.0 / MAX_LAYERS
    for d, gap in zip(dst, acc.dist[rel], strict=True):
        out += (1.0 / deg[d], 0.0, 0.0) if gap < 0.0 else (1.0 / deg[d], 1.0, _tanh(gap * inv_scale))
    return out


def _check_ids(kind: str, ids: Sequence[str]) -> None:
    if not all(ids):
        missing = [i for i, v in enumerate(ids) if not v]
        raise DependencyViolationError(f"{kind} at position(s) {missing} has no {kind}_id; refusing to invent one")
    if len(set(ids)) != len(ids):
        raise DependencyViolationError(f"duplicate {kind}_id in {list(ids)!r}")


def _total_parameters(layers: Sequence[LayerInfo]) -> float | None:
    """Sum of layer parameter counts, or None unless every layer (at least one) reports one."""
    if not layers:
        return None
    total = 0.0
    for layer in layers:
        count = _num(layer.parameter_count)
        if count is None:
            return None
        total += count
    return total


def _merged_parameters(bp: BlueprintInfo) -> list[tuple[float | None, float | None, float | None, bool]]:
    """(min, max, default, allowed) per parameter: extras first, then descriptor-only names (sorted)."""
    allowed = bp.descriptor.allowed_parameters
    rows: list[tuple[float | None, float | None, float | None, bool]] = []
    seen: set[str] = set()
    for p in bp.parameters:
        seen.add(p.name)
        if p.name in allowed:
            rng = allowed[p.name]
            rows.append((_num(rng.min_value), _num(rng.max_value), _num(p.default), True))
        else:
            rows.append((_num(p.min), _num(p.max), _num(p.default), False))
    for name in sorted(allowed):
        if name not in seen:
            rng = allowed[name]
            rows.append((_num(rng.min_value), _num(rng.max_value), None, True))
    return rows
