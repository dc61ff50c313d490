"""Writer process for the SIGKILL test: registers kernels forever, printing each id once committed."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from esper.karn.template import SlotShape
from esper.urza.artifact import pack_artifact
from esper.urza.library import UrzaLibrary

lib = UrzaLibrary(Path(sys.argv[1]), Path(sys.argv[2]))
i = 0
while True:
    slot = SlotShape(i + 1)
    g = torch.Generator().manual_seed(i)
    data = pack_artifact("BPK", slot, {"i": float(i)}, {"w": torch.randn(64, i + 1, generator=g)})
    record = lib.register_kernel("BPK", slot, data, compile_ms=1.0, prewarm_p50_ms=0.1, prewarm_p95_ms=0.2)
    print(record.kernel_id, flush=True)  # only after the commit returned
    i += 1
