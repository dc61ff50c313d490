"""Optional ``torch.compile`` of the GNN for serving: CUDA only, warmed once, eager on any failure.

Why CUDA only: on CPU the relation-batched model already meets its budget eagerly, and inductor's
start-up compile costs tens of seconds (ARCHITECTURE §11 measured ~50 s for the PyG shape). On CUDA
the per-kernel launch overhead is what compile removes. Why a warm-up: the first compiled call pays
the compile, which must not land on a 5 ms decision. Why eager fallback: a compiler bug must cost
latency, never a decision; every fallback is counted (``compile_fallback_total``) and
``compile_enabled`` drops to 0 so telemetry shows it (P2: ``tamiyo.gnn.compile_*``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import torch
from torch import Tensor

from esper.tamiyo.gnn import PolicyOutputs, TamiyoGNN
from esper.tamiyo.schema import EDGE_ATTR_DIM, NODE_DIMS, NODE_TYPES, RELATIONS, EdgeType, NodeType

__all__ = ["ENV_ENABLE_COMPILE", "CompiledPolicy", "compile_requested", "warmup_inputs"]

log = logging.getLogger(__name__)

ENV_ENABLE_COMPILE: Final[str] = "TAMIYO_ENABLE_COMPILE"
_TRUE: Final[frozenset[str]] = frozenset({"1", "true", "yes", "on"})
# Warm-up graph: ≥ 2 rows per type and ≥ 2 edges per relation, because compile specialises sizes 0
# and 1; a warm-up on 1-row types would be recompiled by the first real graph.
_WARMUP_ROWS: Final[int] = 3
_WARMUP_EDGES: Final[int] = 2

GraphArgs = tuple[
    Mapping[NodeType, Tensor], Mapping[EdgeType, Tensor], Mapping[EdgeType, Tensor], Mapping[NodeType, int]
]
Compiler = Callable[[TamiyoGNN], Callable[..., PolicyOutputs]]


def compile_requested(environ: Mapping[str, str] | None = None) -> bool:
    """``TAMIYO_ENABLE_COMPILE`` is set to a true value (1/true/yes/on); unset means off."""
    env = os.environ if environ is None else environ
    return env.get(ENV_ENABLE_COMPILE, "").strip().lower() in _TRUE


def warmup_inputs(device: torch.device | str = "cpu") -> GraphArgs:
    """A small fixed graph of the right shape (deterministic; leaves the global RNG alone)."""
    gen = torch.Generator().manual_seed(0)
    x = {t: torch.randn(_WARMUP_ROWS, NODE_DIMS[t], generator=gen).to(device) for t in NODE_TYPES}
    edges = torch.tensor([[0, 1], [1, 2]][:_WARMUP_EDGES], dtype=torch.long).t().contiguous()
    edge_index = {r: edges.to(device) for r in RELATIONS}
    edge_attr = {r: torch.rand(_WARMUP_EDGES, EDGE_ATTR_DIM, generator=gen).to(device) for r in RELATIONS}
    return x, edge_index, edge_attr, dict.fromkeys(NODE_TYPES, _WARMUP_ROWS)


def _torch_compile(model: TamiyoGNN) -> Callable[..., PolicyOutputs]:
    # dynamic: node and edge counts change every packet; recompiling per shape would stall decisions.
    compiled: Callable[..., PolicyOutputs] = torch.compile(model, dynamic=True)
    return compiled


class CompiledPolicy:
    """Serving wrapper around a :class:`TamiyoGNN`: eval mode, ``inference_mode``, optional compile.

    Attributes for telemetry: ``compile_enabled`` (1 while the compiled path serves, else 0),
    ``compile_warm_ms`` (the one-time warm-up, 0.0 when none ran), ``compile_fallback_total``
    (compile or runtime failures that fell back to eager) and ``compile_reason`` (``"cpu"``,
    ``"disabled"``, ``"compiled"``, ``"compile_error:<Type>"``, ``"runtime_error:<Type>"``, ...).

    :param enabled: compile when on CUDA; ``None`` reads ``TAMIYO_ENABLE_COMPILE``.
    :param require_cuda: only tests and experiments turn this off (with a stand-in ``compiler``).
    """

    def __init__(
        self,
        model: TamiyoGNN,
        *,
        enabled: bool | None = None,
        warmup: bool = True,
        require_cuda: bool = True,
        compiler: Compiler | None = None,
    ) -> None:
        self.model = model.eval()
        self.compile_enabled = 0
        self.compile_warm_ms = 0.0
        self.compile_fallback_total = 0
        self._compiled: Callable[..., PolicyOutputs] | None = None
        device = next(model.parameters()).device
        self.device = device
        requested = compile_requested() if enabled is None else enabled
        if require_cuda and device.type != "cuda":
            self.compile_reason = "cpu" if device.type == "cpu" else f"device_{device.type}"
            return
        if not requested:
            self.compile_reason = "disabled"
            return
        try:
            self._compiled = (compiler or _torch_compile)(model)
        except Exception as exc:  # any compiler failure: serve eagerly, counted
            self._fall_back("compile_error", exc)
            return
        self.compile_enabled = 1
        self.compile_reason = "compiled"
        if warmup:
            self._warm_up()

    def __call__(
        self,
        x_dict: Mapping[NodeType, Tensor],
        edge_index_dict: Mapping[EdgeType, Tensor],
        edge_attr_dict: Mapping[EdgeType, Tensor],
        counts: Mapping[NodeType, int],
    ) -> PolicyOutputs:
        with torch.inference_mode():
            compiled = self._compiled
            if compiled is not None:
                try:
                    return compiled(x_dict, edge_index_dict, edge_attr_dict, counts)
                except Exception as exc:  # a runtime compiler failure costs latency, never the decision
                    self._fall_back("runtime_error", exc)
            return self.model(x_dict, edge_index_dict, edge_attr_dict, counts)  # type: ignore[no-any-return]

    def _warm_up(self) -> None:
        """Pay the compile now, timed (CUDA-synchronised), instead of on the first decision."""
        compiled = self._compiled
        assert compiled is not None
        args = warmup_inputs(self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else _no_sync
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                compiled(*args)
            sync()
        except Exception as exc:  # compile errors surface on the first call
            self._fall_back("compile_error", exc)
            return
        self.compile_warm_ms = (time.perf_counter() - t0) * 1000.0
        log.info("tamiyo gnn compiled; warm-up %.1f ms", self.compile_warm_ms)

    def _fall_back(self, kind: str, exc: BaseException) -> None:
        self._compiled = None
        self.compile_enabled = 0
        self.compile_fallback_total += 1
        self.compile_reason = f"{kind}:{type(exc).__name__}"
        log.warning("tamiyo gnn compile fell back to eager (%s): %s", kind, exc)

    def telemetry(self) -> dict[str, Any]:
        """The compile flags as the service reports them (``tamiyo.gnn.compile_*``)."""
        return {
            "compile_enabled": self.compile_enabled,
            "compile_warm_ms": self.compile_warm_ms,
            "compile_fallback_total": self.compile_fallback_total,
            "compile_reason": self.compile_reason,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, compile_enabled={self.compile_enabled}, "
            f"reason={self.compile_reason!r}, fallbacks={self.compile_fallback_total})"
        )


def _no_sync() -> None:
    return None
