"""Writer process for the SIGKILL test: checkpoints forever, printing each step once `save` returned."""

from __future__ import annotations

import sys
from pathlib import Path

from esper.tolaria.checkpoint import CheckpointStore
from tests.tolaria._helpers import make_model, make_optimizer, train_steps

store = CheckpointStore(Path(sys.argv[1]), keep=2, run_id="kill9")
model = make_model(hidden=(256, 256))  # ~0.8 MB per file: the kill often lands mid-write
optimizer = make_optimizer(model)
step = 0
while True:
    train_steps(model, optimizer, 1, seed=step)
    step += 1
    store.save_training(model, optimizer, epoch=step // 10, step=step, extra={"note": "x" * 100})
    print(step, flush=True)  # only after the pointer was renamed into place
