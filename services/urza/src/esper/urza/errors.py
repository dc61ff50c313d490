"""Urza's typed errors. Each carries the `reason` code a `KernelArtifactError` reply uses, so the
service never maps exceptions to strings by hand (and the codes are the prototype's)."""

from __future__ import annotations

from typing import Literal

from esper.core.errors import EsperError

__all__ = [
    "ArtifactFormatError",
    "CatalogRowError",
    "ChecksumMismatchError",
    "KernelReason",
    "MissingArtifactError",
    "UnknownBlueprintError",
    "UnknownKernelError",
    "UrzaError",
]

# `KernelArtifactError.reason` values (REFERENCE_PROTOTYPE §11, plus `missing_id` and `artifact_format`).
KernelReason = Literal["missing_id", "missing_artifact", "checksum_mismatch", "artifact_format", "artifact_not_found"]


class UrzaError(EsperError):
    """Base class of the blueprint library's errors."""

    reason: KernelReason = "artifact_format"


class MissingArtifactError(UrzaError, FileNotFoundError):
    """The catalogue names an artifact whose file is not in the store."""

    reason: KernelReason = "missing_artifact"


class ChecksumMismatchError(UrzaError, ValueError):
    """The bytes do not hash to the checksum they were registered (or requested) with."""

    reason: KernelReason = "checksum_mismatch"


class ArtifactFormatError(UrzaError, ValueError):
    """The bytes are not a valid artifact: not loadable with `weights_only=True`, wrong schema, bad guard
    digest, or a state dict the template cannot take."""

    reason: KernelReason = "artifact_format"


class UnknownKernelError(UrzaError, LookupError):
    """No kernel registered under this kernel id or blueprint id."""

    reason: KernelReason = "artifact_not_found"


class UnknownBlueprintError(UrzaError, LookupError):
    """No blueprint row with this id (extras such as a BSDS need the blueprint's descriptor first)."""

    reason: KernelReason = "artifact_not_found"


class CatalogRowError(UrzaError):
    """A catalogue row that does not decode (a corrupted descriptor or extras JSON)."""
