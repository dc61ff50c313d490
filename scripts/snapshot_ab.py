"""Snapshot copies in line vs beside the step, on the trainer alone (no fleet: less noise than the bench).

Runs the trainer without a bus on the bench's deep host (4 x 1024, batch 256, synthetic 8192 x 256),
each run beside its interleaved plain loop, alternating `TOLARIA_ROLLBACK_SNAPSHOT_ASYNC` on and off
(`rounds` pairs; the first pair grows the heap: read it as a warm-up). The trainer is pinned to the
first allowed core and the copier to the next, as the bench pins them. Session 18, three runs of it:
means of 1.026x the plain loop in line, 1.011x beside (docs/benchmarks.md). About 3 minutes at the
defaults on the dev machine.
`python scripts/snapshot_ab.py [--rounds 4] [--epochs 6]`
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tolaria_bench import DEEP_FEATURES, DEEP_HOST, DEEP_SAMPLES, PlainLoop, TimedTrainer, synthetic_dataset

from esper.tolaria.heap import keep_freed_memory
from esper.tolaria.settings import TolariaSettings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[0]})
    torch.set_num_threads(1)
    keep_freed_memory(TolariaSettings().malloc_keep_mb)
    rows = []
    with tempfile.TemporaryDirectory(prefix="esper-snapshot-ab-") as tmp:
        data = synthetic_dataset(Path(tmp) / "deep.npz", DEEP_SAMPLES, DEEP_FEATURES)
        for r in range(args.rounds):
            for beside in (True, False):
                gc.collect()
                s = TolariaSettings(var_dir=Path(tmp) / f"v{r}{beside}", epochs=args.epochs, dataset_path=data,
                                    checkpoint_every_epochs=args.epochs + 1, rollback_snapshot_async=beside,
                                    rollback_copier_cores=cores[1:2] or None, **DEEP_HOST)
                trainer = TimedTrainer(s, bus=None)
                trainer.interleave = PlainLoop(s)
                trainer.run()
                trainer.close()
                steps = max(1, trainer.stats.steps)
                rows.append({"round": r, "beside": beside, "snapshots": trainer.rollback.taken,
                             "ratio": trainer.step_seconds * 1000.0 / steps / trainer.interleave.step_ms,
                             "faults_per_step": trainer.step_faults / steps})
                print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
