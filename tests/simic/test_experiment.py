"""The experiment's report: flat JSON keys, the table and the plot (the runs themselves are `make experiment`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.simic.experiment import (
    CONFIG_FILE,
    ArmResult,
    ExperimentConfig,
    check_reusable,
    copy_replay,
    paired_difference,
    plot,
    print_table,
    results,
    reused_summaries,
)
from esper.simic.replay import ReplayStore
from tests.simic._data import decision_report


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
    assert out["gnn_minus_heuristic"] == pytest.approx(0.10) and out["gnn_minus_heuristic_se"] is None
    assert out["heuristic_minus_static"] == pytest.approx(0.05)  # paired with static's first run only
    assert out["goal_met"] is False  # by the means, the heuristic (0.85) only equals static (0.85)
    print_table(out)
    printed = capsys.readouterr().out
    assert "gnn (after Simic)" in printed and "gnn - heuristic +0.1000" in printed and "not met" in printed
    plot(out, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arms_are_compared_seed_by_seed() -> None:
    """Run i of every arm trains on seed i: the differences are paired, and their spread gives the error."""
    mean, se = paired_difference([0.90, 0.85, 0.95], [0.88, 0.86, 0.91])  # differences 0.02, -0.01, 0.04
    assert mean == pytest.approx(0.05 / 3)
    assert se == pytest.approx(0.025166114784235834 / 3 ** 0.5)  # sample stdev of the three over sqrt(3)
    assert paired_difference([0.9, 0.8], [0.7]) == (pytest.approx(0.2), None)  # only the runs both finished
    with pytest.raises(ValueError):
        paired_difference([], [0.5])


def test_the_goal_is_met_only_when_gnn_reaches_the_heuristic_and_it_beats_static() -> None:
    def goal(static: float, heuristic: float, gnn: float) -> object:
        arms = {"static": ArmResult([_summary([static])]), "heuristic": ArmResult([_summary([heuristic])]),
                "gnn": ArmResult([_summary([gnn])])}
        return results(ExperimentConfig(epochs=1, runs=1), arms, {}, wall_s=1.0)["goal_met"]

    assert goal(0.88, 0.89, 0.89) is True
    assert goal(0.88, 0.89, 0.885) is False
    assert goal(0.89, 0.89, 0.90) is False
    assert "goal_met" not in results(ExperimentConfig(epochs=1, runs=1), {"static": ArmResult([_summary([0.8])])},
                                     {}, wall_s=1.0)


def test_reuse_copies_the_replay_store_without_the_earlier_gnn_arm(tmp_path: Path) -> None:
    """`--reuse`: Simic trains again on the data the earlier round had, not on the gnn runs it led to."""
    source = tmp_path / "old/simic/replay.db"
    with ReplayStore(source) as store:
        for i, run in enumerate(("heuristic-s0", "explore-s0", "explore-s1", "gnn-s0", "gnn-s1")):
            for step in (1, 2):
                assert store.add(decision_report(run, step, "pause", 1.0, run_index=i))
    copy = tmp_path / "new/simic/replay.db"
    assert copy_replay(source, copy) == 6
    with ReplayStore(copy) as kept:
        assert sorted({r.training_run_id for r in kept.reports()}) == ["explore-s0", "explore-s1", "heuristic-s0"]
    with ReplayStore(source) as old:
        assert old.count() == 10  # the earlier experiment's store is left as it was
    with pytest.raises(FileExistsError):
        copy_replay(source, copy)  # never onto an existing store
    with pytest.raises(FileNotFoundError):
        copy_replay(tmp_path / "nowhere.db", tmp_path / "x.db")


def test_reuse_reads_every_run_of_an_arm_or_refuses(tmp_path: Path) -> None:
    summaries = tmp_path / "summaries"
    summaries.mkdir()
    for seed in (0, 1):
        (summaries / f"heuristic-s{seed}.json").write_text(json.dumps(_summary([0.5, 0.8 + seed / 100])))
    runs = reused_summaries(tmp_path, "heuristic", range(2))
    assert [r["final_val_accuracy"] for r in runs] == [0.8, 0.81]
    with pytest.raises(FileNotFoundError, match="no heuristic run on seed 2"):
        reused_summaries(tmp_path, "heuristic", range(3))
    assert results(ExperimentConfig(runs=2, reuse=tmp_path), {"heuristic": ArmResult(runs)}, {},
                   wall_s=1.0)["reused_from"] == str(tmp_path)


def test_reuse_refuses_runs_made_with_other_settings(tmp_path: Path) -> None:
    """A reused workdir's runs and reports must come from the same host, arms and candidate cap: Simic
    would otherwise rebuild its graphs with another cap than the one Tamiyo decided with."""
    check_reusable(ExperimentConfig(), tmp_path)  # a workdir from before the file: taken as it is
    (tmp_path / CONFIG_FILE).write_text(json.dumps({
        "epochs": 16, "hidden_width": 4, "hidden_layers": 1, "input_slot": True, "learning_rate": 0.03,
        "step_timeout_ms": 200.0, "explore": True, "explore_epsilon": 1.0, "explore_runs": 24, "blend_mode": "CONVEX",
        "max_blueprints": 8}))
    # How many gnn runs is free to change; a file from before the cull memory existed ran without it.
    check_reusable(ExperimentConfig(runs=6, max_blueprints=8, cull_memory=False), tmp_path)
    with pytest.raises(ValueError, match="max_blueprints"):
        check_reusable(ExperimentConfig(max_blueprints=16, cull_memory=False), tmp_path)
    with pytest.raises(ValueError, match="cull_memory"):
        check_reusable(ExperimentConfig(max_blueprints=8), tmp_path)
