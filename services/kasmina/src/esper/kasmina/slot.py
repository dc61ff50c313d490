"""``SeedSlot``: the place in a host network where a seed can be grafted.

A host puts a slot after one of its layers (``h = layer(x); h = slot(h)``). The slot is the identity
until Kasmina attaches a seed, then its forward depends on the seed's mode:

- ``host`` (DORMANT, GERMINATED before its kernel arrives, CULLED, EMBARGOED, RESETTING, TERMINATED):
  ``h``; only the host exists.
- ``train`` (GERMINATED with its kernel, TRAINING): the output is ``h`` unchanged; the seed runs on
  ``h.detach()`` and learns a *local* objective, ``mse(seed(h), h)`` (the trainer adds it to its loss:
  ``Kasmina.auxiliary_loss()``). Host gradients are identical to those of a host without the seed.
- ``blend`` (BLENDING, SHADOWING, PROBATIONARY): ``blend(h, seed(h.detach()), alpha)``. The host keeps
  its own branch's gradient, the seed learns from the task loss, nothing flows from the seed into the
  host.
- ``fossil`` (FOSSILIZED): ``blend(h, seed(h), alpha_final)``: the seed is part of the host now, and
  gradients flow through it.

Why the seed's *input* is detached and not the host branch (the prototype detached ``host``): with
the host branch detached, every host layer upstream of the slot would stop learning through this
slot for the whole blend. Detaching the seed input keeps the host learning on its own branch and
still guarantees that no gradient reaches a host weight through the seed, which is what isolation
means, and what the host·seed dot product measures (``isolation.py``). ``leak_gradients`` turns the
detach off: a deliberate isolation leak, for tests and drills only.

Evaluation: in ``train`` mode an ``eval()`` forward does not run the seed at all (the output is the
host's); ``bypass`` (``Kasmina.ablated``) makes any mode return ``h``, to measure the model without
the seed (evidence for fossilisation).
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.karn.template import SlotShape
from esper.kasmina.blending import BlendSpec, apply_blend
from esper.kasmina.gates import InterfaceProbe
from esper.kasmina.isolation import GradProbe, IsolationMonitor, IsolationStats

__all__ = ["SeedSlot", "SlotMode", "SlotStepStats", "probe_kernel", "seed_id_for"]

SlotMode = Literal["host", "train", "blend", "fossil"]

_LAYER_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_LATENCY_WINDOW = 256


def seed_id_for(layer: str) -> str:
    """The seed id of the slot after host layer ``layer``: ``seed-<layer>``."""
    return f"seed-{layer}"


@dataclass(frozen=True, slots=True)
class SlotStepStats:
    """What one slot observed since the last ``collect()``."""

    trained: bool  # a training-mode forward with gradients enabled ran the seed
    grads_observed: bool
    grad_norm: float
    isolation: IsolationStats
    local_losses: tuple[float, ...]
    latencies_ms: tuple[float, ...]


class SeedSlot(nn.Module):
    """Identity until a seed is attached; see the module docstring for each mode's forward."""

    seed: nn.Module | None

    def __init__(self, layer: str, shape: SlotShape) -> None:
        super().__init__()
        if not _LAYER_NAME.fullmatch(layer):
            raise ValueError(f"bad layer name {layer!r}: 1-128 of [A-Za-z0-9_.:-]")
        self.layer = layer
        self.shape = shape
        self.register_module("seed", None)
        self.mode: SlotMode = "host"
        self.alpha = 0.0
        self.spec = BlendSpec()
        self.leak_gradients = False  # deliberate isolation leak: tests and drills only
        self.bypass = False
        self._monitor = IsolationMonitor()
        self._grads: GradProbe | None = None
        self._aux: Tensor | None = None
        self._local: deque[Tensor] = deque(maxlen=_LATENCY_WINDOW)
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._trained = False
        self._alpha_vec: Tensor | None = None
        self._last_io: tuple[Tensor, Tensor] | None = None  # the last forward's (input, seed output)
        self._dtype = torch.float32
        self._device = torch.device("cpu")

    @property
    def seed_id(self) -> str:
        return seed_id_for(self.layer)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype, as last seen (float32 before the first forward)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The activations' device, as last seen (CPU before the first forward)."""
        return self._device

    @property
    def hooks(self) -> int:
        return self._grads.hooks if self._grads is not None else 0

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, shape={self.shape.as_key()}, mode={self.mode}"

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        state = self.__dict__  # plain dict writes: nn.Module.__setattr__ costs microseconds per call
        state["_dtype"] = x.dtype
        state["_device"] = x.device
        seed = self._modules["seed"]  # not self.seed: nn.Module.__getattr__ is slow on the hot path
        if seed is None or self.bypass or self.mode == "host":
            return x
        if self.mode == "fossil":
            return apply_blend(x, seed(x), self.alpha, self.spec, alpha_vec=self._vec(x))
        grad_on = self.training and torch.is_grad_enabled()
        if self.mode == "train" and not grad_on:
            return x
        host, seed_in = self._monitor.tap(x, leak=self.leak_gradients) if grad_on else (x, x.detach())
        t0 = time.perf_counter()
        out = seed(seed_in)
        self._latencies.append((time.perf_counter() - t0) * 1000.0)
        state["_last_io"] = (x, out)  # references only: judged if the trainer refuses the step
        self._trained = self._trained or grad_on
        if self.mode == "train":
            # Learn what makes the blend start where the host is: y = a·s + (1-a)·h wants s ≈ h;
            # RESIDUAL's y = h + a·s wants s ≈ 0 (a seed that reproduced h would double it).
            target = torch.zeros_like(out) if self.spec.mode == "RESIDUAL" else x.detach()
            local = F.mse_loss(out, target)
            self._aux = local if self._aux is None else self._aux + local
            self._local.append(local.detach())
            return host
        return apply_blend(host, out, self.alpha, self.spec, alpha_vec=self._vec(x))

    @property
    def output_nonfinite(self) -> bool:
        """Did the last forward turn finite input into a non-finite seed output? Read only when the
        trainer refuses a step (Kasmina.discard_step): such a seed makes every step it weighs in
        non-finite, the trainer refuses them all, and this is then the only evidence against it. Kept
        out of the forward, where even two reductions cost ~20 us a step on a small host."""
        if self._last_io is None:
            return False
        x, out = self._last_io
        return bool(torch.isfinite(x).all()) and not bool(torch.isfinite(out).all())

    def _vec(self, ref: Tensor) -> Tensor | None:
        if self.spec.alpha_vec is None:
            return None
        vec = self._alpha_vec
        if vec is None or vec.device != ref.device or vec.dtype != ref.dtype:
            vec = self._alpha_vec = torch.tensor(self.spec.alpha_vec, dtype=ref.dtype, device=ref.device)
        return vec

    # -- Kasmina's side ----------------------------------------------------------------------------

    def attach(self, module: nn.Module, spec: BlendSpec) -> None:
        """Graft ``module`` in ``train`` mode (isolated, local objective)."""
        if self.seed is not None:
            raise RuntimeError(f"{self.seed_id} already holds a seed")
        module.train(self.training)
        self.seed = module
        self.spec = spec
        self._alpha_vec = None
        self._last_io = None
        self.alpha = 0.0
        self.mode = "train"
        self._grads = GradProbe(list(module.parameters()))
        self._reset_step()

    def start_blending(self, alpha: float) -> None:
        self.mode = "blend"
        self.alpha = alpha

    def fossilize(self, alpha: float) -> None:
        """Merge for good: alpha fixed, the seed sees the live activations, monitoring hooks removed."""
        self.mode = "fossil"
        self.alpha = alpha
        self._last_io = None
        self._remove_probe()
        self._reset_step()

    def detach_seed(self) -> nn.Module | None:
        """Remove the seed (cull/reset) and every hook and per-step record it left; returns it."""
        module = self.seed
        self.seed = None
        self.mode = "host"
        self.alpha = 0.0
        self.spec = BlendSpec()
        self._alpha_vec = None
        self._last_io = None
        self._remove_probe()
        self._reset_step()
        return module

    def pop_auxiliary_loss(self) -> Tensor | None:
        """The local (train-mode) loss accumulated since the last call, and forget it."""
        aux, self._aux = self._aux, None
        return aux

    def discard_step(self) -> None:
        """Forget this step's observations without reading them (a step the trainer refused), except
        what ``output_nonfinite`` reads."""
        if self._grads is not None:
            self._grads.discard()
        self._reset_step()

    def collect(self) -> SlotStepStats:
        """This step's observations (one device sync per reduction), then start a new step."""
        observed, norm = self._grads.collect() if self._grads is not None else (False, 0.0)
        isolation = self._monitor.collect()
        local = tuple(float(v) for v in torch.stack(list(self._local)).tolist()) if self._local else ()
        stats = SlotStepStats(trained=self._trained, grads_observed=observed, grad_norm=norm, isolation=isolation,
                              local_losses=local, latencies_ms=tuple(self._latencies))
        self._last_io = None
        self._reset_step()
        return stats

    def _reset_step(self) -> None:
        self._aux = None
        self._local.clear()
        self._latencies.clear()
        self._trained = False
        self._monitor.reset()

    def _remove_probe(self) -> None:
        if self._grads is not None:
            self._grads.remove()
            self._grads = None


def probe_kernel(module: nn.Module, shape: SlotShape, *, dtype: torch.dtype, device: torch.device,
                 batch: int = 2) -> InterfaceProbe:
    """Run ``module`` once on a unit-normal example of the slot (eval mode, no grad, private RNG) and
    report what G3 needs. The trainer's RNG stream and the module's training flag are left as found.

    Half-precision activations with float32 kernel weights mean the host runs under autocast: the
    probe then feeds the kernel its own dtype (what autocast gives it). A forward that raises is a
    failed probe (G3 ``probe_failed``), never an exception out of the trainer's step.
    """
    weights = next((p.dtype for p in module.parameters() if p.is_floating_point()), dtype)
    if dtype in (torch.float16, torch.bfloat16) and weights == torch.float32:
        dtype = weights
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = shape.example_input(batch, generator=gen).to(device=device, dtype=dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as e:  # the kernel's code failing on the slot's input is the finding itself
        return InterfaceProbe(tuple(x.shape), str(dtype), (), "", False, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor):
        return InterfaceProbe(tuple(x.shape), str(dtype), (), "", False, error=f"returned {type(out).__name__}")
    return InterfaceProbe(tuple(x.shape), str(dtype), tuple(out.shape), str(out.dtype),
                          bool(torch.isfinite(out).all()))
