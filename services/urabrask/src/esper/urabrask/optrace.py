"""How much of a forward's time is spent computing its output.

A forward is traced op by op (a `TorchDispatchMode`): each aten op's time, the storages it reads and
the storages it writes. Walking back from the output's storage marks the *live* ops, the ones its
value depends on. Whatever else the wall-clock time holds — ops whose results are thrown away (a busy
loop), waiting (a lock, a sleep), pure-Python spinning — is *stall*. This is what separates a module
that is slow because it computes a lot (attention over many tokens) from one that is slow for nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from esper.urabrask.measure import synchronize

_StorageKey = tuple[str, int | None, int]


@dataclass(frozen=True, slots=True)
class OpTrace:
    """One traced forward: time of the ops its output depends on, and op counts."""

    live_ms: float
    ops_ms: float
    live_ops: int
    dead_ops: int


def _key(t: torch.Tensor) -> _StorageKey:
    try:
        return t.device.type, t.device.index, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # storage-less layouts: the tensor object stands for it
        return t.device.type, t.device.index, id(t)


def _storages(tree: Any) -> set[_StorageKey]:
    leaves, _ = tree_flatten(tree)
    return {_key(t) for t in leaves if isinstance(t, torch.Tensor)}


class _Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves these untyped
    def __init__(self, device: torch.device) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.device = device
        self.ops: list[tuple[float, set[_StorageKey], set[_StorageKey]]] = []
        self.keep: list[Any] = []  # outputs stay alive, so no storage address is reused mid-trace

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        reads = _storages((args, kwargs))
        start = time.perf_counter()
        out = func(*args, **kwargs)
        synchronize(self.device)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        writes = _storages(out)
        if func._schema.is_mutable:  # in-place and out= ops write (some of) what they read
            writes |= reads
        self.keep.append(out)
        self.ops.append((elapsed_ms, reads, writes))
        return out


def trace_forward(module: nn.Module, x: torch.Tensor, device: torch.device) -> OpTrace:
    """Runs `module(x)` once under the recorder (no_grad) and splits its op time into live and dead."""
    recorder = _Recorder(device)
    with torch.no_grad(), recorder:
        y = module(x)
    live = _storages(y)
    live_ms = ops_ms = 0.0
    live_ops = dead_ops = 0
    for elapsed_ms, reads, writes in reversed(recorder.ops):  # a write only matters if read later
        ops_ms += elapsed_ms
        if writes & live:
            live_ms += elapsed_ms
            live_ops += 1
            live |= reads
        else:
            dead_ops += 1
    return OpTrace(live_ms, ops_ms, live_ops, dead_ops)
