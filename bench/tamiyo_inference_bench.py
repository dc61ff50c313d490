"""Tamiyo GNN inference benchmark: our relation-batched TamiyoGNN beside the naive PyG version of the same shape.

Run: `.venv/bin/python bench/tamiyo_inference_bench.py [--iterations 2000]` (prints JSON).

One forward of one representative graph (21 nodes: 1 global, 3 seeds, 2 blueprints, 8 layers, 4
activations, 3 parameters; 2-4 edges for each of the 21 relations), CPU, `torch.set_num_threads(1)`,
eval mode under `torch.inference_mode()`, after a warm-up; ours at its default widths and at the
prototype's widths (`GNNConfig.prototype()`). The baseline is the prototype's shape written
with PyG (per-type Linear→GELU→LayerNorm encoders, 2 x HeteroConv(SAGEConv 256), 2 x
HeteroConv(GATConv 128, heads=4, concat=False, edge_dim=3), aggr="mean", the same heads), measured in
the same process, interleaved in blocks, because these machines are noisy (ARCHITECTURE §11). The
budget (p95 ≤ 5 ms) is reported as a flag; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv, HeteroConv, SAGEConv

from esper.tamiyo.gnn import GNNConfig, TamiyoGNN
from esper.tamiyo.schema import EDGE_ATTR_DIM, NODE_DIMS, NODE_TYPES, RELATIONS, EdgeType, NodeType

BUDGET_P95_MS = 5.0
SIZES: dict[NodeType, int] = {"global": 1, "seed": 3, "blueprint": 2, "layer": 8, "activation": 4, "parameter": 3}
BLOCK = 100  # iterations per implementation before switching to the other

Graph = tuple[dict[NodeType, Tensor], dict[EdgeType, Tensor], dict[EdgeType, Tensor], dict[NodeType, int]]


def representative_graph(seed: int = 0) -> Graph:
    """A fixed graph of the size a small packet produces (the builder caps layers/activations/parameters)."""
    gen = torch.Generator().manual_seed(seed)
    x = {t: torch.randn(SIZES[t], NODE_DIMS[t], generator=gen) for t in NODE_TYPES}
    edge_index: dict[EdgeType, Tensor] = {}
    edge_attr: dict[EdgeType, Tensor] = {}
    for rel in RELATIONS:
        n_src, n_dst = SIZES[rel[0]], SIZES[rel[2]]
        pairs = torch.randperm(n_src * n_dst, generator=gen)[: min(n_src * n_dst, 2 + len(edge_index) % 3)]
        edge_index[rel] = torch.stack([pairs // n_dst, pairs % n_dst])
        edge_attr[rel] = torch.rand(pairs.numel(), EDGE_ATTR_DIM, generator=gen)
    return x, edge_index, edge_attr, dict(SIZES)


class PyGBaseline(nn.Module):
    """The prototype's GNN shape as PyG HeteroConv layers (84 conv calls a forward): the peer figure."""

    def __init__(self, hidden: int = 256, gat_dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(NODE_DIMS[t], hidden), nn.GELU(), nn.LayerNorm(hidden)) for t in NODE_TYPES}
        )
        self.sage = nn.ModuleList(
            HeteroConv({r: SAGEConv((-1, -1), hidden) for r in RELATIONS}, aggr="mean") for _ in range(2)
        )
        self.gat = nn.ModuleList(
            HeteroConv(
                {
                    r: GATConv((-1, -1), gat_dim, heads=heads, concat=False, add_self_loops=False, edge_dim=3)
                    for r in RELATIONS
                },
                aggr="mean",
            )
            for _ in range(2)
        )
        d = gat_dim
        self.policy = nn.Linear(d, 32)
        self.params = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, 4))
        self.blending = nn.Linear(d, 3)
        self.schedule = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, 2))
        self.risk = nn.Linear(d, 5)
        self.value = nn.Linear(d, 1)
        self.breaker = nn.Linear(d, 2)
        self.seed_score = nn.Linear(d, 1)
        self.blueprint_score = nn.Linear(d, 1)

    def forward(
        self,
        x_dict: dict[NodeType, Tensor],
        edge_index_dict: dict[EdgeType, Tensor],
        edge_attr_dict: dict[EdgeType, Tensor],
        counts: dict[NodeType, int],
    ) -> dict[str, Tensor]:
        h = {t: self.encoders[t](x) for t, x in x_dict.items()}
        for conv in self.sage:
            h = self._residual(conv(h, edge_index_dict), h)
        for conv in self.gat:
            h = self._residual(conv(h, edge_index_dict, edge_attr_dict=edge_attr_dict), h)
        emb = h["global"][: counts["global"]].mean(0)
        return {
            "policy": self.policy(emb),
            "params": torch.tanh(self.params(emb)),
            "blending": self.blending(emb),
            "schedule": torch.tanh(self.schedule(emb)),
            "risk": self.risk(emb),
            "value": self.value(emb),
            "breaker": self.breaker(emb),
            "seed": self.seed_score(h["seed"]).squeeze(-1),
            "blueprint": self.blueprint_score(h["blueprint"]).squeeze(-1),
        }

    @staticmethod
    def _residual(out: dict[NodeType, Tensor], prev: dict[NodeType, Tensor]) -> dict[NodeType, Tensor]:
        res = {t: F.gelu(v) for t, v in out.items()}
        return {t: v + prev[t] if v.shape == prev[t].shape else v for t, v in res.items()}


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _time_block(fn: Callable[[], object], n: int, out: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)


def measure_inference(n: int = 2000, *, config: GNNConfig | None = None, baseline: bool = True) -> dict[str, float]:
    """p50/p95/p99 ms of one forward, n timed iterations per implementation, one thread.

    ``inference_*``: TamiyoGNN with ``config`` (defaults); with ``baseline``, also ``prototype_width_*``
    (TamiyoGNN at the prototype's widths) and ``baseline_pyg_*`` (the PyG HeteroConv peer).
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    graph = representative_graph()
    ours = TamiyoGNN(config).eval()
    runners: dict[str, Callable[[], object]] = {"inference": lambda: ours(*graph)}
    if baseline:
        wide = TamiyoGNN(GNNConfig.prototype()).eval()
        peer = PyGBaseline().eval()
        with torch.inference_mode():
            peer(*graph)  # materialise the lazy (-1) sizes
        runners["prototype_width"] = lambda: wide(*graph)
        runners["baseline_pyg"] = lambda: peer(*graph)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for fn in runners.values():
            _time_block(fn, 50, [])  # warm-up
        done = 0
        while done < n:
            block = min(BLOCK, n - done)
            for name, fn in runners.items():
                _time_block(fn, block, samples[name])
            done += block
    x, edge_index, _, _ = graph
    result: dict[str, float] = {
        "iterations": float(n),
        "nodes": float(sum(v.size(0) for v in x.values())),
        "edges": float(sum(v.size(1) for v in edge_index.values())),
        "params": float(sum(p.numel() for p in ours.parameters())),
    }
    for name, ms in samples.items():
        result[f"{name}_p50_ms"] = statistics.median(ms)
        result[f"{name}_p95_ms"] = _percentile(ms, 0.95)
        result[f"{name}_p99_ms"] = _percentile(ms, 0.99)
    result["goal_inference_p95_met"] = float(result["inference_p95_ms"] <= BUDGET_P95_MS)
    if baseline:
        result["speedup_vs_pyg_p50"] = result["baseline_pyg_p50_ms"] / result["inference_p50_ms"]
        result["speedup_vs_pyg_p95"] = result["baseline_pyg_p95_ms"] / result["inference_p95_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    report: dict[str, object] = {
        "config": asdict(GNNConfig()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "budget_inference_p95_ms": BUDGET_P95_MS,
        **measure_inference(args.iterations),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
