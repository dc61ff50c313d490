"""Gradient isolation, measured: the host·seed gradient dot product at the slot input.

Every gradient that could reach a host weight *from the seed* must pass through the slot's input
activations ``h`` (the seed's only connection to the host upstream). So the slot taps ``h`` twice:
the branch the host path uses and the branch the seed consumes. After backward,

    dot = Σ ⟨∂L/∂h|host branch, ∂L/∂h|seed branch⟩

and isolation holds when ``|dot| ≤ 1e-6`` and the seed branch carries no gradient at all. The seed
normally consumes ``h.detach()``, so its branch carries nothing and the dot is exactly 0; the
deliberate-leak switch (tests only) feeds it ``h`` itself and the dot becomes the overlap of the two
gradients. Norms of both branches are kept too (``host_norm``, ``seed_norm`` — the latter is the
gradient the seed pushes toward the host). The dot alone is blind when the host branch carries no
gradient (a blend at alpha 1, as in SHADOWING and PROBATIONARY) and scales with the loss squared, so
G1 also fails on any ``seed_norm`` above zero.

Hooks store tensors; nothing syncs with the device until ``collect()`` (once per step, from
``Kasmina.advance``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["GradProbe", "IsolationMonitor", "IsolationStats"]

_MAX_PAIRS = 64  # forward passes remembered per step (gradient accumulation); older ones are dropped


@dataclass(frozen=True, slots=True)
class IsolationStats:
    dot: float = 0.0
    host_norm: float = 0.0
    seed_norm: float = 0.0
    samples: int = 0  # forward passes whose backward reached the slot

    def holds(self, threshold: float = 1e-6) -> bool:
        """The dot within `threshold` and no gradient at all on the seed branch (G1's rule)."""
        return abs(self.dot) <= threshold and self.seed_norm == 0.0


class _Pair:
    """The two gradients of one forward pass (the host one kept whole only when a seed one may come)."""

    __slots__ = ("expect_seed", "host", "seed")

    def __init__(self, expect_seed: bool) -> None:
        self.expect_seed = expect_seed
        self.host: Tensor | None = None
        self.seed: Tensor | None = None

    def on_host(self, grad: Tensor) -> None:
        g = grad.detach()
        self.host = g if self.expect_seed else g.float().pow(2).sum()

    def on_seed(self, grad: Tensor) -> None:
        self.seed = grad.detach()


class IsolationMonitor:
    """Taps the slot input on each training forward and reduces the gradients once per step."""

    __slots__ = ("_pairs",)

    def __init__(self) -> None:
        self._pairs: list[_Pair] = []

    def tap(self, x: Tensor, *, leak: bool = False) -> tuple[Tensor, Tensor]:
        """``(host_branch, seed_input)`` for activations ``x``. ``seed_input`` is ``x.detach()`` unless
        ``leak``. An input that needs no gradient has nothing upstream to leak into: not tapped."""
        if not x.requires_grad:
            return x, x.detach()
        pair = _Pair(expect_seed=leak)
        host = x.view_as(x)
        host.register_hook(pair.on_host)  # type: ignore[no-untyped-call]
        if leak:
            seed_in = x.view_as(x)
            seed_in.register_hook(pair.on_seed)  # type: ignore[no-untyped-call]
        else:
            seed_in = x.detach()
        if len(self._pairs) >= _MAX_PAIRS:
            self._pairs.pop(0)
        self._pairs.append(pair)
        return host, seed_in

    def reset(self) -> None:
        self._pairs.clear()

    def collect(self) -> IsolationStats:
        """Reduce this step's gradients (one device sync) and start a new step."""
        pairs, self._pairs = self._pairs, []
        host_sq: list[Tensor] = []
        seed_sq: list[Tensor] = []
        dots: list[Tensor] = []
        for p in pairs:
            if p.host is None and p.seed is None:
                continue  # no backward reached this forward (evaluation, or the loss ignored it)
            if p.host is not None:
                host_sq.append(p.host.double().pow(2).sum() if p.expect_seed else p.host.double())
            if p.seed is not None:
                seed_sq.append(p.seed.double().pow(2).sum())
                if p.host is not None:
                    dots.append((p.host.double() * p.seed.double()).sum())
        samples = sum(1 for p in pairs if p.host is not None or p.seed is not None)
        if not samples:
            return IsolationStats()
        device = next(t.device for t in (*dots, *host_sq, *seed_sq))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = [torch.stack(v).sum() if v else zero for v in (dots, host_sq, seed_sq)]
        dot, hsq, ssq = (float(v) for v in torch.stack(sums).tolist())
        return IsolationStats(dot=dot, host_norm=hsq**0.5, seed_norm=ssq**0.5, samples=samples)


class GradProbe:
    """Records the squared norm of each seed parameter's accumulated gradient (post-accumulate hooks),
    so gradient health is known after backward whatever the trainer does with ``.grad`` afterwards."""

    __slots__ = ("_handles", "_sq")

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self._sq: dict[int, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._hook(i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(params) if p.requires_grad
        ]

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if param.grad is not None:
                self._sq[index] = param.grad.detach().float().pow(2).sum()

        return hook

    @property
    def hooks(self) -> int:
        return len(self._handles)

    def collect(self) -> tuple[bool, float]:
        """(any gradient arrived since the last collect, total gradient norm); resets."""
        sq, self._sq = self._sq, {}
        if not sq:
            return False, 0.0
        total = float(torch.stack(list(sq.values())).sum())
        return True, total**0.5

    def discard(self) -> None:
        """Drop what arrived since the last collect, unread."""
        self._sq = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._sq.clear()
