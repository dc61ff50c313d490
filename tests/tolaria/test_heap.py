"""`keep_freed_memory`: glibc keeps freed tensor memory, so reallocating it does not page-fault.

The tuning is process-wide, so each measurement runs in a child process of its own."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from esper.tolaria.heap import MAX_KEEP_MB, keep_freed_memory
from esper.tolaria.settings import TolariaSettings

GLIBC = platform.libc_ver()[0] == "glibc"

# A 40 MiB tensor, allocated and freed: above glibc's largest dynamic mmap threshold (32 MiB), so by
# default every allocation is a fresh mmap whose 10,240 pages fault in again. Kept, the heap grows for
# the first few (a freed block sits below the next aligned request until its neighbours coalesce),
# then serves every allocation from memory already touched: ten warm-up rounds, ten counted.
CHILD = """
import resource, sys, torch
from esper.tolaria.heap import keep_freed_memory
tuning = keep_freed_memory(int(sys.argv[1]))
for _ in range(10):
    x = torch.ones(10 * 2**20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(10 * 2**20); del x
print(tuning.applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep_mb: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(keep_mb)], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_tensor_memory_is_reused_without_page_faults() -> None:
    applied, tuned = _faults(1024)
    untouched, default = _faults(0)
    assert applied and not untouched
    assert default >= 10 * 10_240 * 0.9  # every allocation faulted its pages in again
    assert tuned < 1_000  # not one allocation's pages, over all ten


def test_off_and_out_of_range() -> None:
    assert keep_freed_memory(0).applied is False
    assert "TOLARIA_MALLOC_KEEP_MB=0" in keep_freed_memory(0).reason
    for bad in (-1, MAX_KEEP_MB + 1):
        with pytest.raises(ValueError, match="keep_mb"):
            keep_freed_memory(bad)
    with pytest.raises(ValueError):
        TolariaSettings(malloc_keep_mb=MAX_KEEP_MB + 1)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_trainer_process_keeps_freed_memory(tmp_path: Path) -> None:
    """`python -m esper.tolaria run` tunes its heap at start and says so in its summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "TOLARIA_"))}
    env |= {"TOLARIA_EPOCHS": "1", "TOLARIA_VAR_DIR": str(tmp_path), "TOLARIA_DEVICE": "cpu",
            "ESPER_METRICS_PORT": "-1", "ESPER_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "esper.tolaria", "run", "--static"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["heap_kept_mb"] == 1024
