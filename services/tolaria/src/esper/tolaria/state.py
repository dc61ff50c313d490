"""Training state (model + optimizer) as detached CPU copies: what rollback snapshots and checkpoints hold.

`capture_state` deep-copies every tensor to the CPU, so a snapshot never aliases live parameters or
optimizer buffers. From a CUDA model the copies are queued at once into pinned host memory and waited
for once (one device sync per snapshot, not one blocking pageable copy per tensor). `restore_state`
validates the *whole* state against the live model and optimizer before it writes anything (a
mismatch leaves both untouched), then loads copies: the optimizer's `load_state_dict` keeps CPU
tensors it is given as they are, so restoring the snapshot itself would let the next
`optimizer.step()` mutate the snapshot in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from esper.core.errors import EsperError
from esper.kasmina.optim import FOSSIL_GROUP_KEY, SEED_IDENTITY_KEYS

__all__ = [
    "StateMismatchError",
    "TrainingState",
    "capture_state",
    "check_fit",
    "check_state",
    "cpu_copy",
    "live_nbytes",
    "prepare_capture",
    "restore_state",
    "tensor_nbytes",
]

T = TypeVar("T")


class StateMismatchError(EsperError, ValueError):
    """A saved state does not fit the live model/optimizer (keys, shapes, dtypes, parameter groups)."""


def cpu_copy(obj: T, *, non_blocking: bool = False) -> T:
    """Deep copy with every tensor detached and cloned to the CPU (dicts, lists and tuples recursed).

    With `non_blocking`, a CUDA tensor's copy is only queued (into pinned memory, which PyTorch
    allocates for a non-blocking device-to-host copy): the caller must synchronise before reading it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True, non_blocking=non_blocking and obj.is_cuda)  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {k: cpu_copy(v, non_blocking=non_blocking) for k, v in obj.items()}  # type: ignore[return-value]
    if isinstance(obj, list):
        return [cpu_copy(v, non_blocking=non_blocking) for v in obj]  # type: ignore[return-value]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v, non_blocking=non_blocking) for v in obj)  # type: ignore[return-value]
    return obj


def tensor_nbytes(obj: object) -> int:
    """Bytes held by the tensors in a nested dict/list/tuple."""
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, Mapping):
        return sum(tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_nbytes(v) for v in obj)
    return 0


@dataclass(frozen=True, slots=True)
class TrainingState:
    """A model state dict and an optimizer state dict, both CPU copies owned by this object."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    nbytes: int


def capture_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainingState:
    """Deep-copied CPU state of `model` (parameters and buffers) and `optimizer` (may be None)."""
    live = dict(model.state_dict())
    cuda = next((t.device for t in live.values() if t.is_cuda), None)
    model_state = cpu_copy(live, non_blocking=cuda is not None)
    opt_state: dict[str, Any] = (cpu_copy(optimizer.state_dict(), non_blocking=cuda is not None)
                                 if optimizer is not None else {})
    if cuda is not None:
        torch.cuda.synchronize(cuda)  # every queued copy has landed before the state is handed out
    return TrainingState(model_state, opt_state, tensor_nbytes(model_state) + tensor_nbytes(opt_state))


def prepare_capture(model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                    reuse: TrainingState | None = None,
                    ) -> tuple[TrainingState, list[torch.Tensor], list[torch.Tensor]] | None:
    """`capture_state` in two halves, for a copy that runs beside the next step (`copier.py`): returns the
    state with the parameters' and the optimizer's tensors still to be filled, and the (destination,
    source) lists to fill them from. Between two updates only `optimizer.step()` (and a restore) writes
    those. Buffers (BatchNorm's running statistics: the forward pass writes them) are copied here, now.
    `reuse`: a state nobody holds any more (a snapshot the ring evicted); its tensors at the same place
    (key path, shape, dtype) are filled again instead of allocating new ones, so a full ring copies into
    the same memory every time (fresh allocations beside the step moved the heap's layout under the
    step's own tensors: page faults on the training thread). None when a tensor is not on the CPU: a
    CUDA state is captured by `capture_state`, one device sync."""
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []

    def later(obj: T, old: object) -> T:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                raise _NotCpu
            fits = (isinstance(old, torch.Tensor) and old.shape == obj.shape and old.dtype == obj.dtype
                    and old.device == obj.device and old.is_contiguous() and obj.is_contiguous())
            out = old if fits else torch.empty_like(obj, requires_grad=False)
            dst.append(out)  # type: ignore[arg-type]
            src.append(obj.detach())
            return out  # type: ignore[return-value]
        if isinstance(obj, dict):
            olds = old if isinstance(old, dict) else {}
            return {k: later(v, olds.get(k)) for k, v in obj.items()}  # type: ignore[return-value]
        if isinstance(obj, list | tuple):
            olds_seq = old if isinstance(old, list | tuple) and len(old) == len(obj) else [None] * len(obj)
            items = [later(v, o) for v, o in zip(obj, olds_seq, strict=True)]
            return (items if isinstance(obj, list) else tuple(items))  # type: ignore[return-value]
        return obj

    old_model = reuse.model if reuse is not None else {}
    try:
        model_state = {k: later(v, old_model.get(k)) if isinstance(v, nn.Parameter) else _cpu_now(v)
                       for k, v in model.state_dict(keep_vars=True).items()}
        opt_state: dict[str, Any] = (later(optimizer.state_dict(), reuse.optimizer if reuse is not None else None)
                                     if optimizer is not None else {})
    except _NotCpu:
        return None
    return TrainingState(model_state, opt_state, tensor_nbytes(model_state) + tensor_nbytes(opt_state)), dst, src


class _NotCpu(Exception):
    pass


def _cpu_now(obj: T) -> T:
    if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
        raise _NotCpu
    return cpu_copy(obj)


def live_nbytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes `capture_state` would copy, read off the live tensors without copying anything."""
    return tensor_nbytes(dict(model.state_dict())) + (tensor_nbytes(optimizer.state) if optimizer is not None else 0)


def _check_model(live: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise StateMismatchError(f"model keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in live.items():
        saved = state[key]
        if not isinstance(saved, torch.Tensor):
            raise StateMismatchError(f"{key}: saved value is a {type(saved).__name__}, not a tensor")
        if saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            raise StateMismatchError(f"{key}: saved {tuple(saved.shape)} {saved.dtype}, "
                                     f"live {tuple(tensor.shape)} {tensor.dtype}")


def _check_groups(groups: Sequence[Mapping[str, Any]], saved_groups: object) -> dict[int, torch.Tensor]:
    """Saved parameter groups against live ones, by position; returns saved parameter id -> live tensor."""
    if not isinstance(saved_groups, list):
        raise StateMismatchError("optimizer state lacks 'state' / 'param_groups'")
    if len(groups) != len(saved_groups):
        raise StateMismatchError(f"optimizer has {len(groups)} parameter groups, saved state {len(saved_groups)}")
    params: dict[int, torch.Tensor] = {}
    for g, sg in zip(groups, saved_groups, strict=True):
        ids = sg.get("params") if isinstance(sg, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(g["params"]):
            raise StateMismatchError("optimizer parameter group sizes differ from the saved state")
        # Groups pair by position: their seed tags must agree too, or a state saved with seed A would load
        # into seed B of the same shape (a later germination in the slot, or two slots' seeds reordered).
        live_tags, saved_tags = ({k: grp.get(k) for k in SEED_IDENTITY_KEYS} for grp in (g, sg))
        if live_tags != saved_tags:
            raise StateMismatchError(f"optimizer group of {live_tags}, saved state's of {saved_tags}")
        params.update(zip(ids, g["params"], strict=True))
    return params


def _check_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    if not isinstance(state.get("state"), Mapping):
        raise StateMismatchError("optimizer state lacks 'state' / 'param_groups'")
    params = _check_groups(optimizer.param_groups, state.get("param_groups"))
    for pid, per_param in state["state"].items():
        if pid not in params or not isinstance(per_param, Mapping):
            raise StateMismatchError(f"optimizer state for unknown parameter {pid!r}")
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[pid].shape:
                raise StateMismatchError(f"optimizer {name} of parameter {pid}: saved {tuple(value.shape)}, "
                                         f"live {tuple(params[pid].shape)}")


def check_fit(tensors: Mapping[str, torch.Tensor], groups: Sequence[Mapping[str, Any]], state: TrainingState) -> None:
    """`check_state`'s model and group checks for a model and optimizer as they would be (the trainer:
    without the seeds it would cull), given as their tensors and parameter groups."""
    _check_model(tensors, state.model)
    _check_groups(groups, state.optimizer.get("param_groups"))


def check_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainingState) -> None:
    """Raise StateMismatchError unless `state` can be loaded into `model` and `optimizer` as a whole."""
    _check_model(model.state_dict(), state.model)
    if optimizer is not None:
        _check_optimizer(optimizer, state.optimizer)


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainingState) -> None:
    """Load `state` bit for bit; validated first, so a mismatch changes nothing. `state` stays reusable."""
    check_state(model, optimizer, state)
    with torch.no_grad():
        model.load_state_dict(state.model, strict=True)  # copies into the live tensors
    if optimizer is not None:
        fossils = [g.get(FOSSIL_GROUP_KEY) for g in optimizer.param_groups]
        optimizer.load_state_dict(cpu_copy(state.optimizer))  # a copy: the optimizer may keep what it gets
        for group, fossil in zip(optimizer.param_groups, fossils, strict=True):  # the group dicts are the
            if fossil is not None:  # saved ones now: a seed fossilised since keeps its tag (it is host)
                group[FOSSIL_GROUP_KEY] = fossil
