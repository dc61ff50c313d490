"""Graph builder on real torch/PyG: shapes, masks, exact coverage, placeholders, ids, PyG interop."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from esper.core.errors import DependencyViolationError
from esper.leyline import pb
from esper.tamiyo.coverage import COLUMNS, EDGE_COVERAGE_KEYS, FEATURE_KEYS, column
from esper.tamiyo.graph import GraphBuilder, GraphInputs
from esper.tamiyo.metadata import ActivationInfo, BlueprintInfo, LayerInfo, ParameterInfo
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.registry import RegistrySet
from esper.tamiyo.schema import EDGE_ATTR_DIM, NODE_DIMS, NODE_TYPES, RELATIONS

with warnings.catch_warnings():  # PyG 2.8's import trips torch's jit.script deprecation warning
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch_geometric.nn import HeteroConv, SAGEConv

LOG_STEP_MEAN = math.log1p(1000.0)
N_LEAVES = sum(len(k) for k in FEATURE_KEYS.values()) + len(RELATIONS)  # 37 feature keys + 21 relations


def _builder(**kwargs: object) -> GraphBuilder:
    return GraphBuilder(FeatureNormaliser(), RegistrySet.new(), **kwargs)  # type: ignore[arg-type]


def _col(g: GraphInputs, t: str, row: int, name: str) -> float:
    return float(g.x[t][row, column(t, name)])


def _small_packet() -> pb.SystemStatePacket:
    """Two seeds, partial metrics: the hand-computed case below."""
    packet = pb.SystemStatePacket(current_epoch=2, training_loss=0.5, global_step=0)
    packet.training_metrics.update({"loss": 1.1, "samples_per_s": 4500.0})
    packet.seed_states.add(seed_id="a", stage=pb.SEED_STAGE_TRAINING, learning_rate=0.01)
    packet.seed_states.add(seed_id="b", stage=pb.SEED_STAGE_BLENDING, risk_score=0.6, layer_depth=2,
                           gradient_norm=0.5, age_epochs=4)
    return packet


def _full_packet() -> pb.SystemStatePacket:
    packet = pb.SystemStatePacket(current_epoch=10, validation_loss=0.6, training_loss=0.55, global_step=100)
    packet.training_metrics.update({
        "loss": 0.55, "gradient_norm": 1.0, "samples_per_s": 4000.0, "hook_latency_ms": 12.0,
        "epochs_total": 40.0, "optimizer_family_index": 2.0,
    })
    for i in range(3):
        packet.seed_states.add(seed_id=f"s{i}", stage=pb.SEED_STAGE_TRAINING, learning_rate=0.02, risk_score=0.3,
                               gradient_norm=1.0, age_epochs=5, layer_depth=i + 1)
    return packet


def _full_blueprint(**overrides: object) -> BlueprintInfo:
    desc = pb.BlueprintDescriptor(blueprint_id="BP001", tier=pb.BLUEPRINT_TIER_SAFE, risk=0.1, stage=2)
    desc.allowed_parameters["alpha"].CopyFrom(pb.ParameterRange(min_value=0.0, max_value=1.0))
    fields: dict[str, object] = {
        "descriptor": desc,
        "bsds": pb.BSDS(blueprint_id="BP001", risk_score=0.2, hazard_band=pb.HAZARD_BAND_LOW,
                        handling_class=pb.HANDLING_CLASS_STANDARD),
        "layers": tuple(LayerInfo(type_name="linear", depth=float(i), latency_ms=6.0, parameter_count=1024.0,
                                  dropout=0.2, activation_name="relu", weight_norm=1.0, gradient_norm=0.8)
                        for i in range(3)),
        "activations": (ActivationInfo(type_name="relu", saturation=0.4, gradient_flow=0.8, cost=128.0,
                                       nonlinearity=0.5),),
        "parameters": (ParameterInfo(name="alpha", default=0.5),),
        "adjacency": ((0, 1), (1, 2)),
        "monitored_layers": (2,),
        "blend_methods": ("linear",),
        "candidate_score": 0.5,
    }
    fields.update(overrides)
    return BlueprintInfo(**fields)  # type: ignore[arg-type]


def _assert_schema(g: GraphInputs) -> None:
    assert list(g.x) == list(NODE_TYPES)
    for t in NODE_TYPES:
        assert g.x[t].dtype == torch.float32
        assert g.x[t].shape == (max(g.counts[t], 1), NODE_DIMS[t])
    assert list(g.edge_index) == list(RELATIONS) == list(g.edge_attr)
    for et in RELATIONS:
        ei, ea = g.edge_index[et], g.edge_attr[et]
        assert ei.dtype == torch.long and ei.dim() == 2 and ei.shape[0] == 2 and ei.is_contiguous()
        assert ea.dtype == torch.float32 and ea.shape == (ei.shape[1], EDGE_ATTR_DIM)
        if ei.numel():  # edges only ever touch real rows, never placeholders
            assert int(ei[0].max()) < g.counts[et[0]] and int(ei[1].max()) < g.counts[et[2]]
            assert int(ei.min()) >= 0


def test_small_packet_masks_values_and_exact_coverage() -> None:
    g = _builder().build(_small_packet())
    _assert_schema(g)
    assert g.counts == {"global": 1, "seed": 2, "blueprint": 0, "layer": 0, "activation": 0, "parameter": 0}
    assert g.seed_ids == ["a", "b"] and g.blueprint_ids == []

    expected_global = {
        "loss": 1.0, "loss.mask": 1.0,  # (1.1 - 0.8) / 0.3
        "validation_loss": 0.0, "validation_loss.mask": 0.0,
        "training_loss": -1.0, "training_loss.mask": 1.0,  # packet field fallback: (0.5 - 0.8) / 0.3
        "gradient_norm": 0.0, "gradient_norm.mask": 0.0,
        "samples_per_s": 0.0, "samples_per_s.mask": 1.0,
        "hook_latency_ms": 0.0, "hook_latency_ms.mask": 0.0,
        "log_step": (0.0 - LOG_STEP_MEAN) / 2.0, "seed_count": math.tanh(2.0),
        "epoch_progress": 0.0, "optimizer_family": 0.0,
    }
    assert {n: _col(g, "global", 0, n) for n in COLUMNS["global"]} == pytest.approx(expected_global, abs=1e-6)

    regs_a = g.x["seed"][0, column("seed", "registry_index")]
    expected_a = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3 / 11, 1.0, 0.0, 0.0, float(regs_a), 0.0]
    expected_b = [0.0, 0.0, 1.0, 1.0, -1.0, 1.0, -1.5, 1.0, 4 / 11, 1.0, 0.0, 1.0,
                  float(g.x["seed"][1, 12]), 1.0]  # risk (0.6-0.4)/0.2, grad (0.5-1)/0.5, age (4-10)/4
    assert g.x["seed"][0].tolist() == pytest.approx(expected_a, abs=1e-6)
    assert g.x["seed"][1].tolist() == pytest.approx(expected_b, abs=1e-6)
    assert 0.0 < float(regs_a) < 1.0

    cov = g.coverage
    assert [cov[f"global.{k}"] for k in FEATURE_KEYS["global"]] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [cov[f"seed.{k}"] for k in FEATURE_KEYS["seed"]] == [0.5, 0.5, 0.5, 0.5, 1.0, 0.5]
    assert cov["node.global"] == 3 / 8
    assert cov["node.seed"] == pytest.approx(7 / 12)
    for t in ("blueprint", "layer", "activation", "parameter"):
        assert cov[f"node.{t}"] == 0.0
        assert all(cov[f"{t}.{k}"] == 0.0 for k in FEATURE_KEYS[t])
    populated = {"edges.global_influences", "edges.seed_reports", "edges.seed_peer"}
    assert {k for k in EDGE_COVERAGE_KEYS.values() if cov[k] == 1.0} == populated
    assert g.feature_coverage == pytest.approx((3 + 3.5 + 3) / N_LEAVES)


def test_small_packet_edges_and_attributes() -> None:
    g = _builder().build(_small_packet())
    influences, reports, peer = (("global", "influences", "seed"), ("seed", "reports", "global"),
                                 ("seed", "peer", "seed"))
    assert g.edge_index[influences].tolist() == [[0, 0], [0, 1]]
    assert g.edge_index[reports].tolist() == [[0, 1], [0, 0]]
    assert g.edge_index[peer].tolist() == [[0, 1], [1, 0]]
    assert g.edge_attr[influences].tolist() == [[1.0, 0.0, 0.0]] * 2
    assert g.edge_attr[reports].tolist() == [[0.5, 0.0, 0.0]] * 2  # global has in-degree 2
    assert g.edge_attr[peer].tolist() == [[1.0, 0.0, 0.0]] * 2  # seed "a" has no depth: distance unknown
    assert g.num_edges == 6


def test_no_inputs_at_all_gives_placeholders_and_empty_relations() -> None:
    g = _builder().build(pb.SystemStatePacket())
    _assert_schema(g)
    assert g.counts == {"global": 1, "seed": 0, "blueprint": 0, "layer": 0, "activation": 0, "parameter": 0}
    for t in ("seed", "blueprint", "layer", "activation", "parameter"):
        assert g.x[t].shape == (1, NODE_DIMS[t])
        assert not g.x[t].any()  # the placeholder row: every value, mask and in-band column 0
    assert all(g.edge_index[et].shape == (2, 0) for et in RELATIONS)
    assert g.num_edges == 0 and g.num_nodes == 6
    assert g.feature_coverage == 0.0
    assert g.seed_ids == [] and g.blueprint_ids == []


def test_full_inputs_every_relation_and_full_coverage() -> None:
    g = _builder().build(_full_packet(), [_full_blueprint()])
    _assert_schema(g)
    assert g.counts == {"global": 1, "seed": 3, "blueprint": 1, "layer": 3, "activation": 1, "parameter": 1}
    edge_counts = {et[1] if et[1] != "monitored_by" else f"{et[0]}_monitored_by": int(g.edge_index[et].shape[1])
                   for et in RELATIONS}
    assert edge_counts == {
        "influences": 3, "reports": 3, "annotates": 1, "blueprint_monitored_by": 1, "peer": 6, "operates": 3,
        "feedback": 3, "activates": 3, "affects": 3, "feeds": 3, "configures": 1, "modulates": 1, "allowed": 3,
        "associated": 3, "composes": 3, "belongs_to": 3, "energizes": 1, "targets": 1, "connects": 2,
        "monitors": 3, "layer_monitored_by": 3,
    }
    assert g.num_edges == 53 and g.num_nodes == 10
    assert all(v == 1.0 for v in g.coverage.values())
    assert g.feature_coverage == 1.0
    assert g.truncated == dict.fromkeys(NODE_TYPES, 0)
    assert _col(g, "global", 0, "epoch_progress") == pytest.approx(0.5 + 0.5 * 10 / 40)
    assert _col(g, "global", 0, "optimizer_family") == pytest.approx(3 / 256)
    assert g.x["seed"][:, column("seed", "blend_allowed")].tolist() == [1.0, 1.0, 1.0]  # blueprint lists blends
    param = dict(zip(COLUMNS["parameter"], g.x["parameter"][0].tolist(), strict=True))
    assert param == pytest.approx({  # min/max from the descriptor range, default from the extras
        "min": 0.0, "min.mask": 1.0, "max": 0.0, "max.mask": 1.0, "span": 1.25, "span.mask": 1.0,
        "default": 0.0, "default.mask": 1.0, "allowed": 1.0, "blueprint_risk": 0.1}, abs=1e-6)
    assert _col(g, "blueprint", 0, "tier") == pytest.approx(1 / 3)
    assert _col(g, "blueprint", 0, "hazard_band") == pytest.approx(1 / 4)
    assert _col(g, "layer", 1, "depth") == pytest.approx(math.tanh(2 / 4))
    assert _col(g, "layer", 0, "dropout") == pytest.approx(0.6)
    assert _col(g, "layer", 0, "type") == _col(g, "layer", 2, "type") > 0.0


def test_depth_distances_on_edge_attributes() -> None:
    g = _builder().build(_full_packet(), [_full_blueprint()])
    connects, monitors = ("layer", "connects", "layer"), ("seed", "monitors", "layer")
    assert g.edge_index[connects].tolist() == [[0, 1], [1, 2]]
    t = math.tanh(0.25)
    torch.testing.assert_close(g.edge_attr[connects], torch.tensor([[1.0, 1.0, t]] * 2))
    assert g.edge_index[monitors].tolist() == [[0, 1, 2], [2, 2, 2]]
    # seed depths 1, 2, 3 against layer depth 2; layer 2 has in-degree 3
    expected = torch.tensor([[1 / 3, 1.0, t], [1 / 3, 1.0, 0.0], [1 / 3, 1.0, t]])
    torch.testing.assert_close(g.edge_attr[monitors], expected)


def test_blueprint_without_extras_masks_structure_as_missing() -> None:
    desc = pb.BlueprintDescriptor(blueprint_id="BP002", risk=0.3)
    g = _builder().build(_full_packet(), [BlueprintInfo(descriptor=desc)])
    _assert_schema(g)
    assert g.counts["blueprint"] == 1 and g.counts["layer"] == 0 and g.counts["parameter"] == 0
    assert g.blueprint_ids == ["BP002"]
    assert g.coverage["node.blueprint"] == 0.0  # no tier, BSDS, parameter count or candidate score
    assert _col(g, "blueprint", 0, "registry_index") > 0.0
    assert _col(g, "blueprint", 0, "risk") == pytest.approx(0.3)
    assert g.coverage["edges.global_annotates"] == 1.0 and g.coverage["edges.blueprint_composes"] == 0.0
    assert g.x["seed"][:, column("seed", "blend_allowed")].tolist() == [0.0, 0.0, 0.0]


def test_seed_rows_follow_packet_order() -> None:
    packet = pb.SystemStatePacket()
    for sid, stage in (("zeta", 2), ("alpha", 5), ("mid", 7)):
        packet.seed_states.add(seed_id=sid, stage=stage)
    g = _builder().build(packet)
    assert g.seed_ids == ["zeta", "alpha", "mid"]
    assert g.x["seed"][:, column("seed", "stage")].tolist() == pytest.approx([2 / 11, 5 / 11, 7 / 11])


def test_missing_or_duplicate_ids_raise() -> None:
    builder = _builder()
    packet = pb.SystemStatePacket()
    packet.seed_states.add(seed_id="ok")
    packet.seed_states.add(stage=pb.SEED_STAGE_TRAINING)  # no seed_id
    with pytest.raises(DependencyViolationError, match="seed_id"):
        builder.build(packet)
    with pytest.raises(DependencyViolationError, match="blueprint_id"):
        builder.build(pb.SystemStatePacket(), [BlueprintInfo(descriptor=pb.BlueprintDescriptor(name="x"))])
    dup = pb.SystemStatePacket()
    dup.seed_states.add(seed_id="s")
    dup.seed_states.add(seed_id="s")
    with pytest.raises(DependencyViolationError, match="duplicate"):
        builder.build(dup)


def test_metadata_with_dangling_indices_is_refused_at_construction() -> None:
    with pytest.raises(DependencyViolationError):
        _full_blueprint(adjacency=((0, 3),))
    with pytest.raises(DependencyViolationError):
        _full_blueprint(monitored_layers=(7,))
    with pytest.raises(DependencyViolationError):
        ParameterInfo(name="")


def test_non_finite_values_read_as_absent_and_leave_norms_untouched() -> None:
    builder = _builder()
    packet = pb.SystemStatePacket()
    packet.training_metrics.update({"loss": float("nan"), "gradient_norm": float("inf")})
    g = builder.build(packet)
    assert _col(g, "global", 0, "loss.mask") == 0.0 and _col(g, "global", 0, "gradient_norm.mask") == 0.0
    assert builder.normaliser.stats("loss") == pytest.approx((0.8, 0.09, 0))


def test_build_updates_the_normaliser() -> None:
    builder = _builder()
    builder.build(_small_packet())
    assert builder.normaliser.stats("loss") == pytest.approx((0.83, 0.0891, 1))
    assert builder.normaliser.stats("validation_loss") == pytest.approx((0.8, 0.09, 0))  # absent: not observed


def test_caps_truncate_and_count() -> None:
    layers = tuple(LayerInfo(type_name="linear", depth=float(i)) for i in range(6))
    bp = _full_blueprint(layers=layers, adjacency=((0, 1), (3, 4), (4, 5)), monitored_layers=(1, 5),
                         activations=(ActivationInfo(), ActivationInfo(), ActivationInfo()))
    packet = _full_packet()
    g = _builder(max_seeds=2).build(packet, [bp])
    _assert_schema(g)
    assert g.counts["layer"] == 4 and g.counts["activation"] == 2 and g.counts["seed"] == 2
    assert g.truncated == {"global": 0, "seed": 1, "blueprint": 0, "layer": 2, "activation": 1, "parameter": 0}
    assert g.edge_index[("layer", "connects", "layer")].tolist() == [[0], [1]]  # edges into dropped layers go
    assert g.edge_index[("seed", "monitors", "layer")].tolist() == [[0, 1], [1, 1]]
    assert g.seed_ids == ["s0", "s1"]
    assert _col(g, "global", 0, "seed_count") == pytest.approx(math.tanh(3.0))  # counts every packet seed


def test_registry_indices_are_shared_with_the_registry_set() -> None:
    regs = RegistrySet.new()
    g = GraphBuilder(FeatureNormaliser(), regs).build(_full_packet(), [_full_blueprint()])
    assert _col(g, "seed", 1, "registry_index") == pytest.approx(regs.seed.index("s1") / 1024)
    assert _col(g, "layer", 0, "type") == pytest.approx(regs.layer_type.index("linear") / 1024)
    assert _col(g, "activation", 0, "type") == pytest.approx(regs.activation_type.index("relu") / 1024)
    assert "BP001" in regs.blueprint


def test_non_cpu_device_moves_every_tensor() -> None:
    g = _builder(device=torch.device("meta")).build(_full_packet(), [_full_blueprint()])
    assert all(v.device.type == "meta" for v in g.x.values())
    assert all(v.device.type == "meta" for v in (*g.edge_index.values(), *g.edge_attr.values()))
    assert g.x["layer"].shape == (3, NODE_DIMS["layer"])


@pytest.mark.parametrize("full", [True, False])
def test_hetero_data_validates_and_runs_a_hetero_sage_conv(full: bool) -> None:
    g = _builder().build(_full_packet(), [_full_blueprint()]) if full else _builder().build(_small_packet())
    data = g.to_hetero_data()
    assert data.validate()
    node_types, edge_types = data.metadata()
    assert list(node_types) == list(NODE_TYPES) and list(edge_types) == list(RELATIONS)
    assert data["seed"].x is g.x["seed"]  # shares the tensors, no copy
    torch.manual_seed(0)
    conv = HeteroConv({et: SAGEConv((NODE_DIMS[et[0]], NODE_DIMS[et[2]]), 8) for et in edge_types}, aggr="sum")
    out = conv(data.x_dict, data.edge_index_dict)
    assert {t: tuple(v.shape) for t, v in out.items()} == {t: (max(g.counts[t], 1), 8) for t in NODE_TYPES}
    assert all(torch.isfinite(v).all() for v in out.values())


def test_invalid_caps_are_a_configuration_error() -> None:
    from esper.core.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        _builder(max_seeds=0)


def test_a_large_catalogue_keeps_the_fitting_safe_best_scored_blueprints() -> None:
    def bp(bid: str, *, score: float, quarantine: bool = False, graph: bool = True) -> BlueprintInfo:
        desc = pb.BlueprintDescriptor(blueprint_id=bid, tier=pb.BLUEPRINT_TIER_SAFE, risk=0.1,
                                      quarantine_only=quarantine)
        extra: dict[str, object] = {} if graph else {"layers": (), "activations": (), "adjacency": (),
                                                     "monitored_layers": ()}
        return _full_blueprint(descriptor=desc, bsds=None, candidate_score=score, **extra)

    catalogue = [bp("BP-Q", score=0.99, quarantine=True), bp("BP-NOGRAPH", score=0.98, graph=False),
                 *(bp(f"BP{i:03d}", score=i / 100) for i in range(1, 11))]
    g = _builder(max_blueprints=4).build(_full_packet(), catalogue)
    assert g.blueprint_ids == ["BP010", "BP009", "BP008", "BP007"]
    assert g.truncated["blueprint"] == len(catalogue) - 4
    only_bad = _builder(max_blueprints=1).build(_full_packet(), catalogue[:2])
    assert only_bad.blueprint_ids == ["BP-NOGRAPH"]  # fits-unknown beats quarantined
