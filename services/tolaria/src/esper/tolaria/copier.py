"""Snapshot copies off the training thread (`TOLARIA_ROLLBACK_SNAPSHOT_ASYNC`).

Why: a fast-tier snapshot copies the parameters and the optimizer's state (41 MB on a 4 x 1024 host
with Adam), ~4 ms of memory traffic on the trainer's core, ~15 ms while the ring's memory is still
being faulted in. Between one update and the next, training only *reads* those tensors (forward and
backward write activations and gradients), so the copy can run beside the next step's forward and
backward and be waited for just before `optimizer.step()` writes them again. Measured on the dev
machine (4 x 1024, batch 256, ~68 ms step, a copy every step): +4.3 ms a step copied in line,
+0.9 ms with the copy on the other core (docs/tolaria.md, "Session 18").

One worker thread (`concurrent.futures`: nothing more is needed), optionally pinned
(`TOLARIA_ROLLBACK_COPIER_CORES`); PyTorch releases the GIL inside the copy kernel, so the training
thread goes on. The copy's own duration is measured on the worker: it is what the snapshot budget
charges (`TOLARIA_ROLLBACK_SNAPSHOT_OVERHEAD`), wherever the copy ran.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass

import torch

from esper.core.errors import ConfigurationError

__all__ = ["CopyResult", "SnapshotCopier"]


@dataclass(frozen=True, slots=True)
class CopyResult:
    seconds: float  # the copy's duration on the worker
    thread_id: int  # the thread that copied (not the caller's)
    cores: frozenset[int] | None  # where it was allowed to run (None: not Linux)


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> CopyResult:
    t0 = time.perf_counter()
    with torch.no_grad():  # grad mode is per thread; the sources are detached views anyway
        torch._foreach_copy_(dst, src)
    seconds = time.perf_counter() - t0
    cores = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return CopyResult(seconds, threading.get_ident(), cores)


class SnapshotCopier:
    """A single worker that copies tensor lists; `cores` pins it (Linux; unset: the process's cores)."""

    def __init__(self, cores: set[int] | None = None) -> None:
        self.cores = cores
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tolaria-snapshot",
                                                           initializer=self._pin)
        if cores:  # pinned now, at the trainer's start-up: a refusal broke the pool, and its first copy, mid-run
            try:
                self._pool.submit(int).result()
            except concurrent.futures.BrokenExecutor as e:
                self._pool.shutdown(wait=True)
                raise ConfigurationError(f"TOLARIA_ROLLBACK_COPIER_CORES: cannot run the snapshot copier on cores "
                                         f"{sorted(cores)}: {e.__cause__ or e}") from e

    def _pin(self) -> None:
        if self.cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cores)  # 0: this thread only (Linux affinity is per thread)

    def submit(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> concurrent.futures.Future[CopyResult]:
        """Copy `src[i]` into `dst[i]` on the worker. The caller must not write `src` (nor read `dst`)
        until the future is done."""
        return self._pool.submit(_copy, dst, src)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
