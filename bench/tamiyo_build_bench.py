"""Tamiyo graph-build benchmark: our builder beside a naive HeteroData build of the same graph.

Run: `.venv/bin/python bench/tamiyo_build_bench.py [--n 2000]`; prints JSON to stdout.

The packet is representative of a step decision: 3 seeds with full metrics, 1 blueprint with BSDS
and 3 layers / 1 activation / 1 parameter of graph extras. Both builders compute the same features
(the naive one runs our feature collection) and differ only in how tensors are made: ours makes
three tensors and splits them into views, the naive one makes a fresh ``HeteroData`` and calls
``torch.tensor`` per node type and per relation. Rounds are interleaved
because these machines are noisy (ARCHITECTURE §11); the goal (p95 ≤ 0.5 ms) is reported, never
asserted. ``measure_build`` is importable for bench/tamiyo_bench.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch_geometric.data import HeteroData

from esper.leyline import pb
from esper.tamiyo.coverage import summarise
from esper.tamiyo.graph import GraphBuilder, GraphInputs, _edge_attrs
from esper.tamiyo.metadata import ActivationInfo, BlueprintInfo, LayerInfo, ParameterInfo
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.registry import RegistrySet
from esper.tamiyo.schema import NODE_DIMS, NODE_TYPES, RELATIONS

GOAL_BUILD_P95_MS = 0.5
WARMUP = 200


def representative_packet() -> pb.SystemStatePacket:
    """3 seeds with every SeedState field set, the step metrics Tolaria sends (REFERENCE §6.5)."""
    packet = pb.SystemStatePacket(
        version=1, current_epoch=7, validation_loss=0.61, training_loss=0.58, global_step=4242,
        packet_id="pkt-1", training_run_id="run-1",
    )
    packet.training_metrics.update({
        "loss": 0.58, "gradient_norm": 1.3, "samples_per_s": 4700.0, "hook_latency_ms": 9.5,
        "epochs_total": 50.0, "optimizer_family_index": 1.0,
    })
    for i in range(3):
        packet.seed_states.add(
            seed_id=f"seed-{i}", stage=pb.SEED_STAGE_TRAINING + i, gradient_norm=0.4 + i, learning_rate=0.01,
            layer_depth=i + 1, age_epochs=3 + i, risk_score=0.2 + 0.1 * i,
        )
    return packet


def representative_blueprints() -> tuple[BlueprintInfo, ...]:
    """One blueprint with BSDS and 3 layers / 1 activation / 1 parameter of extras."""
    desc = pb.BlueprintDescriptor(blueprint_id="BP001", name="identity_passthrough", tier=pb.BLUEPRINT_TIER_SAFE,
                                  risk=0.1, stage=2)
    desc.allowed_parameters["alpha"].CopyFrom(pb.ParameterRange(min_value=0.0, max_value=1.0))
    layers = tuple(
        LayerInfo(type_name="linear", depth=float(i), latency_ms=1.5, parameter_count=4096.0, dropout=0.1,
                  activation_name="relu", weight_norm=0.9, gradient_norm=0.3)
        for i in range(3)
    )
    return (BlueprintInfo(
        descriptor=desc,
        bsds=pb.BSDS(blueprint_id="BP001", risk_score=0.2, hazard_band=pb.HAZARD_BAND_LOW,
                     handling_class=pb.HANDLING_CLASS_STANDARD),
        layers=layers,
        activations=(ActivationInfo(type_name="relu", saturation=0.1, gradient_flow=0.9, cost=64.0,
                                    nonlinearity=0.5),),
        parameters=(ParameterInfo(name="alpha", default=0.5),),
        adjacency=((0, 1), (1, 2)),
        monitored_layers=(2,),
        blend_methods=("linear",),
        candidate_score=0.7,
    ),)


def _builder() -> GraphBuilder:
    return GraphBuilder(FeatureNormaliser(), RegistrySet.new())


def naive_build(
    builder: GraphBuilder, packet: pb.SystemStatePacket, blueprints: tuple[BlueprintInfo, ...]
) -> HeteroData:
    """The peer: our exact feature work, then a fresh HeteroData with one torch.tensor per type and relation."""
    acc = builder._collect(packet, blueprints)  # private on purpose: identical features, only tensors differ
    data = HeteroData()
    for t in NODE_TYPES:
        feats = acc.feats[t] if acc.counts[t] else [0.0] * NODE_DIMS[t]
        data[t].x = torch.tensor(feats, dtype=torch.float32).view(-1, NODE_DIMS[t])
    for rel, et in enumerate(RELATIONS):
        data[et].edge_index = torch.tensor([acc.src[rel], acc.dst[rel]], dtype=torch.long)
        data[et].edge_attr = torch.tensor(_edge_attrs(acc, rel), dtype=torch.float32).view(-1, 3)
    data.coverage = summarise(acc.counts, acc.present, [len(s) for s in acc.src])
    return data


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50_ms": q[49], "p95_ms": q[94], "p99_ms": q[98], "max_ms": ordered[-1], "n": float(len(ordered))}


def _time(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1e6)
    return out


def _size(graph: GraphInputs) -> dict[str, float]:
    return {"nodes": float(graph.num_nodes), "edges": float(graph.num_edges)}


def measure_build(n: int) -> dict[str, float]:
    """p50/p95/p99/max ms of ``GraphBuilder.build`` on the representative packet, plus graph size."""
    builder, packet, bps = _builder(), representative_packet(), representative_blueprints()
    for _ in range(WARMUP):
        builder.build(packet, bps)
    gc.collect()
    samples = _time(lambda: builder.build(packet, bps), n)
    return {**_percentiles(samples), **_size(builder.build(packet, bps))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    builder, packet, bps = _builder(), representative_packet(), representative_blueprints()
    naive_builder = _builder()
    for _ in range(WARMUP):
        builder.build(packet, bps)
        naive_build(naive_builder, packet, bps)
        _ = builder.build(packet, bps).to_hetero_data()
    per_round = max(args.n // args.rounds, 1)
    ours: list[float] = []
    naive: list[float] = []
    with_hetero: list[float] = []
    gc.collect()
    for _ in range(args.rounds):
        ours += _time(lambda: builder.build(packet, bps), per_round)
        naive += _time(lambda: naive_build(naive_builder, packet, bps), per_round)
        with_hetero += _time(lambda: builder.build(packet, bps).to_hetero_data(), per_round)
    graph = builder.build(packet, bps)
    ours_p = _percentiles(ours)
    naive_p = _percentiles(naive)
    result = {
        "bench": "tamiyo_build",
        "packet": "3 seeds (full metrics), 1 blueprint (BSDS, 3 layers, 1 activation, 1 parameter)",
        **_size(graph),
        "build": ours_p,
        "build_plus_to_hetero_data": _percentiles(with_hetero),
        "naive_hetero_data": naive_p,
        "build_p95_ms": ours_p["p95_ms"],
        "naive_p95_ms": naive_p["p95_ms"],
        "build_vs_naive_p95": ours_p["p95_ms"] / naive_p["p95_ms"],
        "goal_build_p95_ms": GOAL_BUILD_P95_MS,
        "goal_build_p95_met": ours_p["p95_ms"] <= GOAL_BUILD_P95_MS,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
