"""SAFE spatial designs (BP007-BP009, BP015-BP017): they mix neighbouring pixels, so they fit conv slots only.

All are residual, `x + branch(x)`, with the branch's last layer (or last norm's gain) scaled by
`init_scale` so a fresh seed starts near identity. Convs keep HxW for any kernel size (`same_conv`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from esper.karn.layers import common_groups, same_conv, scale_init_, width
from esper.karn.template import BlueprintTemplate, ParamSpec, SlotKind, SlotShape
from esper.leyline import pb

SAFE = pb.BLUEPRINT_TIER_SAFE
CONV_ONLY: frozenset[SlotKind] = frozenset({"conv"})
INIT_SCALE = ParamSpec(0.0, 1.0, 0.1)
KERNEL = ParamSpec(1, 7, 3, integer=True)


class ResidualBranch(nn.Module):
    """x + body(x): the common shape of the spatial designs, `body` an nn.Sequential in forward order."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return x + out


def _project(in_ch: int, out_ch: int, init_scale: float) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    scale_init_(conv, init_scale)
    return conv


def depthwise_separable(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    c, k = slot.channels, int(p["kernel_size"])
    return ResidualBranch(same_conv(c, c, k, groups=c), nn.GELU(), _project(c, c, p["init_scale"]))


def bottleneck_conv(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    c, k = slot.channels, int(p["kernel_size"])
    h = max(1, c // int(p["reduction"]))
    return ResidualBranch(nn.Conv2d(c, h, 1), nn.ReLU(), same_conv(h, h, k), nn.ReLU(), _project(h, c, p["init_scale"]))


def dilated_conv(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    c, k, d = slot.channels, int(p["kernel_size"]), int(p["dilation"])
    return ResidualBranch(same_conv(c, c, k, dilation=d), nn.GELU(), _project(c, c, p["init_scale"]))


def resnet_basic_block(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    c, k, g = slot.channels, int(p["kernel_size"]), common_groups(slot.channels, int(p["groups"]))
    last_norm = nn.GroupNorm(g, c)
    nn.init.constant_(last_norm.weight, p["init_scale"])  # "zero-gamma" residual init
    return ResidualBranch(same_conv(c, c, k), nn.GroupNorm(g, c), nn.ReLU(), same_conv(c, c, k), last_norm)


def inverted_residual(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    c, k = slot.channels, int(p["kernel_size"])
    h = width(c, p["expansion"])
    return ResidualBranch(nn.Conv2d(c, h, 1), nn.ReLU6(), same_conv(h, h, k, groups=h), nn.ReLU6(),
                          _project(h, c, p["init_scale"]))


class SpatialSelfAttention(nn.Module):
    """Non-local block: multi-head self-attention with every pixel as a token of C features."""

    def __init__(self, channels: int, heads: int, head_dim: int, dropout: float, init_scale: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, channels)
        self.drop = nn.Dropout(dropout)
        scale_init_(self.proj, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))  # (N, HW, C)
        q, k, v = (z.view(n, h * w, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, HW, hd)
                   for z in self.qkv(t).split(self.heads * self.head_dim, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, -1)
        y = self.drop(self.proj(y))  # (N, HW, C)
        out: Tensor = x + y.transpose(1, 2).reshape(n, c, h, w)
        return out


TEMPLATES: tuple[BlueprintTemplate, ...] = (
    BlueprintTemplate(
        "BP007", "depthwise_separable_conv", SAFE,
        "Depthwise spatial conv followed by a pointwise channel mix, on a residual path.",
        0.1, depthwise_separable, CONV_ONLY, params={"kernel_size": KERNEL, "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP008", "bottleneck_conv", SAFE,
        "ResNet bottleneck: 1x1 reduce, kxk conv, 1x1 expand, on a residual path.",
        0.12, bottleneck_conv, CONV_ONLY,
        params={"reduction": ParamSpec(1, 8, 4, integer=True), "kernel_size": KERNEL, "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP009", "spatial_self_attention", SAFE,
        "Pre-norm multi-head self-attention across pixels (a non-local block), on a residual path.",
        0.18, lambda s, p: SpatialSelfAttention(
            s.channels, int(p["heads"]), int(p["head_dim"]), p["dropout"], p["init_scale"]), CONV_ONLY,
        params={"heads": ParamSpec(1, 8, 2, integer=True), "head_dim": ParamSpec(4, 64, 8, integer=True),
                "dropout": ParamSpec(0.0, 0.5, 0.0), "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP015", "dilated_conv", SAFE,
        "Dilated conv that widens the receptive field without extra parameters, then a 1x1 projection.",
        0.1, dilated_conv, CONV_ONLY,
        params={"kernel_size": ParamSpec(1, 5, 3, integer=True), "dilation": ParamSpec(1, 4, 2, integer=True),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP016", "resnet_basic_block", SAFE,
        "ResNet basic block (conv-GroupNorm-ReLU-conv-GroupNorm) with a small final norm gain.",
        0.12, resnet_basic_block, CONV_ONLY,
        params={"kernel_size": ParamSpec(1, 5, 3, integer=True), "groups": ParamSpec(1, 32, 8, integer=True),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP017", "inverted_residual", SAFE,
        "MobileNetV2 inverted residual: 1x1 expand, depthwise kxk, 1x1 project, ReLU6 between.",
        0.1, inverted_residual, CONV_ONLY,
        params={"expansion": ParamSpec(1.0, 6.0, 4.0), "kernel_size": KERNEL, "init_scale": INIT_SCALE}),
)
