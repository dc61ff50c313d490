"""Small building blocks shared by the template designs (plain PyTorch, device- and dtype-agnostic)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from esper.karn.template import Factory, SlotShape

ChannelBuilder = Callable[[int, Mapping[str, float]], nn.Module]


def width(channels: int, ratio: float) -> int:
    """Hidden width for a channel ratio, never below 1 so tiny slots still build."""
    return max(1, round(channels * ratio))


def scale_init_(layer: nn.Linear | nn.Conv1d | nn.Conv2d, scale: float) -> None:
    """Shrink a branch's last layer so the seed starts close to its skip path (0 → exactly the skip)."""
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.zero_()


class PerPosition(nn.Module):
    """Runs a channel-wise module at every pixel of a conv slot: (N, C, H, W) → (N, H, W, C) → back.

    Vector designs act on the last dimension, so this is all a conv slot needs; vector slots skip it.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            out: Tensor = self.inner(x)
            return out
        out = self.inner(x.movedim(1, -1))
        return out.movedim(-1, 1)


def channelwise(build: ChannelBuilder) -> Factory:
    """A factory for a design written over the channel (last) dimension; fits vector and conv slots."""

    def factory(slot: SlotShape, params: Mapping[str, float]) -> nn.Module:
        inner = build(slot.channels, params)
        return inner if slot.kind == "vector" else PerPosition(inner)

    return factory


def same_conv(in_ch: int, out_ch: int, kernel_size: int, *, dilation: int = 1, groups: int = 1) -> nn.Module:
    """A stride-1 conv that keeps HxW for any kernel size, padding asymmetrically when the total is odd.

    Torch's `padding="same"` warns on even kernels (and tests turn warnings into errors), so pad by hand.
    """
    total = dilation * (kernel_size - 1)
    if total % 2 == 0:
        return nn.Conv2d(in_ch, out_ch, kernel_size, padding=total // 2, dilation=dilation, groups=groups)
    left = total // 2
    pad = nn.ZeroPad2d((left, total - left, left, total - left))
    return nn.Sequential(pad, nn.Conv2d(in_ch, out_ch, kernel_size, dilation=dilation, groups=groups))


def common_groups(channels: int, wanted: int) -> int:
    """The largest group count ≤ `wanted` that divides `channels` (grouped layers need a divisor)."""
    return max(g for g in range(1, min(wanted, channels) + 1) if channels % g == 0)


def orthogonal_(weight: Tensor, gain: float) -> None:
    """Orthogonal init times `gain`: every singular value is exactly `gain`, so depth compounds it exactly."""
    with torch.no_grad():
        nn.init.orthogonal_(weight)
        weight.mul_(gain)
