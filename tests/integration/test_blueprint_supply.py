"""Tamiyo against the real blueprint supply: Urza (seeded from Karn, kernels from Tezzeret) answers
Tamiyo's metadata path over the bus; extras raise coverage, and BSDS sheets reach the risk engine."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.karn import CATALOGUE, SlotShape
from esper.leyline import pb, verify_command
from esper.oona import OonaSettings
from esper.tezzeret.forge import forge_once
from esper.urza.library import UrzaLibrary
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until
from tests.tamiyo._fleet import packet, running_tamiyo, tamiyo_settings
from tests.urza._service import running_urza, urza_settings

Outcome = tuple[float, pb.AdaptationCommand, int]  # feature coverage, the command, blueprints Tamiyo saw


async def _coverage_and_command(make_client: ClientFactory, settings: OonaSettings, var: Path, *,
                                seed_slot: str | None, quarantine_all: bool = False) -> Outcome:
    trainer = await make_client(f"tolaria-{var.name}")
    us = urza_settings(settings, var / "urza", seed_karn=True, seed_slot=seed_slot)
    async with running_urza(us) as urza:
        if quarantine_all:
            for d in urza.library.blueprints():
                sheet = pb.BSDS(version=1, blueprint_id=d.blueprint_id, risk_score=0.9,
                                hazard_band=pb.HAZARD_BAND_CRITICAL, handling_class=pb.HANDLING_CLASS_QUARANTINE,
                                provenance=pb.PROVENANCE_URABRASK)
                urza.library.set_bsds(sheet)
        async with running_tamiyo(tamiyo_settings(settings, var / "tamiyo")) as tamiyo:
            async def fetched() -> bool:
                return bool(tamiyo.catalog.view().blueprints)

            await wait_until(fetched, what="catalogue fetched from Urza")
            n = len(tamiyo.catalog.view().blueprints)
            reply = await trainer.request("state", packet(1), timeout_ms=2000)
    command = reply.message_as(pb.AdaptationCommand)
    verify_command(command, trainer.keys)
    return float(command.annotations["feature_coverage"]), command, n


async def test_extras_raise_coverage(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    bare, _, n_bare = await _coverage_and_command(make_client, settings, tmp_path / "bare", seed_slot=None)
    rich, command, n_rich = await _coverage_and_command(make_client, settings, tmp_path / "rich", seed_slot="v64")
    assert n_bare == n_rich == len(CATALOGUE)
    assert rich > bare, (rich, bare)
    assert command.command_type in (pb.COMMAND_SEED, pb.COMMAND_PAUSE, pb.COMMAND_OPTIMIZER)


async def test_bsds_quarantine_reaches_the_risk_engine(make_client: ClientFactory, settings: OonaSettings,
                                                       tmp_path: Path) -> None:
    _, command, _ = await _coverage_and_command(make_client, settings, tmp_path, seed_slot="v64",
                                                quarantine_all=True)
    assert command.command_type == pb.COMMAND_PAUSE
    assert command.annotations["risk_reason"] in ("bsds_handling_quarantine", "bp_quarantine")


async def test_tezzeret_kernels_are_served_by_urza(make_client: ClientFactory, settings: OonaSettings,
                                                   tmp_path: Path) -> None:
    from tests.urza._service import kernel_request

    kasmina = await make_client("kasmina")
    us = urza_settings(settings, tmp_path, seed_karn=True, seed_slot="v64")
    with UrzaLibrary(us.db_path, us.artifact_dir) as lib:
        report = forge_once(lib, [SlotShape(64)], device=torch.device("cpu"), compile_enabled=False, seed=0,
                            max_attempts=1, templates=[CATALOGUE["BP002"], CATALOGUE["BP005"]])
    assert [r.kernel_id for r in report.registered] == ["BP002@v64", "BP005@v64"]
    async with running_urza(us):
        reply = await kasmina.request("kernel.request", kernel_request("r1", "BP005@v64"), timeout_ms=5000)
    ready = reply.message_as(pb.KernelArtifactReady)
    assert (ready.blueprint_id, ready.checksum) == ("BP005@v64", report.registered[1].checksum)
