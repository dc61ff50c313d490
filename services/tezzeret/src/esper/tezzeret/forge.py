"""The forge loop body: for every Karn template and configured slot without a current kernel, compile
and register it in Urza. Blocking (torch, SQLite): the service runs it in a worker thread.

"Current" means Urza holds a kernel for that blueprint and slot whose guard digest matches what this
process would produce (template, parameters, torch version): a torch upgrade recompiles everything,
a restart recompiles nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from esper.core.logging import get_logger
from esper.karn.catalogue import CATALOGUE
from esper.karn.graph import blueprint_graph, descriptor
from esper.karn.template import BlueprintTemplate, SlotShape
from esper.tezzeret.compiler import CompileError, CompileResult, compile_with_retries
from esper.tezzeret.metrics import TezzeretMetrics
from esper.urza.artifact import guard_digest, kernel_id
from esper.urza.errors import UnknownKernelError
from esper.urza.library import UrzaLibrary
from esper.urza.records import KernelRecord

log = get_logger("esper.tezzeret.forge")


@dataclass(slots=True)
class ForgeReport:
    """One pass: what was registered, skipped as current, or failed (kernel id → reason)."""

    registered: list[KernelRecord] = field(default_factory=list)
    results: list[CompileResult] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def is_current(library: UrzaLibrary, template: BlueprintTemplate, slot: SlotShape) -> bool:
    try:
        record = library.kernel(kernel_id(template.blueprint_id, slot))
    except UnknownKernelError:
        return False
    wanted = guard_digest(template.blueprint_id, slot, template.resolve_params(), str(torch.__version__))
    return record.guard_digest == wanted and library.store.exists(record.artifact_ref)


def forge_once(library: UrzaLibrary, slots: Iterable[SlotShape], *, device: torch.device, compile_enabled: bool,
               seed: int, max_attempts: int, metrics: TezzeretMetrics | None = None,
               templates: Iterable[BlueprintTemplate] | None = None) -> ForgeReport:
    report = ForgeReport()
    for slot in slots:
        for template in templates if templates is not None else CATALOGUE.values():
            if slot.kind not in template.slot_kinds:
                continue
            kid = kernel_id(template.blueprint_id, slot)
            if is_current(library, template, slot):
                report.current.append(kid)
                continue
            try:
                result = compile_with_retries(template, slot, device=device, compile_enabled=compile_enabled,
                                              seed=seed, max_attempts=max_attempts)
            except CompileError as e:
                report.failed[kid] = e.reason
                if metrics is not None:
                    metrics.failures.labels(e.reason).inc()
                log.error("compile failed", kernel_id=kid, reason=e.reason, detail=e.detail[:300])
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                graph = blueprint_graph(template, slot)
            library.upsert_blueprint(descriptor(template), graph)
            record = library.register_kernel(template.blueprint_id, slot, result.artifact,
                                             compile_ms=result.compile_ms, prewarm_p50_ms=result.prewarm_p50_ms,
                                             prewarm_p95_ms=result.prewarm_p95_ms)
            report.registered.append(record)
            report.results.append(result)
            if metrics is not None:
                metrics.observe(result)
    return report
