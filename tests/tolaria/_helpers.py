"""Small helpers shared by the Tolaria tests: a tiny trained model, exact state comparison, and the
trainer's events as they landed on the telemetry lanes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esper.leyline import CHANNELS, decode_envelope, pb, unpack_as
from esper.tolaria.data import DatasetMeta
from esper.tolaria.host import HostNetwork, build_host
from tests.conftest import ClientFactory

META = DatasetMeta(name="toy", source="npz", num_features=8, num_classes=3, input_shape=(8,), train_size=32,
                   val_size=8, seed=0, val_fraction=0.2)


def make_model(*, seed: int = 0, hidden: tuple[int, ...] = (6, 5)) -> HostNetwork:
    return build_host(META, hidden=hidden, seed=seed)


def make_optimizer(model: nn.Module, kind: str = "adam") -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.01)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int, *, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 8, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of nested state (torch.equal on every tensor, == on everything else)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), f"{where} differs"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
        return
    if isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
        return
    assert a == b, f"{where}: {a!r} != {b!r}"


def assert_state_equal(model_a: nn.Module, opt_a: torch.optim.Optimizer, model_b: nn.Module,
                       opt_b: torch.optim.Optimizer) -> None:
    assert_same(dict(model_a.state_dict()), dict(model_b.state_dict()), "model")
    assert_same(opt_a.state_dict(), opt_b.state_dict(), "optimizer")


async def tolaria_events(client_factory: ClientFactory) -> list[tuple[int, str, dict[str, str]]]:
    """(envelope priority, lane, event attributes) of every Tolaria event on both telemetry lanes."""
    observer = await client_factory("observer")
    out = []
    for lane, stream in (("emergency", CHANNELS["telemetry"].emergency_stream),
                         ("normal", CHANNELS["telemetry"].normal_stream)):
        for _id, fields in await observer.redis.xrange(stream):
            env = decode_envelope(fields[b"payload"])
            packet = unpack_as(env, pb.TelemetryPacket)
            if packet.source_subsystem == "tolaria":
                out.extend((env.priority, lane, dict(e.attributes)) for e in packet.events)
    return out
