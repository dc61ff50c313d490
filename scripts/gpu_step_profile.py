"""Where the trainer's step time goes beyond a plain loop's (a device check, not CI).

Session 11 measured on an H200 that the control plane's per-step cost grows with the model (0.97 ms on
a 16 x 1024 host, 2.2 ms on 16 x 4096); this splits it without Redis or Tamiyo. Epoch by epoch, on the
same batches and after a warm-up epoch: the plain loop; the plain loop plus one `.item()` per step
(the cost of waiting for the device once a step); the plain loop plus `step_readings` (what the
trainer reads); then the trainer without a bus beside its own interleaved plain loop, and a cProfile
of the trainer's steps. Example (the deep host of docs/benchmarks.md):
`python scripts/gpu_step_profile.py --device cuda --width 4096 --layers 16 --batch 512 --samples 16384 --features 1024`
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tolaria_bench import PlainLoop, TimedTrainer, synthetic_dataset

from esper.tolaria.heap import keep_freed_memory
from esper.tolaria.metrics import step_readings
from esper.tolaria.settings import TolariaSettings

VARIANTS = ("plain", "item", "readings")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=0, help="synthetic dataset of this many samples (0: digits)")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("/tmp/step_profile.json"))
    args = ap.parse_args()
    # The trainer's process keeps freed heap memory (`python -m esper.tolaria`, the bench): so does this one.
    heap = keep_freed_memory(TolariaSettings().malloc_keep_mb)
    out: dict[str, Any] = vars(args) | {"out": str(args.out), "heap_kept_mb": heap.keep_mb if heap.applied else 0}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "d.npz", args.samples, args.features) if args.samples else None

        def settings(name: str) -> TolariaSettings:
            return TolariaSettings(var_dir=Path(tmp) / name, epochs=args.epochs, hidden_width=args.width,
                                   hidden_layers=args.layers, batch_size=args.batch, dataset_path=data,
                                   device=args.device, checkpoint_every_epochs=args.epochs)

        loops = {m: PlainLoop(settings("v")) for m in VARIANTS}
        reads: dict[str, Callable[[Tensor, Tensor, Tensor], object] | None] = {
            "plain": None,
            "item": lambda loss, logits, labels: loss.item(),  # one wait for the device per step
            "readings": lambda loss, logits, labels: step_readings(loss, loops["readings"].host.parameters(),
                                                                   logits, labels),
        }
        for m, loop in loops.items():  # warm-up (allocator, cuBLAS handles), not counted
            loop.epoch(0, reads[m])
            loop.seconds, loop.steps = 0.0, 0
        for e in range(1, args.epochs + 1):
            for m, loop in loops.items():
                loop.epoch(e, reads[m])
        out |= {f"{m}_step_ms": loop.step_ms for m, loop in loops.items()}
        trainer = TimedTrainer(settings("t"), bus=None)
        trainer.interleave = PlainLoop(settings("ti"))
        trainer.run()
        out["trainer_step_ms"] = trainer.step_seconds * 1000.0 / max(1, trainer.stats.steps)
        out["trainer_plain_step_ms"] = trainer.interleave.step_ms
        profiled = TimedTrainer(settings("p"), bus=None)
        prof = cProfile.Profile()
        prof.enable()
        profiled.run()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print(buf.getvalue())
    print(json.dumps(out, indent=1))
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
