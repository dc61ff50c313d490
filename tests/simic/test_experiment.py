"""The experiment's report: flat JSON keys, the table and the plot (the runs themselves are `make experiment`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.simic.experiment import ArmResult, ExperimentConfig, plot, print_table, results


def _summary(acc: list[float], **extra: object) -> dict[str, object]:
    return {"final_val_accuracy": acc[-1], "val_accuracy_by_epoch": acc, "epochs": len(acc), "decisions": 23 * len(acc),
            "seed_parameters": 100, "seeds_fossilized": 1, "seeds_culled": 0, "commands_by_type": {"COMMAND_PAUSE": 3},
            **extra}


def test_results_are_flat_and_plotted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arms = {"static": ArmResult([_summary([0.5, 0.8]), _summary([0.6, 0.9])]),
            "heuristic": ArmResult([_summary([0.5, 0.85])]), "explore": ArmResult(),
            "gnn": ArmResult([_summary([0.7, 0.95])])}
    out = results(ExperimentConfig(epochs=2, runs=2), arms, {"gate_accepted": True, "samples": 5}, wall_s=1.0)
    assert out["static_acc"] == pytest.approx(0.85) and out["heuristic_acc"] == pytest.approx(0.85)
    assert out["gnn_acc"] == pytest.approx(0.95) and (out["epochs"], out["runs"]) == (2, 2)
    assert out["static_acc_by_epoch"] == pytest.approx([0.55, 0.85]) and "explore_acc" not in out
    assert out["gnn_decisions_per_epoch"] == pytest.approx(23.0) and out["simic_gate_accepted"] is True
    print_table(out)
    assert "gnn (after Simic)" in capsys.readouterr().out
    plot(out, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
