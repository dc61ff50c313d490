"""One producer pass: probe every kernel whose blueprint has no BSDS for its current artifact, and
write the sheet into Urza's catalogue. Blocking (torch, SQLite): the service runs it in a thread.

"Current" is tracked in `extras["bsds_kernel"]` (the checksum of the artifact the sheet was measured
on), so a recompiled kernel is probed again and an unchanged one never is. The module under test is
rebuilt from the artifact exactly as Kasmina would (weights only, Karn's template code).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from esper.core.logging import get_logger
from esper.karn.template import SlotShape
from esper.leyline import pb
from esper.urabrask.bsds import issue_bsds
from esper.urabrask.crucible import CrucibleReport, run_crucible
from esper.urza.artifact import load_artifact, rebuild
from esper.urza.errors import UrzaError
from esper.urza.library import UrzaLibrary
from esper.urza.records import KernelRecord

log = get_logger("esper.urabrask.producer")

BSDS_KERNEL_EXTRA = "bsds_kernel"
CRUCIBLE_EXTRA = "crucible"


@dataclass(slots=True)
class ProducerReport:
    issued: list[pb.BSDS] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # blueprint id → reason
    skipped: int = 0


def due_kernels(library: UrzaLibrary, *, only_safe_tier: bool) -> list[tuple[pb.BlueprintDescriptor, KernelRecord]]:
    """Per blueprint, its most recent kernel when the BSDS was not measured on that artifact."""
    out = []
    for desc in library.blueprints():
        if only_safe_tier and desc.tier != pb.BLUEPRINT_TIER_SAFE:
            continue
        kernels = library.kernels(desc.blueprint_id)
        if not kernels:
            continue
        newest = max(kernels, key=lambda k: k.registered_at_ms)
        if library.extras(desc.blueprint_id).get(BSDS_KERNEL_EXTRA) != newest.checksum:
            out.append((desc, newest))
    return out


def _finite(value: float) -> float | None:
    """JSON has no NaN: a figure a probe could not measure (it raised) is stored as null."""
    return value if math.isfinite(value) else None


def _summary(report: CrucibleReport) -> dict[str, object]:
    return {"slot": report.slot, "device": report.device, "hazards": list(report.hazards),
            "latency_p50_ms": _finite(report.latency_p50_ms), "latency_p95_ms": _finite(report.latency_p95_ms),
            "probe_seconds": dict(report.probe_seconds)}


def produce_once(library: UrzaLibrary, *, device: torch.device, seed: int, only_safe_tier: bool,
                 limit: int = 0) -> ProducerReport:
    result = ProducerReport()
    due = due_kernels(library, only_safe_tier=only_safe_tier)
    if limit:
        result.skipped = max(0, len(due) - limit)
        due = due[:limit]
    for desc, record in due:
        bid = desc.blueprint_id
        try:
            _, data = library.fetch_artifact(record.kernel_id)
            artifact = load_artifact(data, record.checksum)
        except UrzaError as e:
            result.failed[bid] = getattr(e, "reason", type(e).__name__)
            log.error("artifact unusable for probing", kernel_id=record.kernel_id, error=str(e))
            continue
        report = run_crucible(functools.partial(rebuild, artifact), SlotShape.from_key(record.slot), seed=seed,
                              device=device)
        sheet = issue_bsds(desc, report)
        library.set_bsds(sheet)
        library.set_extra(bid, BSDS_KERNEL_EXTRA, record.checksum)
        library.set_extra(bid, CRUCIBLE_EXTRA, _summary(report))
        result.issued.append(sheet)
        log.info("bsds issued", blueprint_id=bid, hazards=list(report.hazards),
                 band=pb.HazardBand.Name(sheet.hazard_band))
    return result
