"""Keep freed heap memory in the trainer's process, so that a CPU step's tensors do not page-fault.

PyTorch's CPU allocator is plain `malloc`/`free`. Every CPU step frees and reallocates tensors
of the parameters' sizes: the gradients (`zero_grad(set_to_none=True)`) and the optimizer's
temporaries (Adam's `denom`, one per parameter). glibc serves a large block with a fresh `mmap`
and gives it back on `free`, and it trims the top of the heap when more than its trim threshold is
free there. The next step then faults those pages in again, one 4 KiB page at a time.

Session 15 measured this on the bench's 1024 x 2 host (docs/tolaria.md): 200-1300 minor faults a
step, ~2 µs each on this VM and ~10 µs for pages the VM had never touched. The number depends on
where the heap's live blocks happen to lie, so the trainer and a plain loop in the same process
differ by hundreds of faults a step. With freed memory kept, both fall to almost none.

`keep_freed_memory` sets glibc's knobs through `mallopt`: no `mmap` for large blocks
(`M_MMAP_MAX` 0: they come from the heap and are reused there), and no trim until `keep_mb` MiB
are free at the top (`M_TRIM_THRESHOLD`). It acts on the whole process, like PyTorch's CUDA
caching allocator does on a GPU: memory is reused instead of going back to the OS. Written here
because no library exposes `mallopt`. The other cure, jemalloc or tcmalloc via `LD_PRELOAD`,
needs a package and an environment set before the process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass
from functools import cache

__all__ = ["HeapTuning", "keep_freed_memory"]

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

MAX_KEEP_MB = 2047  # M_TRIM_THRESHOLD is a C int of bytes


@dataclass(frozen=True, slots=True)
class HeapTuning:
    """What `keep_freed_memory` did: `applied`, or `reason` why not."""

    applied: bool
    keep_mb: int
    reason: str = ""


@cache
def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def keep_freed_memory(keep_mb: int) -> HeapTuning:
    """Keep up to `keep_mb` MiB of freed memory at the heap's top, and serve large blocks from the
    heap; 0 leaves glibc's defaults. Process-wide and idempotent. Not glibc (macOS, musl): nothing is
    done, and `reason` says so."""
    if not 0 <= keep_mb <= MAX_KEEP_MB:
        raise ValueError(f"keep_mb must be in [0, {MAX_KEEP_MB}], got {keep_mb}")
    if keep_mb == 0:
        return HeapTuning(False, 0, "off (TOLARIA_MALLOC_KEEP_MB=0)")
    libc = _libc()
    if libc is None:
        return HeapTuning(False, keep_mb, f"not glibc ({platform.libc_ver()[0] or platform.system()})")
    # mallopt returns 1 on success, 0 on a refused value.
    if not libc.mallopt(M_TRIM_THRESHOLD, keep_mb << 20):
        return HeapTuning(False, keep_mb, "mallopt(M_TRIM_THRESHOLD) refused")
    if not libc.mallopt(M_MMAP_MAX, 0):
        return HeapTuning(False, keep_mb, "mallopt(M_MMAP_MAX) refused")
    return HeapTuning(True, keep_mb)
