"""HIGH_RISK hazards (BP043-BP050): quarantine-only negative controls for Urabrask's probes.

Each one misbehaves *measurably* in exactly one way (gradients, NaNs, latency, memory, determinism),
so the crucible can prove it flags every failure class by measurement, never by name. Each stays
bounded, so probing one never hangs or exhausts the test machine: loops and waits have a time cap,
leaks a byte cap. They are channel-wise (vector slots, and conv slots per pixel) and meant to be
probed eagerly; they are never blended (`blend_methods` is empty) and always need approval.
"""

from __future__ import annotations

import math
import threading
import time

import torch
from torch import Tensor, nn

from esper.karn.layers import channelwise, orthogonal_
from esper.karn.template import BlueprintTemplate, Factory, ParamSpec
from esper.leyline import pb

HIGH_RISK = pb.BLUEPRINT_TIER_HIGH_RISK


class ExplodingGradient(nn.Module):
    """`depth` bias-free orthogonal linears scaled by `gain`: every Jacobian singular value is gain**depth.

    At the defaults (4, 6) input gradients are 4096x a unit-gain stack's, while outputs of unit-normal
    inputs stay finite (|y| ≈ 4096·|x|) in float32.
    """

    def __init__(self, channels: int, gain: float, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            layer = nn.Linear(channels, channels, bias=False)
            orthogonal_(layer.weight, gain)
            self.layers.append(layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VanishingGradient(nn.Module):
    """Sigmoids pushed deep into saturation by a fixed `bias_shift`, behind tiny-gain linears.

    Each layer's local derivative is gain·sigmoid'(shift) ≈ 0.01·2e-6 at the defaults, so input and parameter
    gradients are < 1e-6 of a plain linear layer's, yet nonzero in float32 (sigmoid(13) rounds below 1).
    The output is a near-constant ≈ 1 in every element.
    """

    def __init__(self, channels: int, gain: float, depth: int, bias_shift: float) -> None:
        super().__init__()
        self.gain, self.bias_shift = gain, bias_shift
        self.stack = nn.ModuleList()  # linear, sigmoid, linear, sigmoid, ... (registration order = data flow)
        for _ in range(depth):
            layer = nn.Linear(channels, channels, bias=False)
            orthogonal_(layer.weight, 1.0)
            self.stack.extend([layer, nn.Sigmoid()])

    def forward(self, x: Tensor) -> Tensor:
        # The gain multiplies at run time (not baked into W), so it scales dL/dW as well as dL/dx.
        for layer, act in zip(self.stack[::2], self.stack[1::2], strict=True):
            x = act(self.gain * layer(x) + self.bias_shift)
        return x


class NaNInjection(nn.Module):
    """A linear layer whose output is NaN wherever the input exceeds `threshold`, and at each sample's max.

    The per-sample max guarantees at least one NaN per sample on every call, whatever the inputs.
    """

    def __init__(self, channels: int, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        sample_max = x.flatten(1).amax(dim=1).view(-1, *([1] * (x.dim() - 1)))
        poisoned = (x > self.threshold) | (x >= sample_max)
        out: Tensor = self.proj(x).masked_fill(poisoned, math.nan)
        return out


class InfiniteLoop(nn.Module):
    """A linear layer plus a busy loop of `iterations` matmul+tanh steps, cut off after `max_ms` per call.

    The default 1024 iterations cost ~1000x the linear itself on a small CPU; the output is the linear's.
    (256 put the loop's share of a call at ~50 % on a loaded CI machine: right at Urabrask's stall limit.)
    """

    def __init__(self, channels: int, iterations: int, max_ms: float) -> None:
        super().__init__()
        self.iterations, self.max_s = iterations, max_ms / 1000
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        self._spin(x)
        out: Tensor = self.proj(x)
        return out

    @torch.no_grad()
    def _spin(self, x: Tensor) -> None:
        deadline = time.perf_counter() + self.max_s
        h, w = x.reshape(-1, x.shape[-1]), self.proj.weight
        for _ in range(self.iterations):
            h = torch.tanh(h @ w.T)
            if time.perf_counter() > deadline:
                break


class MemoryLeak(nn.Module):
    """Every forward keeps a `leak_kib` copy of its output in `self.retained`, until `cap_mib` is held.

    Bytes reachable from the module grow linearly with calls (see `retained_bytes`); the cap bounds it.
    """

    def __init__(self, channels: int, leak_kib: int, cap_mib: int) -> None:
        super().__init__()
        self.leak_bytes, self.cap_bytes = leak_kib * 1024, cap_mib * 1024 * 1024
        self.proj = nn.Linear(channels, channels)
        self.retained: list[Tensor] = []

    @property
    def retained_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.retained)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x)
        n = max(1, self.leak_bytes // y.element_size())
        if self.retained_bytes + n * y.element_size() <= self.cap_bytes:
            flat = y.detach().reshape(-1)
            self.retained.append(flat.repeat(-(-n // flat.numel()))[:n].clone())  # touched, not lazily mapped
        return y


class DeadlockPattern(nn.Module):
    """Each forward re-acquires a non-reentrant lock it already holds; the `wait_ms` timeout breaks the deadlock.

    The lock is created per call so the module stays deep-copyable; the latency spike is the symptom.
    """

    def __init__(self, channels: int, wait_ms: float) -> None:
        super().__init__()
        self.wait_s = wait_ms / 1000
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        lock = threading.Lock()
        with lock:
            if lock.acquire(timeout=self.wait_s):  # never succeeds: the lock is ours already
                lock.release()
        out: Tensor = self.proj(x)
        return out


class RaceCondition(nn.Module):
    """Output mixes in an unsynchronised accumulator that every call bumps, so equal inputs give unequal outputs.

    The state is a non-persistent buffer: a rebuilt module starts at zero, and each call adds ≥ 1 per channel.
    """

    shared: Tensor

    def __init__(self, channels: int, mix: float) -> None:
        super().__init__()
        self.mix = mix
        self.proj = nn.Linear(channels, channels)
        self.register_buffer("shared", torch.zeros(channels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x) + self.mix * self.shared.clone()
        with torch.no_grad():
            self.shared.add_(x.detach().abs().reshape(-1, x.shape[-1]).mean(dim=0) + 1.0)
        return y


class AdversarialNoise(nn.Module):
    """A linear layer plus fresh Gaussian noise of std `noise_scale` (default 10x unit activations) every call."""

    def __init__(self, channels: int, noise_scale: float) -> None:
        super().__init__()
        self.noise_scale = noise_scale
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.proj(x)
        out: Tensor = y + self.noise_scale * torch.randn_like(y)
        return out


def _hazard(blueprint_id: str, name: str, description: str, risk: float, factory: Factory,
            params: dict[str, ParamSpec]) -> BlueprintTemplate:
    return BlueprintTemplate(blueprint_id, name, HIGH_RISK, description, risk, factory, params=params,
                             blend_methods=(), approval_required=True)


TEMPLATES: tuple[BlueprintTemplate, ...] = (
    _hazard("BP043", "exploding_gradient",
            "Deep bias-free linear stack with amplified orthogonal weights whose gradients explode.",
            0.9, channelwise(lambda c, p: ExplodingGradient(c, p["gain"], int(p["depth"]))),
            {"gain": ParamSpec(1.0, 16.0, 4.0), "depth": ParamSpec(1, 8, 6, integer=True)}),
    _hazard("BP044", "vanishing_gradient",
            "Stack of saturated sigmoids behind tiny-gain linears whose gradients vanish.",
            0.85, channelwise(lambda c, p: VanishingGradient(c, p["gain"], int(p["depth"]), p["bias_shift"])),
            {"gain": ParamSpec(0.001, 1.0, 0.01), "depth": ParamSpec(1, 4, 3, integer=True),
             "bias_shift": ParamSpec(6.0, 14.0, 13.0)}),
    _hazard("BP045", "nan_injection",
            "Linear layer that writes NaN into its output at large inputs and at every sample's maximum.",
            0.95, channelwise(lambda c, p: NaNInjection(c, p["threshold"])),
            {"threshold": ParamSpec(0.5, 6.0, 2.5)}),
    _hazard("BP046", "infinite_loop",
            "Linear layer preceded by a bounded busy loop of repeated matmuls that inflates latency.",
            0.85, channelwise(lambda c, p: InfiniteLoop(c, int(p["iterations"]), p["max_ms"])),
            {"iterations": ParamSpec(1, 4096, 1024, integer=True), "max_ms": ParamSpec(1.0, 50.0, 20.0)}),
    _hazard("BP047", "memory_leak",
            "Linear layer that retains a copy of every output, so held memory grows with each call.",
            0.9, channelwise(lambda c, p: MemoryLeak(c, int(p["leak_kib"]), int(p["cap_mib"]))),
            {"leak_kib": ParamSpec(1, 4096, 256, integer=True), "cap_mib": ParamSpec(1, 1024, 128, integer=True)}),
    _hazard("BP048", "deadlock_pattern",
            "Linear layer that blocks on a lock it already holds until a short timeout breaks the deadlock.",
            0.85, channelwise(lambda c, p: DeadlockPattern(c, p["wait_ms"])),
            {"wait_ms": ParamSpec(1.0, 50.0, 8.0)}),
    _hazard("BP049", "race_condition",
            "Linear layer mixing in unsynchronised mutable state bumped on every call, so outputs drift.",
            0.8, channelwise(lambda c, p: RaceCondition(c, p["mix"])),
            {"mix": ParamSpec(0.01, 1.0, 0.5)}),
    _hazard("BP050", "adversarial_noise",
            "Linear layer that adds fresh large-scale Gaussian noise to its output on every call.",
            0.9, channelwise(lambda c, p: AdversarialNoise(c, p["noise_scale"])),
            {"noise_scale": ParamSpec(1.0, 100.0, 10.0)}),
)
