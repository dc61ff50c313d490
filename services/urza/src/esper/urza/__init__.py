"""Urza: Esper's blueprint library. A SQLite catalogue of blueprint descriptors (with their graphs and
BSDS safety sheets) and compiled kernels, beside content-addressed artifact files that hold template id,
parameters and initial weights only — modules are rebuilt from Karn's trusted code, never unpickled."""

from esper.urza.artifact import (
    Artifact,
    artifact_ref,
    checksum,
    guard_digest,
    kernel_id,
    load_artifact,
    pack_artifact,
    rebuild,
)
from esper.urza.errors import (
    ArtifactFormatError,
    CatalogRowError,
    ChecksumMismatchError,
    MissingArtifactError,
    UnknownBlueprintError,
    UnknownKernelError,
    UrzaError,
)
from esper.urza.library import UrzaLibrary
from esper.urza.records import KernelRecord, catalog_update, ready_message
from esper.urza.store import ArtifactStore

__all__ = [
    "Artifact",
    "ArtifactFormatError",
    "ArtifactStore",
    "CatalogRowError",
    "ChecksumMismatchError",
    "KernelRecord",
    "MissingArtifactError",
    "UnknownBlueprintError",
    "UnknownKernelError",
    "UrzaError",
    "UrzaLibrary",
    "artifact_ref",
    "catalog_update",
    "checksum",
    "guard_digest",
    "kernel_id",
    "load_artifact",
    "pack_artifact",
    "ready_message",
    "rebuild",
]
