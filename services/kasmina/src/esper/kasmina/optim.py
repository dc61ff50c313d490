"""Optimizer migration when seed parameters join or leave the model, in place, keeping every surviving
parameter's state (SGD momentum buffers, Adam/AdamW moments and step counts) untouched.

At a step boundary ``add_seed_params`` appends one param group tagged with the seed id, copying the
host's current hyperparameters (group 0: lr, momentum, betas, weight decay...), and
``remove_seed_params`` drops that group and its state. The trainer's optimizer object, and any
reference to it, stays valid.

An LR scheduler built before a seed joined does *not* leave the seed's group alone: it walks every
group the optimizer has now (torch 2.13: StepLR, ExponentialLR and CosineAnnealingLR move the seed's lr
too; LambdaLR raises, it has fewer base lrs than groups). A trainer with a scheduler must rebuild it (or
register the new group with it) when a seed joins or leaves; Tolaria has none, it sets every group's lr
itself (``set_lr``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "FOSSIL_GROUP_KEY",
    "GERMINATION_KEY",
    "SEED_GROUP_KEY",
    "SEED_IDENTITY_KEYS",
    "add_seed_params",
    "mark_fossil",
    "remove_seed_params",
    "seed_group",
    "seed_param_count",
    "state_tensors",
]

SEED_GROUP_KEY: Final[str] = "kasmina_seed"
"""Param-group key naming the seed a group belongs to."""
FOSSIL_GROUP_KEY: Final[str] = "kasmina_fossil"
"""Set (to the seed id) on a fossilised seed's group: it is host now, and never removed by Kasmina."""
GERMINATION_KEY: Final[str] = "kasmina_germination"
"""The id of the command that germinated the group's seed: one slot's seeds share a seed id and shapes."""
SEED_IDENTITY_KEYS: Final[tuple[str, ...]] = (SEED_GROUP_KEY, GERMINATION_KEY)
"""Which seed a group holds: a saved optimizer state must agree on it, group by group, to be restored.
(Not the fossil tag: a seed fossilised since the state was saved is still that seed.)"""


def _hyperparameters(optimizer: Optimizer) -> dict[str, Any]:
    base = optimizer.param_groups[0] if optimizer.param_groups else optimizer.defaults
    return {k: v for k, v in base.items() if k not in ("params", SEED_GROUP_KEY, FOSSIL_GROUP_KEY)}


def _ids(optimizer: Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def seed_group(optimizer: Optimizer, seed_id: str) -> dict[str, Any] | None:
    for group in optimizer.param_groups:
        if group.get(SEED_GROUP_KEY) == seed_id:
            return group
    return None


def seed_param_count(optimizer: Optimizer, seed_id: str) -> int:
    """Parameters the optimizer still holds for ``seed_id`` (fossil groups excluded)."""
    return sum(len(g["params"]) for g in optimizer.param_groups
               if g.get(SEED_GROUP_KEY) == seed_id and not g.get(FOSSIL_GROUP_KEY))


def add_seed_params(optimizer: Optimizer, seed_id: str, params: Iterable[nn.Parameter], *, germination: str = "",
                    **overrides: Any) -> dict[str, Any]:
    """Append ``params`` as a new group tagged ``seed_id`` (host hyperparameters unless overridden) and,
    when given, ``germination`` (the germinating command's id): saved states carry both tags, so a
    restore can tell this seed from an earlier one of the same shape in the same slot."""
    plist = [p for p in params if p.requires_grad]
    if not plist:
        raise ValueError(f"{seed_id}: no trainable parameters to add")
    if seed_group(optimizer, seed_id) is not None:
        raise ValueError(f"{seed_id}: the optimizer already has a group for this seed")
    known = _ids(optimizer)
    if any(id(p) in known for p in plist):
        raise ValueError(f"{seed_id}: some parameters are already in the optimizer")
    group: dict[str, Any] = {**_hyperparameters(optimizer), **overrides, "params": plist, SEED_GROUP_KEY: seed_id}
    if germination:
        group[GERMINATION_KEY] = germination
    group.pop("initial_lr", None)  # an LR scheduler's bookkeeping for the host groups
    optimizer.add_param_group(group)
    return optimizer.param_groups[-1]


def remove_seed_params(optimizer: Optimizer, seed_id: str) -> int:
    """Drop the (non-fossil) group of ``seed_id`` and its per-parameter state; returns how many
    parameters left. The other groups, their order and their state are untouched."""
    removed = 0
    keep: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        if group.get(SEED_GROUP_KEY) == seed_id and not group.get(FOSSIL_GROUP_KEY):
            for p in group["params"]:
                optimizer.state.pop(p, None)
                removed += 1
        else:
            keep.append(group)
    optimizer.param_groups[:] = keep
    return removed


def mark_fossil(optimizer: Optimizer, seed_id: str) -> bool:
    """Tag the seed's group as host for good (``remove_seed_params`` then leaves it alone)."""
    group = seed_group(optimizer, seed_id)
    if group is None:
        return False
    group[FOSSIL_GROUP_KEY] = seed_id
    return True


def state_tensors(optimizer: Optimizer, param: Tensor) -> dict[str, Tensor]:
    """The tensor entries of one parameter's state (momentum_buffer, exp_avg, exp_avg_sq, step...)."""
    return {k: v for k, v in optimizer.state.get(param, {}).items() if isinstance(v, Tensor)}
