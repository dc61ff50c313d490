"""Where the training thread's page faults land, section by section, in the bench's deep arm.

Wraps the trainer's callees (forward, backward, Adam, snapshot, packet, ...) to count the training
thread's minor faults (`RUSAGE_THREAD`) inside `Trainer.train_step`, then runs `bench/tolaria_bench.py`
with the width-32 and deep arms only (no wider hosts, no answered runs), printing one line of faults per
step and section for every run. A diagnostic: it patches the classes in this process only, and its
perf_counter-free wrappers change no timing worth reading. Session 19 (docs/benchmarks.md): 1.5-465
faults a step from run to run, in either copy mode, mostly in Adam, backward and forward temporaries.
`python scripts/fault_sections.py [--deep-rounds 3]` (about 4 minutes on the dev machine).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import resource
import sys
import threading
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tolaria_bench as tb

import esper.tolaria.trainer as tr
from esper.kasmina import Kasmina
from esper.tolaria.host import HostNetwork
from esper.tolaria.metrics import TrainingSignals
from esper.tolaria.rollback import RollbackManager
from esper.tolaria.sidecar import SidecarDecisionClient

SECTIONS: list[tuple[Any, str, str]] = [
    (tr.Trainer, "_step_start", "step_start"), (HostNetwork, "forward", "forward"),
    (torch.Tensor, "backward", "backward"), (tr, "step_readings", "step_readings"),
    (RollbackManager, "settle", "settle"), (torch.optim.Adam, "step", "adam"),
    (Kasmina, "advance", "kasmina.advance"), (tr.Trainer, "_snapshot", "snapshot"),
    (tr, "build_packet", "build_packet"), (tr, "training_metrics", "training_metrics"),
    (Kasmina, "seed_states", "seed_states"), (SidecarDecisionClient, "submit", "submit"),
    (TrainingSignals, "update", "signals"), (tr.Trainer, "_report_shadow", "report_shadow"),
]
faults: collections.Counter[str] = collections.Counter()
steps = [0]
in_step = [0]
main_thread = threading.main_thread().ident


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def counted(fn: Any, label: str) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not in_step[0] or threading.get_ident() != main_thread:
            return fn(*args, **kwargs)
        before = minor_faults()
        try:
            return fn(*args, **kwargs)
        finally:
            faults[label] += minor_faults() - before
    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--deep-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fault_sections.json"))
    args = parser.parse_args()
    for owner, name, label in SECTIONS:
        setattr(owner, name, counted(getattr(owner, name), label))
    train_step = tr.Trainer.train_step

    def step(self: tr.Trainer, xb: torch.Tensor, yb: torch.Tensor) -> None:
        in_step[0] += 1
        steps[0] += 1
        try:
            counted(train_step, "TOTAL")(self, xb, yb)
        finally:
            in_step[0] -= 1

    tr.Trainer.train_step = step  # type: ignore[method-assign]
    run_fleet = tb.run_fleet

    def each_run(*a: Any, **kw: Any) -> Any:
        faults.clear()
        steps[0] = 0
        out = run_fleet(*a, **kw)
        n = max(1, steps[0])
        print(f"{kw.get('name') or 'width-32 / accuracy run'}: {n} steps, faults per step",
              json.dumps({k: round(v / n, 1) for k, v in faults.most_common() if v}), flush=True)
        return out

    tb.run_fleet = each_run
    return tb.main(["--widths", "--answered-rounds", "0", "--deep-rounds", str(args.deep_rounds),
                    "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
