"""Optimizer migration keeps the host's state: momentum buffers (SGD) and moments (Adam/AdamW) are the
same before and after seed parameters join and leave, and the host's trajectory is bit-for-bit the
one it would have had without the seed."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from esper.kasmina import add_seed_params, remove_seed_params
from esper.kasmina.optim import SEED_GROUP_KEY, mark_fossil, seed_group, seed_param_count, state_tensors

MAKERS: dict[str, Callable[[list[nn.Parameter]], Optimizer]] = {
    "sgd_momentum": lambda p: SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: Adam(p, lr=0.01),
    "adamw": lambda p: AdamW(p, lr=0.01, weight_decay=0.1),
}


def _host() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _seed() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(3, 3)


def _host_step(host: nn.Linear, opt: Optimizer, i: int, seed: nn.Module | None = None) -> None:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 4, generator=g)
    opt.zero_grad(set_to_none=True)
    loss = host(x).pow(2).mean()
    if seed is not None:  # the seed trains on its own objective, off the host's graph
        loss = loss + seed(host(x).detach()).pow(2).mean()
    loss.backward()
    opt.step()


def _snapshot(opt: Optimizer, params: list[nn.Parameter]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in state_tensors(opt, p).items()} for p in params]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_in_place_migration_keeps_host_state_and_trajectory(kind: str) -> None:
    make = MAKERS[kind]
    ref, host = _host(), _host()
    ref_opt, opt = make(list(ref.parameters())), make(list(host.parameters()))
    hp = list(host.parameters())
    for i in range(3):
        _host_step(ref, ref_opt, i)
        _host_step(host, opt, i)
    before = _snapshot(opt, hp)
    assert before[0], "the host has optimizer state to lose"

    seed = _seed()
    group = add_seed_params(opt, "seed-a", seed.parameters())
    assert group[SEED_GROUP_KEY] == "seed-a" and group["lr"] == opt.param_groups[0]["lr"]
    assert _same(before, _snapshot(opt, hp))  # adding did not touch host state
    for i in range(3, 6):
        _host_step(ref, ref_opt, i)
        _host_step(host, opt, i, seed=seed)
    assert all(state_tensors(opt, p) for p in seed.parameters())  # the seed accumulated its own state
    mid = _snapshot(opt, hp)
    assert remove_seed_params(opt, "seed-a") == 2
    assert _same(mid, _snapshot(opt, hp))  # removing did not touch host state
    assert len(opt.param_groups) == 1 and all(p not in opt.state for p in seed.parameters())
    for i in range(6, 9):
        _host_step(ref, ref_opt, i)
        _host_step(host, opt, i)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), host.parameters(), strict=True))
    assert _same(_snapshot(ref_opt, list(ref.parameters())), _snapshot(opt, hp))


def test_guards_and_fossil_groups() -> None:
    host, seed = _host(), _seed()
    opt = SGD(host.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError):
        add_seed_params(opt, "seed-a", host.parameters())  # already in the optimizer
    add_seed_params(opt, "seed-a", seed.parameters(), lr=0.5)
    assert seed_group(opt, "seed-a") is not None and opt.param_groups[1]["lr"] == 0.5
    with pytest.raises(ValueError):
        add_seed_params(opt, "seed-a", _seed().parameters())  # one group per seed
    assert seed_param_count(opt, "seed-a") == 2
    assert mark_fossil(opt, "seed-a") and seed_param_count(opt, "seed-a") == 0
    assert remove_seed_params(opt, "seed-a") == 0 and len(opt.param_groups) == 2  # a fossil is host now
    _ = copy.deepcopy(opt.state_dict())  # still a well-formed optimizer
