"""Synthetic field reports for Simic's tests: runs of logged decisions whose best action is known.

In every run the trainer's loss EWMA falls slowly on its own; after an OPTIMIZER command with a
negative `lr_delta` it falls faster for a while, after a PAUSE it does not. So lowering the learning
rate has the higher return and PAUSE the lower one: a policy that learns this beats one that pauses.
"""

from __future__ import annotations

from esper.leyline import pb
from esper.tamiyo.catalog import blueprint_from_entry
from esper.tamiyo.gnn import GNNConfig
from esper.tamiyo.metadata import BlueprintInfo
from esper.tamiyo.standin import sample_catalog, sample_packet

SMALL = GNNConfig(hidden_dim=16, gat_dim=16, gat_heads=2, dropout=0.0)
T0 = 1_700_000_000_000


def blueprints() -> list[BlueprintInfo]:
    return [blueprint_from_entry(e) for e in sample_catalog().entries]


def two_blueprints() -> list[BlueprintInfo]:
    """The sample blueprint and a second, different one (BP002: riskier, wider, GELU)."""
    catalog = sample_catalog()
    other = catalog.entries.add()
    other.CopyFrom(catalog.entries[0])
    other.descriptor.blueprint_id, other.descriptor.name, other.descriptor.risk = "BP002", "wide_mlp", 0.3
    for layer in other.graph.layers:
        layer.parameter_count = 65536.0
    other.graph.activations[0].activation_type = "gelu"
    return [blueprint_from_entry(e) for e in catalog.entries]


def command(cid: str, kind: str) -> pb.AdaptationCommand:
    c = pb.AdaptationCommand(version=1, command_id=cid)
    if kind == "opt":
        c.command_type = pb.COMMAND_OPTIMIZER
        c.optimizer_adjustment.optimizer_id = "sgd"
        c.optimizer_adjustment.hyperparameters["lr_delta"] = -0.5
    elif kind == "seed":
        c.command_type = pb.COMMAND_SEED
        c.target_seed_id = "seed-1"
        c.seed_operation.operation = pb.SEED_OP_GERMINATE
        c.seed_operation.blueprint_id = "BP001"
        c.seed_operation.parameters["alpha"] = 0.3
    else:
        c.command_type = pb.COMMAND_PAUSE
    return c


def decision_report(run: str, step: int, kind: str, loss: float, *, epoch: int = 1, run_index: int = 0,
                    outcome: int = pb.FIELD_REPORT_OUTCOME_NEUTRAL) -> pb.FieldReport:
    packet = sample_packet(f"{run}-{step}", step, run=run)
    packet.current_epoch = epoch
    packet.training_metrics["loss_ewma"] = loss
    cmd = command(f"{run}-c{step}", kind)
    report = pb.FieldReport(version=1, report_id=f"fr-{cmd.command_id}", command_id=cmd.command_id,
                            training_run_id=run, outcome=outcome)
    report.issued_at.FromMilliseconds(T0 + run_index * 10_000 + step)
    report.observation.CopyFrom(packet)
    report.command.CopyFrom(cmd)
    return report


def runs(n_runs: int = 4, steps: int = 24) -> list[pb.FieldReport]:
    """`n_runs` runs; in each, even steps PAUSE and odd steps lower the learning rate."""
    out = []
    for r in range(n_runs):
        run = f"run{r}"
        loss = 2.0
        for step in range(1, steps + 1):
            kind = "opt" if step % 2 else "pause"
            out.append(decision_report(run, step, kind, loss, epoch=1 + step // 12, run_index=r))
            loss -= 0.05 if kind == "opt" else -0.02  # what the decision led to by the next step
    return out
