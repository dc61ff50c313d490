"""Measurement helpers shared by the probes: inputs, the reference layer, checked forwards, tensor bytes."""

from __future__ import annotations

import math
import time
import types
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from esper.karn.template import SlotShape

ModuleSource = nn.Module | Callable[[], nn.Module]
"""A module, or a factory of fresh ones (probes own what they are given: they change its mode, dtype,
gradients and weights, so the crucible always passes factories)."""

_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def materialise(source: ModuleSource, device: torch.device) -> nn.Module:
    """The module itself, or a fresh one from the factory, on `device`."""
    module = source if isinstance(source, nn.Module) else source()
    if not isinstance(module, nn.Module):
        raise TypeError(f"module factory returned {type(module).__name__}, not an nn.Module")
    return module.to(device)


def probe_input(slot: SlotShape, batch: int, generator: torch.Generator, device: torch.device,
                *, requires_grad: bool = False) -> torch.Tensor:
    """Unit-normal float32 activations, drawn on the CPU from `generator` so every device sees the same."""
    x = slot.example_input(batch, generator=generator).to(device)
    return x.requires_grad_(requires_grad)


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, insisting on what a seed must return: a tensor of the slot's shape."""
    y = module(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"forward returned {type(y).__name__}, not a tensor")
    if y.shape != x.shape:
        raise ValueError(f"forward returned shape {tuple(y.shape)}, the slot's is {tuple(x.shape)}")
    return y


def reference_module(slot: SlotShape, generator: torch.Generator, device: torch.device) -> nn.Module:
    """A plain `Linear(C, C)` (1x1 `Conv2d` for conv slots) with torch's default init, drawn from `generator`."""
    c = slot.channels
    ref: nn.Linear | nn.Conv2d = nn.Linear(c, c) if slot.kind == "vector" else nn.Conv2d(c, c, 1)
    with torch.no_grad():
        nn.init.kaiming_uniform_(ref.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(c)  # fan_in is C for both shapes
        assert ref.bias is not None
        nn.init.uniform_(ref.bias, -bound, bound, generator=generator)
    return ref.to(device)


def exception_reason(exc: BaseException) -> str:
    text = f"exception: {type(exc).__name__}: {exc}"
    return text if len(text) <= 240 else text[:237] + "..."


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call_ms(module: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    module(x)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]); NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; inf when the non-finite entries differ, 0 for two zero tensors."""
    a64, b64 = a.detach().double(), b.detach().double()
    fa, fb = torch.isfinite(a64), torch.isfinite(b64)
    # Non-finite entries must sit at the same places and be of the same kind (nan_to_num: NaN→0, ±inf→±max).
    if not torch.equal(fa, fb) or not torch.equal(torch.nan_to_num(a64[~fa]), torch.nan_to_num(b64[~fb])):
        return math.inf
    diff = float(torch.linalg.vector_norm(a64[fa] - b64[fb]))
    scale = float(torch.linalg.vector_norm(b64[fb]))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0.0 else math.inf


def reachable_tensor_bytes(root: object, max_items: int) -> tuple[int, bool]:
    """Bytes of the distinct tensor storages reachable from `root` through module attributes, containers
    and plain objects' `__dict__` (parameters and buffers included), and whether the walk hit `max_items`.

    This is what a module *retains* between calls, device-independent, so it runs on the CPU as well.
    """
    seen: set[int] = set()
    storages: set[tuple[str, int | None, int]] = set()
    total = 0
    todo: deque[object] = deque([root])
    while todo:
        obj = todo.pop()
        if isinstance(obj, _SCALARS) or id(obj) in seen:
            continue
        if len(seen) >= max_items:
            return total, True
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += _new_storage_bytes(obj, storages)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            todo.extend(obj)
        elif not isinstance(obj, _OPAQUE) and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return total, False


def _new_storage_bytes(t: torch.Tensor, storages: set[tuple[str, int | None, int]]) -> int:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return t.numel() * t.element_size()
    key = (t.device.type, t.device.index, storage.data_ptr())
    if key in storages:
        return 0
    storages.add(key)
    return int(storage.nbytes())
