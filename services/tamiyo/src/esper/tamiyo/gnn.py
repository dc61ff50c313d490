"""Tamiyo's hetero-GNN: the prototype's shape with every relation of a layer batched into a few tensor ops.

The prototype (REFERENCE §6.2) is per-type encoders, 2 x HeteroConv(SAGEConv) at 256 and 2 x
HeteroConv(GATConv, 4 heads, edge_dim 3) at 128 over 21 relations, mean aggregation, residuals,
dropout 0.2. Written with PyG it makes 84 small conv calls per forward and costs p95 ≈ 14 ms on one
CPU thread, almost all of it Python overhead (ARCHITECTURE §11). The graph is tiny (~21 nodes) and its
relation table is fixed, so here each layer keeps its per-relation weights stacked ([R, in, out]) and
does message passing for all 21 relations at once:

1. nodes live in one padded tensor ``[T, n_max, width]`` (T node types, rows past a type's size unused);
2. ``index_select`` gives each relation its source type's rows, one ``bmm`` applies each relation's
   weight to them, one ``index_select`` picks each edge's message;
3. one ``index_add`` scatters the messages into their destination rows, each edge pre-weighted so the
   sum is exactly HeteroConv's mean over relations of each relation's mean (SAGE) or attention-weighted
   sum (GAT).

A SAGE layer is PyG's ``HeteroConv({r: SAGEConv((-1, -1), out)}, aggr="mean")`` exactly, with one
reparametrisation: HeteroConv averages the k root terms ``W_root[r] x`` of a destination type's k
relations, which is one linear map per destination type, so the root weight is stored per type.
A GAT layer is ``HeteroConv({r: GATConv((-1, -1), C, heads, concat, edge_dim=3,
add_self_loops=False)}, aggr="mean")``. Tests check both against PyG with copied weights.

Inputs follow PyG's ``*_dict`` convention: ``x_dict`` (every node type, ≥ 1 row each, real rows first),
``edge_index_dict`` and ``edge_attr_dict`` (every relation of ``schema.RELATIONS``, E may be 0) and
``counts`` (real rows per type; the rest are all-zero placeholders that must never be selected).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.core.errors import ConfigurationError
from esper.tamiyo.schema import (
    BLEND_METHODS,
    BREAKER_DIM,
    EDGE_ATTR_DIM,
    NODE_DIMS,
    NODE_TYPES,
    PARAM_DIM,
    POLICY_CLASSES,
    RELATIONS,
    RISK_CLASSES,
    SCHEDULE_DIM,
    EdgeType,
    NodeType,
)

__all__ = [
    "GNNConfig",
    "HeteroGATLayer",
    "HeteroSAGELayer",
    "PackedGraph",
    "PolicyOutputs",
    "TamiyoGNN",
    "fold_attention",
]

_TYPE_INDEX: dict[NodeType, int] = {t: i for i, t in enumerate(NODE_TYPES)}
_REL_SRC: tuple[int, ...] = tuple(_TYPE_INDEX[s] for s, _, _ in RELATIONS)
_REL_DST: tuple[int, ...] = tuple(_TYPE_INDEX[d] for _, _, d in RELATIONS)
# HeteroConv(aggr="mean") divides by the number of relations that end at a type (every type has ≥ 1).
_DST_FAN_IN: tuple[int, ...] = tuple(_REL_DST.count(t) for t in range(len(NODE_TYPES)))
assert min(_DST_FAN_IN) >= 1


@dataclass(frozen=True, slots=True)
class GNNConfig:
    """Widths and depth of :class:`TamiyoGNN`.

    The prototype's shape is encoders and SAGE at 256 and GAT at 128 per head x 4 heads, averaged
    (``GATConv(-1, 128, heads=4, concat=False)``): ``GNNConfig.prototype()``. Batched here it is
    7.8 M weights, and CPU inference is bound by streaming them: p50 2.9 / p95 3.5 / p99 5.4 ms on one
    thread (bench/tamiyo_inference_bench.py, 21 nodes, 61 edges, 2000 iterations; the PyG HeteroConv
    version ran p50 17.0 / p95 18.3 ms in the same run). That meets the 5 ms inference budget, but not
    with room for the rest of a 5 ms decision round trip (Redis, graph build, risk engine, signing).
    So the defaults keep the depth, the 4 heads and the 128-wide GAT output but use hidden 128 and
    4 x 32 concatenated heads: 1.6 M weights, p50 1.3 / p95 1.4 / p99 2.1 ms in that run.
    """

    hidden_dim: int = 128  # encoders and SAGE layers (prototype: 256)
    sage_layers: int = 2
    gat_layers: int = 2
    gat_dim: int = 128  # output width of each GAT layer
    gat_heads: int = 4
    # True: heads of gat_dim // gat_heads channels, concatenated. False (prototype): each head has
    # gat_dim channels and the heads are averaged (4x the weights of concat).
    gat_concat: bool = True
    negative_slope: float = 0.2  # GAT attention LeakyReLU, as GATConv
    dropout: float = 0.2
    policy_classes: int = POLICY_CLASSES
    param_dim: int = PARAM_DIM
    blend_classes: int = len(BLEND_METHODS)
    schedule_dim: int = SCHEDULE_DIM
    risk_classes: int = RISK_CLASSES
    breaker_dim: int = BREAKER_DIM
    pair_dim: int = 32  # rank of the seed x blueprint interaction in the blueprint scores

    def __post_init__(self) -> None:
        widths = (self.hidden_dim, self.gat_dim, self.gat_heads, self.pair_dim)
        if min(widths) < 1 or min(self.sage_layers, self.gat_layers) < 0:
            raise ConfigurationError(f"GNNConfig widths must be ≥ 1 and depths ≥ 0: {self}")
        if self.gat_concat and self.gat_dim % self.gat_heads:
            raise ConfigurationError(f"gat_dim {self.gat_dim} is not divisible by gat_heads {self.gat_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(f"dropout must be in [0, 1): {self.dropout}")
        if self.policy_classes < 5:
            raise ConfigurationError("policy_classes must cover the action table (indices 0..4)")

    @classmethod
    def prototype(cls) -> GNNConfig:
        """The prototype's exact widths (REFERENCE §6.2): hidden 256, GAT 4 heads x 128 averaged."""
        return cls(hidden_dim=256, gat_concat=False)

    @property
    def out_dim(self) -> int:
        """Width of the node embeddings the heads read."""
        if self.gat_layers:
            return self.gat_dim
        return self.hidden_dim


@dataclass(frozen=True, slots=True)
class PackedGraph:
    """One graph in the padded, relation-batched layout every layer reads (built by ``TamiyoGNN.pack``).

    Node ``i`` of type ``t`` is row ``t * n_max + i``; ``slot`` indices address per-relation tables
    ``[R * n_max]`` (``r * n_max + i``). Edges of all relations are concatenated in RELATIONS order.
    """

    x: Tensor  # [T, n_max, d_max] raw features, zero-padded
    sizes: tuple[int, ...]  # rows per type (real + placeholder)
    counts: tuple[int, ...]  # real rows per type (they come first)
    real: Tensor  # [T, n_max] bool: a real (non-placeholder) row
    rel: Tensor  # [E] relation id of each edge
    src_slot: Tensor  # [E] r * n_max + source row
    dst_slot: Tensor  # [E] r * n_max + destination row
    dst_node: Tensor  # [E] dst_type * n_max + destination row
    edge_attr: Tensor  # [E, EDGE_ATTR_DIM]
    sage_weight: Tensor  # [E] 1 / (in-degree of the dst within its relation · relations ending at its type)
    rel_scale: Tensor  # [E] 1 / relations ending at the destination's type
    rel_src: Tensor  # [R] source type of each relation
    rel_dst: Tensor  # [R] destination type of each relation
    type_rel_mean: Tensor  # [T, R] averages per-relation vectors (biases) over each type's relations

    @property
    def n_max(self) -> int:
        return self.x.size(1)


@dataclass(frozen=True, slots=True)
class PolicyOutputs:
    """Everything one forward produces for one graph (no batch dimension)."""

    policy_logits: Tensor  # [policy_classes]
    policy_params: Tensor  # [param_dim], tanh
    param_delta: Tensor  # [] = policy_params[0]
    blending_logits: Tensor  # [blend_classes]
    schedule: Tensor  # [schedule_dim], tanh (start, end) in [-1, 1]
    risk_logits: Tensor  # [risk_classes]
    value: Tensor  # []
    breaker_logits: Tensor  # [breaker_dim] (open, close)
    seed_scores: Tensor  # [N_seed], -inf on placeholder rows
    seed_mask: Tensor  # [N_seed] bool, True on real rows
    # [N_seed, N_blueprint]: each blueprint's score for a germination of each seed (which seed and
    # which design are one choice: a design that pays in a hidden slot can fail in the input slot);
    # -inf on placeholder rows and columns.
    blueprint_scores: Tensor
    blueprint_mask: Tensor  # [N_blueprint] bool
    graph_embedding: Tensor  # [out_dim], mean over the real global nodes

    def detach_cpu(self) -> PolicyOutputs:
        """A copy on the CPU, off the autograd graph: what the decision code reads."""
        return PolicyOutputs(**{f.name: getattr(self, f.name).detach().cpu() for f in fields(self)})


def _uniform_(t: Tensor, bound: float) -> None:
    with torch.no_grad():
        t.uniform_(-bound, bound)


def _glorot_(t: Tensor) -> None:
    """PyG's glorot on the last two dims (stacked relations are the leading dim)."""
    _uniform_(t, math.sqrt(6.0 / (t.size(-2) + t.size(-1))))


class HeteroSAGELayer(nn.Module):
    """``HeteroConv({r: SAGEConv((-1, -1), out)}, aggr="mean")`` over all RELATIONS in three big ops.

    Per relation r and destination i: ``W_nbr[r]·mean_{j→i}(x_j) + b[r] + W_root[r]·x_i``, averaged over
    the relations ending at i's type. The averaged root term is one map per destination type, so
    ``weight_root`` is stored per type (an exact reparametrisation of the per-relation roots).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.weight_nbr = nn.Parameter(torch.empty(len(RELATIONS), in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(len(RELATIONS), out_dim))
        self.weight_root = nn.Parameter(torch.empty(len(NODE_TYPES), in_dim, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyG Linear's default: kaiming_uniform(a=√5) ≡ U(±1/√fan_in), bias likewise.
        bound = 1.0 / math.sqrt(self.in_dim)
        for p in (self.weight_nbr, self.bias, self.weight_root):
            _uniform_(p, bound)

    def forward(self, h: Tensor, g: PackedGraph) -> Tensor:
        t, n, _ = h.shape
        src = h.index_select(0, g.rel_src)  # [R, n, in]: each relation sees its source type's rows
        msg = torch.bmm(src, self.weight_nbr).view(-1, self.out_dim)  # [R*n, out]
        msg = msg.index_select(0, g.src_slot) * g.sage_weight.unsqueeze(1)  # [E, out]
        bias = (g.type_rel_mean @ self.bias).unsqueeze(1)  # [T, 1, out]
        out = torch.baddbmm(bias, h, self.weight_root)  # [T, n, out]
        return out.view(t * n, self.out_dim).index_add(0, g.dst_node, msg).view(t, n, self.out_dim)

    def extra_repr(self) -> str:
        return f"{self.in_dim}, {self.out_dim}, relations={len(RELATIONS)}"


class HeteroGATLayer(nn.Module):
    """``HeteroConv({r: GATConv((-1, -1), C, heads, concat, edge_dim=3, add_self_loops=False)},
    aggr="mean")`` over all RELATIONS at once.

    Per relation and head: ``a_ji = softmax_j(LeakyReLU(att_s·W_s x_j + att_d·W_d x_i + att_e·W_e e_ji))``
    over the edges into i; message ``Σ_j a_ji W_s x_j`` (+ bias). Without self-loops GATConv uses
    ``W_d`` and ``W_e`` only inside those dot products, so each pair is stored folded into one vector
    per head (``dst_att = W_dᵀatt_d``, ``edge_att = W_eᵀatt_e``): the same function, and 2.8 M fewer
    weights to stream per forward at the prototype's widths (CPU inference here is bound by reading
    weights, not by arithmetic).
    """

    def __init__(self, in_dim: int, out_dim: int, *, heads: int, concat: bool, negative_slope: float) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.heads = heads
        self.concat = concat
        self.head_dim = out_dim // heads if concat else out_dim
        self.negative_slope = negative_slope
        r = len(RELATIONS)
        self.weight_src = nn.Parameter(torch.empty(r, in_dim, heads * self.head_dim))
        self.att_src = nn.Parameter(torch.empty(r, heads, self.head_dim))
        self.dst_att = nn.Parameter(torch.empty(r, in_dim, heads))
        self.edge_att = nn.Parameter(torch.empty(r, EDGE_ATTR_DIM, heads))
        self.bias = nn.Parameter(torch.empty(r, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As GATConv (glorot everywhere, zero bias); the folded vectors are folded from glorot draws.
        r, heads, c = len(RELATIONS), self.heads, self.head_dim
        _glorot_(self.weight_src)
        _glorot_(self.att_src)
        with torch.no_grad():
            for folded, width in ((self.dst_att, self.in_dim), (self.edge_att, EDGE_ATTR_DIM)):
                w, att = torch.empty(r, width, heads * c), torch.empty(r, heads, c)
                _glorot_(w)
                _glorot_(att)
                folded.copy_(fold_attention(w, att))
            self.bias.zero_()

    def forward(self, h: Tensor, g: PackedGraph) -> Tensor:
        t, n, _ = h.shape
        r, heads, c = len(RELATIONS), self.heads, self.head_dim
        src = torch.bmm(h.index_select(0, g.rel_src), self.weight_src).view(r, n, heads, c)
        a_src = (src * self.att_src.unsqueeze(1)).sum(-1).view(r * n, heads)
        a_dst = torch.bmm(h.index_select(0, g.rel_dst), self.dst_att).view(r * n, heads)
        a_edge = torch.bmm(g.edge_attr.unsqueeze(1), self.edge_att.index_select(0, g.rel)).squeeze(1)  # [E, heads]
        alpha = a_src.index_select(0, g.src_slot) + a_dst.index_select(0, g.dst_slot) + a_edge
        alpha = F.leaky_relu(alpha, self.negative_slope)
        # Softmax over the edges of each (relation, destination) slot, stabilised by the slot's max.
        slot = g.dst_slot.unsqueeze(1).expand_as(alpha)
        peak = alpha.new_full((r * n, heads), -math.inf).scatter_reduce(0, slot, alpha, "amax")
        alpha = (alpha - peak.gather(0, slot)).exp()
        denom = alpha.new_zeros(r * n, heads).index_add(0, g.dst_slot, alpha)
        alpha = alpha / (denom.gather(0, slot) + 1e-16)

        msg = src.view(r * n, heads, c).index_select(0, g.src_slot) * alpha.unsqueeze(-1)  # [E, heads, c]
        msg = msg.reshape(-1, heads * c) if self.concat else msg.mean(1)
        msg = msg * g.rel_scale.unsqueeze(1)
        bias = (g.type_rel_mean @ self.bias).unsqueeze(1).expand(t, n, self.out_dim)
        return bias.reshape(t * n, self.out_dim).index_add(0, g.dst_node, msg).view(t, n, self.out_dim)

    def extra_repr(self) -> str:
        mode = "concat" if self.concat else "mean"
        return f"{self.in_dim}, {self.out_dim}, heads={self.heads} ({mode}), edge_dim={EDGE_ATTR_DIM}"


def fold_attention(weight: Tensor, att: Tensor) -> Tensor:
    """``[R, in, heads*C]`` weights and ``[R, heads, C]`` attention → ``[R, in, heads]`` (``Wᵀatt`` per head)."""
    r, width, _ = weight.shape
    heads, c = att.shape[-2:]
    return (weight.view(r, width, heads, c) * att.unsqueeze(1)).sum(-1)


class TamiyoGNN(nn.Module):
    """Encoders → SAGE layers → GAT layers → the prototype's heads (REFERENCE §6.2).

    Each hidden layer is ``dropout(gelu(conv(h)) + h)``, the residual only where widths match (the
    prototype's rule: at its widths the first GAT layer, 256 → 128, has none). Encoders are ``Linear →
    GELU → LayerNorm`` per node type, run as one ``bmm`` over zero-padded features. Edge indices are
    trusted to be within their types' rows (the builder's contract; checking would cost a sync).
    """

    rel_src: Tensor
    rel_dst: Tensor
    rel_inv_fan_in: Tensor
    type_rel_mean: Tensor

    def __init__(self, config: GNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or GNNConfig()
        t, d_max, hid = len(NODE_TYPES), max(NODE_DIMS.values()), cfg.hidden_dim
        # Rows past NODE_DIMS[type] see only zero inputs: they stay zero and get zero gradient.
        self.enc_weight = nn.Parameter(torch.empty(t, d_max, hid))
        self.enc_bias = nn.Parameter(torch.empty(t, hid))
        self.enc_norm_weight = nn.Parameter(torch.empty(t, hid))
        self.enc_norm_bias = nn.Parameter(torch.empty(t, hid))
        self.sage = nn.ModuleList(HeteroSAGELayer(hid, hid) for _ in range(cfg.sage_layers))
        gat_in = [hid] + [cfg.gat_dim] * max(0, cfg.gat_layers - 1)
        self.gat = nn.ModuleList(
            HeteroGATLayer(
                i, cfg.gat_dim, heads=cfg.gat_heads, concat=cfg.gat_concat, negative_slope=cfg.negative_slope
            )
            for i in gat_in[: cfg.gat_layers]
        )
        d, mid = cfg.out_dim, max(1, cfg.out_dim // 2)
        self.policy_head = nn.Linear(d, cfg.policy_classes)
        self.param_head = nn.Sequential(nn.Linear(d, mid), nn.GELU(), nn.Linear(mid, cfg.param_dim))
        self.blending_head = nn.Linear(d, cfg.blend_classes)
        self.schedule_head = nn.Sequential(nn.Linear(d, mid), nn.GELU(), nn.Linear(mid, cfg.schedule_dim))
        self.risk_head = nn.Linear(d, cfg.risk_classes)
        self.value_head = nn.Linear(d, 1)
        self.breaker_head = nn.Linear(d, cfg.breaker_dim)
        self.seed_score_head = nn.Linear(d, 1)
        self.blueprint_score_head = nn.Linear(d, 1)
        # Low-rank seed x blueprint interaction: score(s, b) = head(h_b) + <P_s h_s, P_b h_b>.
        self.pair_seed_proj = nn.Linear(d, cfg.pair_dim, bias=False)
        self.pair_blueprint_proj = nn.Linear(d, cfg.pair_dim, bias=False)

        # Relation tables (not state: they follow from schema.RELATIONS).
        self.register_buffer("rel_src", torch.tensor(_REL_SRC, dtype=torch.long), persistent=False)
        self.register_buffer("rel_dst", torch.tensor(_REL_DST, dtype=torch.long), persistent=False)
        fan_in = torch.tensor(_DST_FAN_IN, dtype=torch.float32)
        self.register_buffer("rel_inv_fan_in", 1.0 / fan_in.index_select(0, self.rel_dst), persistent=False)
        type_rel_mean = torch.zeros(t, len(RELATIONS))
        type_rel_mean[self.rel_dst, torch.arange(len(RELATIONS))] = self.rel_inv_fan_in
        self.register_buffer("type_rel_mean", type_rel_mean, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every weight (deterministic under ``torch.manual_seed``)."""
        hid = self.config.hidden_dim
        with torch.no_grad():
            self.enc_weight.zero_()
            for i, t in enumerate(NODE_TYPES):  # xavier_uniform per type, as the prototype's encoders
                _uniform_(self.enc_weight[i, : NODE_DIMS[t]], math.sqrt(6.0 / (NODE_DIMS[t] + hid)))
            self.enc_bias.zero_()
            self.enc_norm_weight.fill_(1.0)
            self.enc_norm_bias.zero_()
        for m in self.modules():
            if isinstance(m, HeteroSAGELayer | HeteroGATLayer):
                m.reset_parameters()
        for head in (
            self.param_head,
            self.blending_head,
            self.schedule_head,
            self.risk_head,
            self.value_head,
            self.breaker_head,
            self.seed_score_head,
            self.blueprint_score_head,
            self.pair_seed_proj,
            self.pair_blueprint_proj,
        ):
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        # An untrained policy must not pick actions at random: all weight on the bias, class 0 ahead.
        # Nor may it move the learning rate: its param_delta (an OPTIMIZER's lr_delta, also what a
        # risk downgrade of a GERMINATE carries) starts at tanh(0) = 0 until Simic trains the head.
        with torch.no_grad():
            self.policy_head.weight.zero_()
            self.policy_head.bias.fill_(-0.5)
            self.policy_head.bias[0] = 0.5
            last = self.param_head[-1]
            assert isinstance(last, nn.Linear)
            last.weight.zero_()
            last.bias.zero_()
            # The interaction starts at 0 (one factor zero, as LoRA's B): an untrained policy scores a
            # blueprint the same for every seed, and training grows the term from the other factor.
            self.pair_blueprint_proj.weight.zero_()
            # Seed and blueprint scores also start at 0: they add to GERMINATE's logit (policy
            # joint_action_logits), which must not be moved at random; ties go to the first row.
            for head in (self.seed_score_head, self.blueprint_score_head):
                head.weight.zero_()
                head.bias.zero_()

    def pack(
        self,
        x_dict: Mapping[NodeType, Tensor],
        edge_index_dict: Mapping[EdgeType, Tensor],
        edge_attr_dict: Mapping[EdgeType, Tensor],
        counts: Mapping[NodeType, int],
    ) -> PackedGraph:
        """Dict inputs → the padded, relation-batched layout (a handful of small ops, done once)."""
        xs = [x_dict[t] for t in NODE_TYPES]
        sizes = tuple(x.size(0) for x in xs)
        n_max = max(sizes)
        dev, dtype = self.enc_weight.device, self.enc_weight.dtype
        x = torch.zeros(len(NODE_TYPES), n_max, self.enc_weight.size(1), device=dev, dtype=dtype)
        for i, (t, xt) in enumerate(zip(NODE_TYPES, xs, strict=True)):
            if xt.dim() != 2 or xt.size(1) != NODE_DIMS[t] or xt.size(0) < 1:
                raise ValueError(f"x_dict[{t!r}] must be [N ≥ 1, {NODE_DIMS[t]}], got {tuple(xt.shape)}")
            x[i, : xt.size(0), : xt.size(1)] = xt
        real_counts = tuple(max(0, min(counts[t], n)) for t, n in zip(NODE_TYPES, sizes, strict=True))
        real = torch.arange(n_max, device=dev).unsqueeze(0) < torch.tensor(real_counts, device=dev).unsqueeze(1)

        eis = [edge_index_dict[r] for r in RELATIONS]
        per_rel = [ei.size(1) for ei in eis]
        n_edges = sum(per_rel)
        ei = torch.cat(eis, dim=1).to(dev)
        rel = torch.repeat_interleave(
            torch.arange(len(RELATIONS), device=dev), torch.tensor(per_rel, device=dev), output_size=n_edges
        )
        edge_attr = torch.cat([edge_attr_dict[r] for r in RELATIONS], dim=0).to(dev, dtype)
        if edge_attr.shape != (n_edges, EDGE_ATTR_DIM):
            raise ValueError(f"edge_attr_dict must hold [E, {EDGE_ATTR_DIM}] per relation matching edge_index_dict")
        rel_base = rel * n_max
        dst_slot = rel_base + ei[1]
        ones = torch.ones(n_edges, device=dev, dtype=dtype)
        indeg = torch.zeros(len(RELATIONS) * n_max, device=dev, dtype=dtype).index_add_(0, dst_slot, ones)
        rel_scale = self.rel_inv_fan_in.index_select(0, rel)
        return PackedGraph(
            x=x,
            sizes=sizes,
            counts=real_counts,
            real=real,
            rel=rel,
            src_slot=rel_base + ei[0],
            dst_slot=dst_slot,
            dst_node=self.rel_dst.index_select(0, rel) * n_max + ei[1],
            edge_attr=edge_attr,
            sage_weight=rel_scale / indeg.index_select(0, dst_slot),
            rel_scale=rel_scale,
            rel_src=self.rel_src,
            rel_dst=self.rel_dst,
            type_rel_mean=self.type_rel_mean,
        )

    def encode(self, g: PackedGraph) -> Tensor:
        """Per-type ``Linear → GELU → LayerNorm`` for all types at once: [T, n_max, hidden]."""
        h = F.gelu(torch.baddbmm(self.enc_bias.unsqueeze(1), g.x, self.enc_weight))
        h = F.layer_norm(h, (self.config.hidden_dim,))
        return h * self.enc_norm_weight.unsqueeze(1) + self.enc_norm_bias.unsqueeze(1)

    def embed(self, g: PackedGraph) -> Tensor:
        """Node embeddings after all message-passing layers: [T, n_max, out_dim]."""
        h = self.encode(g)
        p, train = self.config.dropout, self.training
        for layer in [*self.sage, *self.gat]:
            out: Tensor = F.gelu(layer(h, g))
            if out.shape == h.shape:
                out = out + h
            h = F.dropout(out, p, train)
        return h

    def forward(
        self,
        x_dict: Mapping[NodeType, Tensor],
        edge_index_dict: Mapping[EdgeType, Tensor],
        edge_attr_dict: Mapping[EdgeType, Tensor],
        counts: Mapping[NodeType, int],
    ) -> PolicyOutputs:
        g = self.pack(x_dict, edge_index_dict, edge_attr_dict, counts)
        return self.heads(self.embed(g), g)

    def heads(self, h: Tensor, g: PackedGraph) -> PolicyOutputs:
        """The prototype's heads: graph-level ones on the mean of the real global nodes, scores per node."""
        ig, i_seed, i_bp = _TYPE_INDEX["global"], _TYPE_INDEX["seed"], _TYPE_INDEX["blueprint"]
        # The builder always has a real global node; were it missing, the placeholder row stands in.
        emb = h[ig, : max(1, g.counts[ig])].mean(0)
        params = torch.tanh(self.param_head(emb))
        seed_mask = g.real[i_seed, : g.sizes[i_seed]]
        bp_mask = g.real[i_bp, : g.sizes[i_bp]]
        h_seed, h_bp = h[i_seed, : g.sizes[i_seed]], h[i_bp, : g.sizes[i_bp]]
        seed_scores = self.seed_score_head(h_seed).squeeze(-1)
        bp_scores = self.pair_scores(h_seed, h_bp)
        pair_mask = seed_mask.unsqueeze(1) & bp_mask.unsqueeze(0)
        return PolicyOutputs(
            policy_logits=self.policy_head(emb),
            policy_params=params,
            param_delta=params[0],
            blending_logits=self.blending_head(emb),
            schedule=torch.tanh(self.schedule_head(emb)),
            risk_logits=self.risk_head(emb),
            value=self.value_head(emb).squeeze(-1),
            breaker_logits=self.breaker_head(emb),
            seed_scores=seed_scores.masked_fill(~seed_mask, -math.inf),
            seed_mask=seed_mask,
            blueprint_scores=bp_scores.masked_fill(~pair_mask, -math.inf),
            blueprint_mask=bp_mask,
            graph_embedding=emb,
        )

    def pair_scores(self, h_seed: Tensor, h_blueprint: Tensor) -> Tensor:
        """[S, P] score of each blueprint (embeddings [P, d]) for each seed (embeddings [S, d])."""
        base: Tensor = self.blueprint_score_head(h_blueprint).squeeze(-1)
        interaction: Tensor = self.pair_seed_proj(h_seed) @ self.pair_blueprint_proj(h_blueprint).t()
        return base.unsqueeze(0) + interaction

    def __repr__(self) -> str:
        c = self.config
        heads = f"{c.gat_heads}x{c.gat_dim // c.gat_heads if c.gat_concat else c.gat_dim}"
        n_params = sum(p.numel() for p in self.parameters())
        return (
            f"{type(self).__name__}(hidden={c.hidden_dim}, sage={c.sage_layers}, "
            f"gat={c.gat_layers}x{c.gat_dim}[{heads} {'concat' if c.gat_concat else 'mean'}], "
            f"relations={len(RELATIONS)}, dropout={c.dropout}, params={n_params})"
        )
