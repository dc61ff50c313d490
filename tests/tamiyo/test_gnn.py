"""TamiyoGNN: shapes on random graphs, the batched layers against per-relation PyG/loop references,
placeholder rows, determinism and checkpoints. Tiny widths, real torch, no timing."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from esper.core.errors import ConfigurationError
from esper.tamiyo.gnn import (
    GNNConfig,
    HeteroGATLayer,
    HeteroSAGELayer,
    PackedGraph,
    PolicyOutputs,
    TamiyoGNN,
    fold_attention,
)
from esper.tamiyo.schema import (
    BLEND_METHODS,
    EDGE_ATTR_DIM,
    NODE_DIMS,
    NODE_TYPES,
    RELATIONS,
    EdgeType,
    NodeType,
)

SMALL = GNNConfig(hidden_dim=16, gat_dim=8, gat_heads=2)
Graph = tuple[dict[NodeType, Tensor], dict[EdgeType, Tensor], dict[EdgeType, Tensor], dict[NodeType, int]]


def random_graph(
    counts: Mapping[NodeType, int] | None = None,
    *,
    max_edges: int = 4,
    empty: tuple[EdgeType, ...] = (),
    seed: int = 0,
) -> Graph:
    """Random inputs shaped like the graph builder's ``GraphInputs``.

    Each type has ``max(count, 1)`` rows, real rows first; a type with count 0 gets one all-zero
    placeholder row and no edges. Each relation gets 0..max_edges distinct edges between real rows
    (none for relations in ``empty``).
    """
    gen = torch.Generator().manual_seed(seed)
    counts = dict(counts or {"global": 1, "seed": 3, "blueprint": 2, "layer": 4, "activation": 2, "parameter": 2})
    x: dict[NodeType, Tensor] = {}
    for t in NODE_TYPES:
        rows = torch.zeros(max(counts[t], 1), NODE_DIMS[t])
        rows[: counts[t]] = torch.randn(counts[t], NODE_DIMS[t], generator=gen)
        x[t] = rows
    edge_index: dict[EdgeType, Tensor] = {}
    edge_attr: dict[EdgeType, Tensor] = {}
    for rel in RELATIONS:
        n_src, n_dst = counts[rel[0]], counts[rel[2]]
        n = 0 if rel in empty else int(torch.randint(0, max_edges + 1, (1,), generator=gen))
        pairs = torch.randperm(n_src * n_dst, generator=gen)[: min(n, n_src * n_dst)]
        edge_index[rel] = torch.stack([pairs // max(n_dst, 1), pairs % max(n_dst, 1)]).long()
        edge_attr[rel] = torch.rand(pairs.numel(), EDGE_ATTR_DIM, generator=gen)
    return x, edge_index, edge_attr, counts


def _pyg() -> Any:
    """``torch_geometric.nn``, imported quietly (PyG 2.8 trips torch's jit.script deprecation warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch_geometric.nn as pyg_nn
    return pyg_nn


def _model(config: GNNConfig = SMALL, seed: int = 0) -> TamiyoGNN:
    torch.manual_seed(seed)
    return TamiyoGNN(config).eval()


def _param(model: TamiyoGNN, name: str) -> Tensor:
    return dict(model.named_parameters())[name]


def _assert_same(a: PolicyOutputs, b: PolicyOutputs) -> None:
    for name in PolicyOutputs.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


COUNT_CASES = [
    {"global": 1, "seed": 3, "blueprint": 2, "layer": 8, "activation": 4, "parameter": 3},
    {"global": 1, "seed": 0, "blueprint": 0, "layer": 0, "activation": 0, "parameter": 0},
    {"global": 1, "seed": 1, "blueprint": 0, "layer": 3, "activation": 1, "parameter": 0},
    {"global": 1, "seed": 5, "blueprint": 1, "layer": 2, "activation": 2, "parameter": 1},
]


@pytest.mark.parametrize("counts", COUNT_CASES)
@pytest.mark.parametrize("config", [SMALL, GNNConfig(hidden_dim=16, gat_dim=8, gat_heads=2, gat_concat=False)])
def test_output_shapes(counts: dict[NodeType, int], config: GNNConfig) -> None:
    x, ei, ea, c = random_graph(counts)
    out = _model(config)(x, ei, ea, c)
    assert out.policy_logits.shape == (32,)
    assert out.policy_params.shape == (4,) and out.param_delta.shape == ()
    assert out.param_delta == out.policy_params[0]
    assert out.policy_params.abs().max() <= 1.0 and out.schedule.abs().max() <= 1.0  # tanh heads
    assert out.blending_logits.shape == (len(BLEND_METHODS),)
    assert out.schedule.shape == (2,) and out.risk_logits.shape == (5,)
    assert out.value.shape == () and out.breaker_logits.shape == (2,)
    assert out.graph_embedding.shape == (config.out_dim,)
    assert out.seed_scores.shape == out.seed_mask.shape == (max(counts["seed"], 1),)
    assert out.blueprint_mask.shape == (max(counts["blueprint"], 1),)
    assert out.blueprint_scores.shape == (max(counts["seed"], 1), max(counts["blueprint"], 1))  # per seed
    assert int(out.seed_mask.sum()) == counts["seed"] and int(out.blueprint_mask.sum()) == counts["blueprint"]
    for name in ("policy_logits", "policy_params", "blending_logits", "schedule", "risk_logits", "graph_embedding"):
        assert torch.isfinite(getattr(out, name)).all(), name


def test_zero_edge_graph_and_no_layers() -> None:
    x, ei, ea, c = random_graph(empty=RELATIONS)
    assert sum(v.size(1) for v in ei.values()) == 0
    out = _model(GNNConfig(hidden_dim=8, sage_layers=1, gat_layers=0))(x, ei, ea, c)
    assert out.graph_embedding.shape == (8,) and torch.isfinite(out.graph_embedding).all()


def test_placeholder_rows_score_minus_inf_and_do_not_enter_the_embedding() -> None:
    counts = {"global": 1, "seed": 0, "blueprint": 0, "layer": 2, "activation": 1, "parameter": 1}
    out = _model()(*random_graph(counts))
    assert out.seed_mask.tolist() == [False] and out.blueprint_mask.tolist() == [False]
    assert out.seed_scores.tolist() == [-math.inf] and out.blueprint_scores.tolist() == [[-math.inf]]

    counts = {"global": 1, "seed": 2, "blueprint": 1, "layer": 2, "activation": 1, "parameter": 1}
    x, ei, ea, c = random_graph(counts)
    # Two extra placeholder seed rows and a placeholder global row past the real one: ignored.
    x2 = dict(x, seed=torch.cat([x["seed"], torch.zeros(2, NODE_DIMS["seed"])]))
    x2["global"] = torch.cat([x["global"], torch.zeros(1, NODE_DIMS["global"])])
    model = _model()
    a, b = model(x, ei, ea, c), model(x2, ei, ea, c)
    assert b.seed_mask.tolist() == [True, True, False, False]
    assert torch.isinf(b.seed_scores[2:]).all() and torch.allclose(a.seed_scores, b.seed_scores[:2], atol=1e-6)
    assert torch.allclose(a.graph_embedding, b.graph_embedding, atol=1e-6)


def _reference_sage(layer: HeteroSAGELayer, x: dict[NodeType, Tensor], ei: dict[EdgeType, Tensor]) -> dict[str, Tensor]:
    """The straightforward version: one SAGE conv per relation, then the mean over each type's relations."""
    per_type: dict[NodeType, list[Tensor]] = {t: [] for t in NODE_TYPES}
    for r, (src, _, dst) in enumerate(RELATIONS):
        n_dst = x[dst].size(0)
        agg = torch.zeros(n_dst, layer.in_dim).index_add(0, ei[(src, _, dst)][1], x[src][ei[(src, _, dst)][0]])
        deg = torch.zeros(n_dst).index_add(0, ei[(src, _, dst)][1], torch.ones(ei[(src, _, dst)].size(1)))
        mean = agg / deg.clamp(min=1).unsqueeze(1)
        root = x[dst] @ layer.weight_root[NODE_TYPES.index(dst)]
        per_type[dst].append(mean @ layer.weight_nbr[r] + layer.bias[r] + root)
    return {t: torch.stack(v).mean(0) for t, v in per_type.items()}


def _packed(model: TamiyoGNN, graph: Graph, h: dict[NodeType, Tensor]) -> tuple[PackedGraph, Tensor]:
    g = model.pack(*graph)
    dense = torch.zeros(len(NODE_TYPES), g.n_max, next(iter(h.values())).size(1))
    for i, t in enumerate(NODE_TYPES):
        dense[i, : h[t].size(0)] = h[t]
    return g, dense


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_sage_matches_per_relation_loop_and_pyg(seed: int) -> None:
    torch.manual_seed(seed)
    graph = random_graph(
        {"global": 1, "seed": 3, "blueprint": 2, "layer": 5, "activation": 2, "parameter": 2},
        max_edges=6,
        seed=seed,
        empty=(RELATIONS[seed],),
    )
    width = 12
    h = {t: torch.randn(v.size(0), width) for t, v in graph[0].items()}
    layer = HeteroSAGELayer(width, 10)
    g, dense = _packed(_model(), graph, h)
    with torch.no_grad():
        ours = layer(dense, g)
        loop = _reference_sage(layer, h, graph[1])
        # PyG: the same weights; each relation's root is its type's root (HeteroConv averages them).
        nn = _pyg()
        pyg = nn.HeteroConv({r: nn.SAGEConv((width, width), 10, aggr="mean") for r in RELATIONS}, aggr="mean")
        for r, rel in enumerate(RELATIONS):
            conv = pyg.convs[rel]
            conv.lin_l.weight.copy_(layer.weight_nbr[r].t())
            conv.lin_l.bias.copy_(layer.bias[r])
            conv.lin_r.weight.copy_(layer.weight_root[NODE_TYPES.index(rel[2])].t())
        ref = pyg(h, graph[1])
    for i, t in enumerate(NODE_TYPES):
        n = h[t].size(0)
        torch.testing.assert_close(ours[i, :n], loop[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[i, :n], ref[t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("concat", [True, False])
def test_batched_gat_matches_pyg_heteroconv(concat: bool) -> None:
    torch.manual_seed(3)
    graph = random_graph(
        {"global": 1, "seed": 3, "blueprint": 2, "layer": 5, "activation": 3, "parameter": 2}, max_edges=6, seed=3
    )
    width, heads, out_dim = 12, 2, 8
    h = {t: torch.randn(v.size(0), width) for t, v in graph[0].items()}
    layer = HeteroGATLayer(width, out_dim, heads=heads, concat=concat, negative_slope=0.2)
    c = layer.head_dim
    nn = _pyg()
    pyg = nn.HeteroConv(
        {
            r: nn.GATConv((width, width), c, heads=heads, concat=concat, add_self_loops=False, edge_dim=EDGE_ATTR_DIM)
            for r in RELATIONS
        },
        aggr="mean",
    )
    with torch.no_grad():
        for r, rel in enumerate(RELATIONS):
            conv = pyg.convs[rel]
            conv.bias.normal_()
            layer.weight_src[r].copy_(conv.lin_src.weight.t())
            layer.att_src[r].copy_(conv.att_src[0])
            layer.dst_att[r].copy_(fold_attention(conv.lin_dst.weight.t().unsqueeze(0), conv.att_dst)[0])
            layer.edge_att[r].copy_(fold_attention(conv.lin_edge.weight.t().unsqueeze(0), conv.att_edge)[0])
            layer.bias[r].copy_(conv.bias)
        g, dense = _packed(_model(), graph, h)
        ours = layer(dense, g)
        ref = pyg(h, graph[1], edge_attr_dict=graph[2])
    for i, t in enumerate(NODE_TYPES):
        torch.testing.assert_close(ours[i, : h[t].size(0)], ref[t], atol=1e-5, rtol=1e-5)


def test_untrained_policy_prefers_class_zero() -> None:
    out = _model()(*random_graph())
    assert int(out.policy_logits.argmax()) == 0
    assert out.policy_logits[0] == 0.5 and torch.all(out.policy_logits[1:] == -0.5)


def test_untrained_param_head_asks_for_no_change_and_still_learns() -> None:
    """param_delta is an OPTIMIZER's lr_delta: an untrained policy must not move the learning rate
    (an initial GNN once doubled it step after step), yet the head must be trainable."""
    model = _model()
    for counts in COUNT_CASES:
        assert _model()(*random_graph(counts)).param_delta == 0.0
    graph = random_graph()
    opt = torch.optim.SGD(model.param_head.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        ((model(*graph).param_delta - 0.5) ** 2).backward()
        opt.step()
    assert float(model(*graph).param_delta.detach()) > 0.1


def test_deterministic_under_manual_seed() -> None:
    graph = random_graph()
    a, b = _model(seed=7), _model(seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    _assert_same(a(*graph), b(*graph))
    _assert_same(a(*graph), a(*graph))
    assert not torch.equal(_param(_model(seed=8), "sage.0.weight_nbr"), _param(a, "sage.0.weight_nbr"))


def test_state_dict_round_trip_weights_only() -> None:
    graph = random_graph(seed=4)
    src = _model(seed=1)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert not any(k.startswith(("rel_", "type_rel")) for k in state)  # relation tables are not state
    dst = _model(seed=2)
    dst.load_state_dict(state)
    _assert_same(src(*graph), dst(*graph))


def test_reset_parameters_redraws_and_keeps_policy_prior() -> None:
    model = _model(seed=0)
    before = _param(model, "gat.0.weight_src").clone()
    with torch.no_grad():
        model.policy_head.weight.fill_(3.0)
    model.reset_parameters()
    assert not torch.equal(before, _param(model, "gat.0.weight_src"))
    assert torch.all(model.policy_head.weight == 0) and model.policy_head.bias[0] == 0.5
    # Encoder weight rows past a type's width stay zero.
    assert torch.all(model.enc_weight[NODE_TYPES.index("activation"), NODE_DIMS["activation"] :] == 0)


def test_backward_reaches_relation_weights_in_train_mode() -> None:
    model = _model()
    model.train()
    out = model(*random_graph(max_edges=6))
    (out.value + out.policy_params.sum() + out.seed_scores[out.seed_mask].sum()).backward()
    for name in ("sage.0.weight_nbr", "sage.1.weight_root", "gat.0.weight_src", "gat.1.dst_att", "gat.1.edge_att"):
        grad = _param(model, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_repr_is_compact() -> None:
    text = repr(TamiyoGNN())
    assert "\n" not in text and text.startswith("TamiyoGNN(hidden=128") and "relations=21" in text
    assert "heads=2 (concat)" in repr(HeteroGATLayer(4, 8, heads=2, concat=True, negative_slope=0.2))


def test_prototype_config_and_validation() -> None:
    proto = GNNConfig.prototype()
    assert (proto.hidden_dim, proto.gat_dim, proto.gat_heads, proto.gat_concat) == (256, 128, 4, False)
    with pytest.raises(ConfigurationError):
        GNNConfig(gat_dim=10, gat_heads=4, gat_concat=True)
    with pytest.raises(ConfigurationError):
        GNNConfig(dropout=1.0)


def test_to_device_moves_relation_tables() -> None:
    model = _model().to(torch.device("cpu"), torch.float64)
    assert model.rel_src.device.type == "cpu" and model.rel_src.dtype == torch.long
    x, ei, ea, c = random_graph()
    out = model({t: v.double() for t, v in x.items()}, ei, {r: v.double() for r, v in ea.items()}, c)
    assert out.policy_logits.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = _model()
    graph = random_graph()
    ref = model(*graph)
    x, ei, ea, c = graph
    cuda = model.to("cuda")
    out = cuda({t: v.cuda() for t, v in x.items()}, {r: v.cuda() for r, v in ei.items()}, ea, c).detach_cpu()
    torch.testing.assert_close(out.policy_params, ref.policy_params, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.seed_scores, ref.seed_scores, atol=1e-4, rtol=1e-4)
