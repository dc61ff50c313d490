"""Small hand-written modules for the probe tests: one clean design and one of each misbehaviour."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

C = 16


class Clean(nn.Module):
    def __init__(self, channels: int = C) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(x)
        return out


class NaNOut(Clean):
    """One NaN in every output."""

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x).clone()
        y[0, 0] = float("nan")
        return y


class GainStack(nn.Module):
    """Four orthogonal linears of gain 10: a gain-1e4 stack."""

    def __init__(self, channels: int = C, gain: float = 10.0, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(channels, channels, bias=False) for _ in range(depth)))
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, nn.Linear)
                nn.init.orthogonal_(layer.weight, gain)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x)
        return out


def deep_sigmoid(channels: int = C, depth: int = 12) -> nn.Module:
    return nn.Sequential(*(m for _ in range(depth) for m in (nn.Linear(channels, channels), nn.Sigmoid())))


class ZeroInitBranch(nn.Module):
    """A branch whose last layer starts at zero: no input gradient at first, but it trains."""

    def __init__(self, channels: int = C) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down(torch.relu(self.up(x)))
        return out


class Silence(nn.Module):
    """No parameters, no signal: output and gradients are all zero."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.0


class Leak(Clean):
    """Keeps a copy of every output."""

    def __init__(self, channels: int = C) -> None:
        super().__init__(channels)
        self.kept: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x)
        self.kept.append(y.detach().clone())
        return y


class LastOutputCache(Clean):
    """Keeps only the latest output: constant memory."""

    def __init__(self, channels: int = C) -> None:
        super().__init__(channels)
        self.last: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x)
        self.last["y"] = y.detach().clone()
        return y


class Noisy(Clean):
    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x)
        return y + torch.randn_like(y)


class Drifting(Clean):
    """Mixes a per-call counter into its output (hidden mutable state)."""

    calls: Tensor

    def __init__(self, channels: int = C) -> None:
        super().__init__(channels)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.proj(x) + 0.1 * self.calls
        return out


class Sleeper(Clean):
    """Sleeps a bounded few milliseconds per call."""

    def __init__(self, channels: int = C, sleep_s: float = 0.005) -> None:
        super().__init__(channels)
        self.sleep_s = sleep_s

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.sleep_s)
        out: Tensor = self.proj(x)
        return out


class Spinner(Clean):
    """Busy for a bounded few milliseconds on matmuls whose results it throws away."""

    def forward(self, x: Tensor) -> Tensor:
        deadline, h = time.perf_counter() + 0.004, x
        with torch.no_grad():
            while time.perf_counter() < deadline:
                h = torch.tanh(h @ self.proj.weight)
        out: Tensor = self.proj(x)
        return out


class HeavyButHonest(nn.Module):
    """Slow because it computes its output: a wide hidden layer that every output element depends on."""

    def __init__(self, channels: int = C, hidden: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.up = nn.Linear(channels, hidden)
        self.mid = nn.Sequential(*(nn.Linear(hidden, hidden) for _ in range(depth)))
        self.down = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.down(self.mid(self.up(x)))
        return out


class Cancellation(Clean):
    """(x + 1e6) - 1e6: float32 keeps ~0.06 absolute precision there, float64 keeps it all."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = (self.proj(x) + 1e6) - 1e6
        return out


class Float32Only(Clean):
    """Builds a float32 tensor inside forward: breaks in float64."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(x) @ torch.eye(x.shape[-1])
        return out


class Raises(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


class WrongShape(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1]


class Conv(nn.Module):
    def __init__(self, channels: int = C) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return out
