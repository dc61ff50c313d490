"""Tamiyo on CUDA: the GNN's serving forward eager vs `torch.compile`d (Tamiyo's `CompiledPolicy`).

Run on a machine with a GPU: `python bench/tamiyo_cuda_bench.py --out bench/results/tamiyo_cuda.json`.
Without CUDA it writes nothing and exits 2 (the CPU path is `make bench-tamiyo`'s).

What it measures (`TAMIYO_ENABLE_COMPILE=1` is what a GPU deployment would set):
- `compile_warm_ms`: the one-time warm-up `CompiledPolicy` pays at start (the compile), and
  `compile_reason` / `compile_fallback_total` (did the compiled path serve, or fall back to eager);
- `eager_p50_ms` / `compiled_p50_ms` (and p99): one forward on bench/tamiyo_inference_bench.py's
  representative graph, CUDA-synchronised, interleaved blocks; `*_other_shape_*`: the same on a graph
  of other node and edge counts, to show that `dynamic=True` serves a new shape without recompiling
  (`recompile_ms`: the first call on that shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from esper.tamiyo.compile import CompiledPolicy
from esper.tamiyo.gnn import TamiyoGNN

try:
    from bench.tamiyo_inference_bench import representative_graph
except ImportError:  # run as a script: bench/ is on sys.path
    from tamiyo_inference_bench import representative_graph  # type: ignore[import-not-found,no-redef]

BLOCK = 50


def _on(graph: Any, device: torch.device) -> Any:
    x, ei, ea, counts = graph
    return ({k: v.to(device) for k, v in x.items()}, {k: v.to(device) for k, v in ei.items()},
            {k: v.to(device) for k, v in ea.items()}, counts)


def _timed(fn: Callable[[], object], n: int, out: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000.0)


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tamiyo_cuda.json"))
    parser.add_argument("--n", type=int, default=1000, help="timed forwards per implementation and shape")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = TamiyoGNN().to(device)
    eager = CompiledPolicy(model, enabled=False)
    compiled = CompiledPolicy(model, enabled=True)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device), "torch": str(torch.__version__),
                              "compile_reason": compiled.compile_reason, "compile_warm_ms": compiled.compile_warm_ms}
    for label, seed in (("", 0), ("other_shape_", 7)):
        graph = _on(representative_graph(seed), device)
        if label:  # other node/edge counts: the first call shows whether the compiled graph is reused
            x, ei, ea, counts = graph
            graph = ({k: torch.cat([v, v]) for k, v in x.items()}, ei, ea, {k: 2 * c for k, c in counts.items()})
            t0 = time.perf_counter()
            compiled(*graph)
            torch.cuda.synchronize()
            result["recompile_ms"] = (time.perf_counter() - t0) * 1000.0
        samples: dict[str, list[float]] = {"eager": [], "compiled": []}
        runners = {"eager": lambda g=graph: eager(*g), "compiled": lambda g=graph: compiled(*g)}
        for fn in runners.values():
            _timed(fn, BLOCK, [])  # warm-up
        for _ in range(max(1, args.n // BLOCK)):
            for name, fn in runners.items():
                _timed(fn, BLOCK, samples[name])
        for name, xs in samples.items():
            result[f"{name}_{label}p50_ms"] = statistics.median(xs)
            result[f"{name}_{label}p99_ms"] = _pct(xs, 99)
    result["compile_fallback_total"] = compiled.compile_fallback_total
    result["compile_enabled_after"] = compiled.compile_enabled
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for k, v in sorted(result.items()):
        print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
