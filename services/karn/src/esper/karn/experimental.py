"""EXPERIMENTAL designs (BP036-BP040): plausible but less proven ideas, each on a residual path.

They train, but their behaviour away from unit-scale activations is less understood than the SAFE
designs' (high-frequency features, input-dependent weights, polynomial growth), hence risk 0.3-0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from esper.karn.layers import channelwise, scale_init_, width
from esper.karn.template import BlueprintTemplate, ParamSpec, SlotKind, SlotShape
from esper.leyline import pb

EXPERIMENTAL = pb.BLUEPRINT_TIER_EXPERIMENTAL
INIT_SCALE = ParamSpec(0.0, 1.0, 0.1)


class FourierFeatures(nn.Module):
    """Random Fourier features of the channels, [sin(xB), cos(xB)], projected back: a high-frequency basis.

    B is a persistent buffer drawn at build, so an artifact's state_dict reproduces the same basis.
    """

    basis: Tensor

    def __init__(self, channels: int, features: int, sigma: float, init_scale: float) -> None:
        super().__init__()
        self.register_buffer("basis", torch.randn(channels, features) * sigma / math.sqrt(channels))
        self.out = nn.Linear(2 * features, channels)
        scale_init_(self.out, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        z = x @ self.basis  # (..., F)
        out: Tensor = x + self.out(torch.cat([torch.sin(z), torch.cos(z)], dim=-1))
        return out


class HyperAdapter(nn.Module):
    """A tiny hypernetwork generates a per-sample low-rank projection A(x), then x + out(A(x)·x)."""

    def __init__(self, channels: int, context_dim: int, rank: int, init_scale: float) -> None:
        super().__init__()
        self.rank = rank
        self.context = nn.Linear(channels, context_dim)
        self.act = nn.Tanh()
        self.generator = nn.Linear(context_dim, rank * channels)
        self.out = nn.Linear(rank, channels)
        scale_init_(self.out, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        lead, c = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, c)
        a = self.generator(self.act(self.context(flat))).view(-1, self.rank, c) / math.sqrt(c)  # (B, r, C)
        h = torch.bmm(a, flat.unsqueeze(-1)).squeeze(-1)  # (B, r)
        out: Tensor = x + self.out(h).reshape(*lead, c)
        return out


class PolynomialUnit(nn.Module):
    """Multiplicative interactions: the product of `degree` projections of the normed input, projected back."""

    def __init__(self, channels: int, degree: int, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.factors = nn.ModuleList(nn.Linear(channels, hidden) for _ in range(degree))
        self.out = nn.Linear(hidden, channels)
        scale_init_(self.out, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        prod = self.factors[0](h)
        for factor in self.factors[1:]:
            prod = prod * factor(h)
        out: Tensor = x + self.out(prod)
        return out


class RationalUnit(nn.Module):
    """Per-channel learnable rational activation P(x) / (1 + |Q(x)|) (a Padé activation unit), added to x."""

    def __init__(self, channels: int, numerator: int, denominator: int, init_scale: float) -> None:
        super().__init__()
        self.numer = nn.Parameter(torch.randn(channels, numerator + 1) * init_scale)  # a_0 .. a_m
        self.denom = nn.Parameter(torch.randn(channels, denominator) * init_scale)  # b_1 .. b_n

    def forward(self, x: Tensor) -> Tensor:
        m, n = self.numer.shape[1] - 1, self.denom.shape[1]
        powers = torch.stack([x**j for j in range(max(m, n) + 1)], dim=-1)  # (..., C, max+1)
        p = (powers[..., : m + 1] * self.numer).sum(-1)
        q = (powers[..., 1 : n + 1] * self.denom).sum(-1)
        return x + p / (1 + q.abs())


class LinearKernelAttention(nn.Module):
    """Linear-time attention across pixels with the elu+1 feature map (Katharopoulos et al., 2020)."""

    def __init__(self, channels: int, heads: int, head_dim: int, init_scale: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * heads * head_dim)
        self.feature = nn.ELU()
        self.proj = nn.Linear(heads * head_dim, channels)
        scale_init_(self.proj, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))  # (N, HW, C)
        q, k, v = (z.view(n, h * w, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, HW, hd)
                   for z in self.qkv(t).split(self.heads * self.head_dim, dim=-1))
        q, k = self.feature(q) + 1, self.feature(k) + 1
        kv = k.transpose(-2, -1) @ v  # (N, heads, hd, hd)
        norm = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (N, heads, HW, 1)
        y = ((q @ kv) / norm).transpose(1, 2).reshape(n, h * w, -1)
        out: Tensor = x + self.proj(y).transpose(1, 2).reshape(n, c, h, w)
        return out


def _linear_attention(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    return LinearKernelAttention(slot.channels, int(p["heads"]), int(p["head_dim"]), p["init_scale"])


CONV_ONLY: frozenset[SlotKind] = frozenset({"conv"})

TEMPLATES: tuple[BlueprintTemplate, ...] = (
    BlueprintTemplate(
        "BP036", "fourier_features", EXPERIMENTAL,
        "Random Fourier features of the channels (fixed Gaussian basis) projected back onto a residual path.",
        0.35, channelwise(lambda c, p: FourierFeatures(c, int(p["features"]), p["sigma"], p["init_scale"])),
        params={"features": ParamSpec(4, 64, 16, integer=True), "sigma": ParamSpec(0.1, 10.0, 1.0),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP037", "hyper_adapter", EXPERIMENTAL,
        "Hypernetwork that generates an input-dependent low-rank projection for every sample.",
        0.45, channelwise(lambda c, p: HyperAdapter(c, int(p["context_dim"]), int(p["rank"]), p["init_scale"])),
        params={"context_dim": ParamSpec(2, 16, 4, integer=True), "rank": ParamSpec(1, 8, 2, integer=True),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP038", "polynomial_unit", EXPERIMENTAL,
        "Product of several linear projections of the normalised input, a learned polynomial of given degree.",
        0.4, channelwise(lambda c, p: PolynomialUnit(
            c, int(p["degree"]), width(c, p["hidden_ratio"]), p["init_scale"])),
        params={"degree": ParamSpec(2, 4, 2, integer=True), "hidden_ratio": ParamSpec(0.25, 2.0, 1.0),
                "init_scale": ParamSpec(0.0, 1.0, 0.05)}),
    BlueprintTemplate(
        "BP039", "linear_kernel_attention", EXPERIMENTAL,
        "Linear-complexity kernelised attention across pixels using an elu+1 feature map.",
        0.3, _linear_attention, CONV_ONLY,
        params={"heads": ParamSpec(1, 4, 2, integer=True), "head_dim": ParamSpec(4, 32, 8, integer=True),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP040", "rational_activation", EXPERIMENTAL,
        "Per-channel learnable rational function (Pade activation unit) added to the input.",
        0.4, channelwise(lambda c, p: RationalUnit(c, int(p["numerator"]), int(p["denominator"]), p["init_scale"])),
        params={"numerator": ParamSpec(1, 5, 3, integer=True), "denominator": ParamSpec(1, 4, 2, integer=True),
                "init_scale": ParamSpec(0.0, 0.5, 0.05)}),
)
