"""SAFE channel-wise designs (BP001-BP006, BP010-BP014, BP018, BP019): each acts on the channel dimension.

They fit vector slots (N, C) directly and conv slots per pixel (see `layers.PerPosition`); SE and FiLM
pool a conv slot over HxW for their conditioning instead. Most are residual, `x + branch(x)`, with
the branch's last layer scaled by `init_scale` so a fresh seed starts near identity; SE is
multiplicative by design.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.karn.layers import channelwise, common_groups, scale_init_, width
from esper.karn.template import BlueprintTemplate, ParamSpec, SlotShape
from esper.leyline import pb

SAFE = pb.BLUEPRINT_TIER_SAFE

INIT_SCALE = ParamSpec(0.0, 1.0, 0.1)
DROPOUT = ParamSpec(0.0, 0.5, 0.0)


class IdentityPassthrough(nn.Module):
    """x + W·x with W zero-initialised: exactly identity at build, yet W gets gradients from step one."""

    def __init__(self, channels: int, init_scale: float) -> None:
        super().__init__()
        self.delta = nn.Linear(channels, channels)
        nn.init.normal_(self.delta.weight, 0.0, init_scale)  # std 0 gives exact zeros
        nn.init.zeros_(self.delta.bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.delta(x)
        return out


class ResidualMLP(nn.Module):
    """Transformer-style expansion FFN on a skip path: x + fc2(drop(gelu(fc1(x))))."""

    def __init__(self, channels: int, hidden: int, dropout: float, init_scale: float, norm: bool = False) -> None:
        super().__init__()
        self.norm: nn.Module = nn.LayerNorm(channels) if norm else nn.Identity()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, channels)
        scale_init_(self.fc2, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))
        return out


class BottleneckAdapter(nn.Module):
    """Houlsby adapter: squeeze channels by `reduction`, ReLU, expand back; cheap and near-identity."""

    def __init__(self, channels: int, hidden: int, dropout: float, init_scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, channels)
        scale_init_(self.up, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.up(self.drop(self.act(self.down(x))))
        return out


class GatedLinearUnit(nn.Module):
    """GLU branch: value(x) * sigmoid(gate(x)), projected back; the gate learns which features pass."""

    def __init__(self, channels: int, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.value = nn.Linear(channels, hidden)
        self.gate = nn.Linear(channels, hidden)
        self.act = nn.Sigmoid()
        self.out = nn.Linear(hidden, channels)
        scale_init_(self.out, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.out(self.value(x) * self.act(self.gate(x)))
        return out


class LoRAAdapter(nn.Module):
    """Low-rank update x + (alpha/rank)·B·A·x, B zero-initialised as in LoRA (identity at build)."""

    def __init__(self, channels: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.lora_a = nn.Linear(channels, rank, bias=False)
        self.lora_b = nn.Linear(rank, channels, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.scaling * self.lora_b(self.lora_a(self.drop(x)))
        return out


class SqueezeExcitation(nn.Module):
    """Channel attention: gate each channel by an MLP of the (pixel-pooled, for conv) channel summary."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        summary = x if x.dim() == 2 else x.mean(dim=(2, 3))  # (N, C)
        g = self.gate(self.fc2(self.act(self.fc1(summary))))
        out: Tensor = x * (g if x.dim() == 2 else g[:, :, None, None])
        return out


class ChannelTokenAttention(nn.Module):
    """Self-attention with each channel as a token: channels exchange information content-dependently."""

    def __init__(self, channels: int, heads: int, head_dim: int, init_scale: float) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.embed = nn.Linear(1, dim)  # scalar channel value → token
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.readout = nn.Linear(dim, 1)  # token → scalar channel delta
        scale_init_(self.readout, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        lead, c = x.shape[:-1], x.shape[-1]
        t = self.norm(self.embed(x.reshape(-1, c, 1)))  # (B, C, dim)
        q, k, v = self.qkv(t).split(self.heads * self.head_dim, dim=-1)
        q, k, v = (z.view(-1, c, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, h, C, hd)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, c, self.heads * self.head_dim)
        out: Tensor = x + self.readout(y).reshape(*lead, c)
        return out


class Highway(nn.Module):
    """Highway layer: t·relu(H x) + (1 - t)·x, the gate biased towards carrying x through at build."""

    def __init__(self, channels: int, carry_bias: float) -> None:
        super().__init__()
        self.transform = nn.Linear(channels, channels)
        self.act = nn.ReLU()
        self.gate = nn.Linear(channels, channels)
        self.gate_act = nn.Sigmoid()
        with torch.no_grad():
            self.gate.bias.fill_(carry_bias)

    def forward(self, x: Tensor) -> Tensor:
        t = self.gate_act(self.gate(x))
        out: Tensor = t * self.act(self.transform(x)) + (1 - t) * x
        return out


class MixtureOfExperts(nn.Module):
    """Soft mixture of small FFN experts weighted by a softmax router (dense, so always differentiable)."""

    def __init__(self, channels: int, experts: int, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.router = nn.Linear(channels, experts)
        self.route = nn.Softmax(dim=-1)
        self.experts = nn.ModuleList()
        for _ in range(experts):
            last = nn.Linear(hidden, channels)
            scale_init_(last, init_scale)
            self.experts.append(nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), last))

    def forward(self, x: Tensor) -> Tensor:
        weights = self.route(self.router(x))  # (..., E)
        outs = torch.stack([expert(x) for expert in self.experts], dim=-1)  # (..., C, E)
        out: Tensor = x + (outs * weights.unsqueeze(-2)).sum(dim=-1)
        return out


class FiLM(nn.Module):
    """Feature-wise scale and shift, x·(1 + gamma) + beta, with gamma, beta predicted from the (pooled) input itself."""

    def __init__(self, channels: int, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, 2 * channels)
        scale_init_(self.fc2, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        summary = x if x.dim() == 2 else x.mean(dim=(2, 3))
        gamma, beta = self.fc2(self.act(self.fc1(summary))).chunk(2, dim=-1)  # (N, C) each
        if x.dim() == 4:
            gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
        out: Tensor = x * (1 + gamma) + beta
        return out


class SwiGLU(nn.Module):
    """RMS-normed SwiGLU FFN (LLaMA-style): w3(silu(w1 x) * w2 x) on a skip path."""

    def __init__(self, channels: int, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(channels)
        self.w1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.SiLU()
        self.w2 = nn.Linear(channels, hidden, bias=False)
        self.w3 = nn.Linear(hidden, channels, bias=False)
        scale_init_(self.w3, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        out: Tensor = x + self.w3(self.act(self.w1(h)) * self.w2(h))
        return out


class GroupedShuffle(nn.Module):
    """ShuffleNet-style mixer: grouped 1x1, channel shuffle, grouped 1x1 — dense mixing at 1/G the cost."""

    def __init__(self, channels: int, groups: int, init_scale: float) -> None:
        super().__init__()
        self.groups = groups
        self.mix1 = nn.Conv1d(channels, channels, 1, groups=groups)
        self.act = nn.ReLU()
        self.mix2 = nn.Conv1d(channels, channels, 1, groups=groups)
        scale_init_(self.mix2, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        lead, c = x.shape[:-1], x.shape[-1]
        h = self.act(self.mix1(x.reshape(-1, c, 1)))  # (B, C, 1)
        h = h.view(-1, self.groups, c // self.groups, 1).transpose(1, 2).reshape(-1, c, 1)  # shuffle
        out: Tensor = x + self.mix2(h).reshape(*lead, c)
        return out


def _se(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    return SqueezeExcitation(slot.channels, max(1, slot.channels // int(p["reduction"])))


def _film(slot: SlotShape, p: Mapping[str, float]) -> nn.Module:
    return FiLM(slot.channels, width(slot.channels, p["hidden_ratio"]), p["init_scale"])


TEMPLATES: tuple[BlueprintTemplate, ...] = (
    BlueprintTemplate(
        "BP001", "identity_passthrough", SAFE,
        "Zero-initialised linear residual that starts as the exact identity and learns a per-channel delta.",
        0.05, channelwise(lambda c, p: IdentityPassthrough(c, p["init_scale"])),
        params={"init_scale": ParamSpec(0.0, 0.01, 0.0)}),
    BlueprintTemplate(
        "BP002", "residual_mlp", SAFE,
        "Expansion feed-forward block (Linear-GELU-Linear) on a residual path.",
        0.1, channelwise(lambda c, p: ResidualMLP(c, width(c, p["hidden_ratio"]), p["dropout"], p["init_scale"])),
        params={"hidden_ratio": ParamSpec(0.5, 4.0, 2.0), "dropout": DROPOUT, "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP003", "bottleneck_adapter", SAFE,
        "Houlsby-style adapter that squeezes channels by a reduction factor and expands them back.",
        0.08, channelwise(lambda c, p: BottleneckAdapter(
            c, max(1, c // int(p["reduction"])), p["dropout"], p["init_scale"])),
        params={"reduction": ParamSpec(2, 16, 4, integer=True), "dropout": DROPOUT, "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP004", "gated_linear_unit", SAFE,
        "Gated linear unit branch whose sigmoid gate selects which projected features reach the output.",
        0.1, channelwise(lambda c, p: GatedLinearUnit(c, width(c, p["hidden_ratio"]), p["init_scale"])),
        params={"hidden_ratio": ParamSpec(0.5, 4.0, 1.0), "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP005", "lora_adapter", SAFE,
        "LoRA-style low-rank update with a zero-initialised up-projection and alpha/rank scaling.",
        0.06, channelwise(lambda c, p: LoRAAdapter(c, int(p["rank"]), p["alpha"], p["dropout"])),
        params={"rank": ParamSpec(1, 32, 4, integer=True), "alpha": ParamSpec(1.0, 64.0, 8.0), "dropout": DROPOUT}),
    BlueprintTemplate(
        "BP006", "squeeze_excitation", SAFE,
        "Squeeze-and-excitation channel gating driven by a bottleneck MLP of the pooled channel summary.",
        0.12, _se, params={"reduction": ParamSpec(2, 16, 4, integer=True)}, blend_methods=("CONVEX",)),
    BlueprintTemplate(
        "BP010", "channel_token_attention", SAFE,
        "Multi-head self-attention that treats each channel as a token embedded from its scalar value.",
        0.15, channelwise(lambda c, p: ChannelTokenAttention(c, int(p["heads"]), int(p["head_dim"]), p["init_scale"])),
        params={"heads": ParamSpec(1, 4, 2, integer=True), "head_dim": ParamSpec(2, 16, 4, integer=True),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP011", "prenorm_ffn", SAFE,
        "Pre-norm transformer feed-forward block: LayerNorm, Linear-GELU-Linear, residual.",
        0.1, channelwise(lambda c, p: ResidualMLP(
            c, width(c, p["hidden_ratio"]), p["dropout"], p["init_scale"], norm=True)),
        params={"hidden_ratio": ParamSpec(0.5, 4.0, 4.0), "dropout": DROPOUT, "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP012", "highway_residual", SAFE,
        "Highway layer whose learned sigmoid gate interpolates between a ReLU transform and the input.",
        0.12, channelwise(lambda c, p: Highway(c, p["carry_bias"])),
        params={"carry_bias": ParamSpec(-6.0, 0.0, -2.0)}),
    BlueprintTemplate(
        "BP013", "mixture_of_experts", SAFE,
        "Dense soft mixture of small feed-forward experts weighted by a softmax router.",
        0.18, channelwise(lambda c, p: MixtureOfExperts(
            c, int(p["experts"]), width(c, p["hidden_ratio"]), p["init_scale"])),
        params={"experts": ParamSpec(2, 4, 2, integer=True), "hidden_ratio": ParamSpec(0.25, 2.0, 1.0),
                "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP014", "film_scale_shift", SAFE,
        "FiLM modulation that scales and shifts every channel by amounts predicted from the pooled input.",
        0.12, _film, params={"hidden_ratio": ParamSpec(0.25, 2.0, 0.5), "init_scale": INIT_SCALE},
        blend_methods=("CONVEX",)),
    BlueprintTemplate(
        "BP018", "swiglu_ffn", SAFE,
        "RMS-normalised SwiGLU feed-forward block on a residual path.",
        0.1, channelwise(lambda c, p: SwiGLU(c, width(c, p["hidden_ratio"]), p["init_scale"])),
        params={"hidden_ratio": ParamSpec(0.5, 4.0, 8 / 3), "init_scale": INIT_SCALE}),
    BlueprintTemplate(
        "BP019", "grouped_shuffle_mixer", SAFE,
        "Two grouped 1x1 channel mixers separated by a channel shuffle, on a residual path.",
        0.08, channelwise(lambda c, p: GroupedShuffle(c, common_groups(c, int(p["groups"])), p["init_scale"])),
        params={"groups": ParamSpec(1, 16, 4, integer=True), "init_scale": INIT_SCALE}),
)
