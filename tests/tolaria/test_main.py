"""`python -m esper.tolaria run`: a configuration error (settings, device, dataset) is one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_OURS = ("ESPER_", "TOLARIA_", "TAMIYO_", "KASMINA_", "URZA_")


def _run_static(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A real static run in a clean environment (no user ESPER_/TOLARIA_ knobs, no .env in cwd)."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(_OURS)}
    base.update(TOLARIA_VAR_DIR=str(tmp_path / "var"), TOLARIA_EPOCHS="1", TOLARIA_MALLOC_KEEP_MB="0",
                ESPER_LOG_LEVEL="WARNING", **env)
    return subprocess.run([sys.executable, "-m", "esper.tolaria", "run", "--static"], cwd=tmp_path, env=base,
                          capture_output=True, text=True, timeout=100, check=False)


def _one_line_exit_2(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tolaria: configuration error:")
    return lines[0]


def test_a_bad_dataset_file_is_a_configuration_error(tmp_path: Path) -> None:
    npy = tmp_path / "array.npz"
    with npy.open("wb") as fh:
        np.save(fh, np.zeros((4, 3)))
    line = _one_line_exit_2(_run_static(tmp_path, TOLARIA_DATASET_PATH=str(npy)))
    assert "TOLARIA_DATASET_PATH" in line and "unreadable" in line
    assert not (tmp_path / "var").exists()  # refused before the trainer made anything


def test_an_invalid_dataset_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "one_class.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(40, 6)), y=np.zeros(40, dtype=np.int64))
    assert "label_range" in _one_line_exit_2(_run_static(tmp_path, TOLARIA_DATASET_PATH=str(path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: TOLARIA_DEVICE=cuda is valid here")
def test_cuda_without_cuda_is_a_configuration_error(tmp_path: Path) -> None:
    assert "CUDA" in _one_line_exit_2(_run_static(tmp_path, TOLARIA_DEVICE="cuda"))


def test_a_bad_kasmina_setting_is_a_configuration_error(tmp_path: Path) -> None:
    """The trainer builds Kasmina's settings itself; the CLI checks them first, like its own."""
    proc = _run_static(tmp_path, KASMINA_NONCE_CAPACITY="5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.startswith("tolaria: configuration error:") and "KASMINA_NONCE_CAPACITY" in proc.stderr


def test_empty_optional_paths_mean_unset_through_the_cli(tmp_path: Path) -> None:
    proc = _run_static(tmp_path, TOLARIA_SUMMARY_JSON="", TOLARIA_PROFILER_DIR="")
    assert proc.returncode == 0, proc.stderr[-2000:]  # was IsADirectoryError after the run: summary lost
    assert '"run_id"' in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var"]  # no profiler traces in the cwd
