"""`python -m esper.tolaria run`: a configuration error (settings, device, dataset) is one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esper.oona import OonaSettings

_OURS = ("ESPER_", "TOLARIA_", "TAMIYO_", "KASMINA_", "URZA_")


def _run_static(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A real static run in a clean environment (no user ESPER_/TOLARIA_ knobs, no .env in cwd)."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(_OURS)}
    base.update(TOLARIA_VAR_DIR=str(tmp_path / "var"), TOLARIA_EPOCHS="1", TOLARIA_MALLOC_KEEP_MB="0",
                ESPER_LOG_LEVEL="WARNING", **env)
    return subprocess.run([sys.executable, "-m", "esper.tolaria", "run", "--static", *args], cwd=tmp_path,
                          env=base, capture_output=True, text=True, timeout=100, check=False)


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


def test_the_dataset_flag_trains_on_the_users_npz(tmp_path: Path) -> None:
    """`--dataset` wins over TOLARIA_DATASET_PATH (another file here): 120 samples of 5 features in 3
    classes; its 96 training samples at the default batch of 64 make 2 steps (digits 23, the other 1)."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = rng.normal(size=(120, 5)) + y[:, None] * 2.0  # separable enough to learn in one epoch
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    other = tmp_path / "other.npz"
    np.savez(other, x=rng.normal(size=(40, 7)), y=np.arange(40) % 2)
    proc = _run_static(tmp_path, "--dataset", str(path), TOLARIA_DATASET_PATH=str(other))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["epochs"] == 1 and summary["steps"] == 2


def test_a_bad_file_given_by_the_dataset_flag_is_named_as_the_flag(tmp_path: Path) -> None:
    line = _one_line_exit_2(_run_static(tmp_path, "--dataset", str(tmp_path / "missing.npz")))
    assert "--dataset" in line and "missing_file" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: TOLARIA_DEVICE=cuda is valid here")
def test_cuda_without_cuda_is_a_configuration_error(tmp_path: Path) -> None:
    assert "CUDA" in _one_line_exit_2(_run_static(tmp_path, TOLARIA_DEVICE="cuda"))


def test_a_bad_kasmina_setting_is_a_configuration_error(tmp_path: Path) -> None:
    """The trainer builds Kasmina's settings itself; the CLI checks them first, like its own."""
    proc = _run_static(tmp_path, KASMINA_NONCE_CAPACITY="5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.startswith("tolaria: configuration error:") and "KASMINA_NONCE_CAPACITY" in proc.stderr


def test_a_summary_path_under_a_file_is_exit_2_before_training(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    proc = _run_static(tmp_path, TOLARIA_SUMMARY_JSON=str(tmp_path / "a_file" / "s.json"))
    assert "TOLARIA_SUMMARY_JSON" in _one_line_exit_2(proc)
    assert not (tmp_path / "var").exists()  # refused before anything ran


def test_empty_optional_paths_mean_unset_through_the_cli(tmp_path: Path) -> None:
    proc = _run_static(tmp_path, TOLARIA_SUMMARY_JSON="", TOLARIA_PROFILER_DIR="")
    assert proc.returncode == 0, proc.stderr[-2000:]  # was IsADirectoryError after the run: summary lost
    assert '"run_id"' in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var"]  # no profiler traces in the cwd


def _start(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(_OURS)}
    base.update(TOLARIA_VAR_DIR=str(tmp_path / "var"), TOLARIA_MALLOC_KEEP_MB="0", ESPER_LOG_LEVEL="INFO",
                TOLARIA_SUMMARY_JSON=str(tmp_path / "summary.json"), **env)
    return subprocess.Popen([sys.executable, "-m", "esper.tolaria", "run", *args], cwd=tmp_path, env=base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _when_training(proc: subprocess.Popen[str]) -> None:
    """Wait (a liveness bound) until the run has logged its first epoch."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if "val_accuracy" in line:
            return
    raise AssertionError("the run ended before its first epoch")


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM, signal.SIGTERM)])
def test_ctrl_c_or_a_second_sigterm_still_checkpoints_and_writes_the_summary(
        tmp_path: Path, signals: tuple[signal.Signals, ...]) -> None:
    """SIGINT raised KeyboardInterrupt mid-step (no checkpoint since the cadence's last, no summary), and
    a second SIGTERM during shutdown hit the default handler, restored first: exit -15, summary lost."""
    proc = _start(tmp_path, "--static", TOLARIA_EPOCHS="500", TOLARIA_CHECKPOINT_EVERY_EPOCHS="1000")
    _when_training(proc)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 0, out[-500:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clean_shutdown"] and 0 < summary["epochs"] < 500 and json.loads(out) == summary
    checkpoints = sorted((tmp_path / "var" / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 1 and f"-e{summary['epochs']:06d}-" in checkpoints[0].name  # the epoch it stopped in


def test_a_metrics_port_in_use_is_a_configuration_error(tmp_path: Path, settings: OonaSettings) -> None:
    """It was a traceback (exit 1) after the trainer, its sidecar and its publisher were built, none closed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start(tmp_path, ESPER_REDIS_URL=settings.redis_url,
                      ESPER_LEYLINE_SECRET=settings.signing_keys().secret.decode(),
                      ESPER_METRICS_PORT=str(port), ESPER_METRICS_HOST="127.0.0.1", TOLARIA_EPOCHS="1")
        out, err = proc.communicate(timeout=100)
    assert proc.returncode == 2 and out == "" and "Traceback" not in err, err[-2000:]
    assert f"tolaria: configuration error: ESPER_METRICS_PORT {port}" in err.strip().splitlines()[-1]
