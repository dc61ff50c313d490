"""The blueprint artifact format (ARCHITECTURE §7): data, never a pickled module.

An artifact is `torch.save` of one plain dict::

    {"format": 1, "blueprint_id": "BP001", "slot": "v64", "params": {"hidden": 32.0},
     "torch_version": "2.13.0", "guard_digest": "<sha256 hex>", "state_dict": {name: CPU tensor}}

It is loaded only with `torch.load(weights_only=True)` after its sha256 matched, and the module is
rebuilt from Karn's trusted template code (`rebuild`). The guard digest pins what the weights were
made for (template id, slot, parameters, torch version); a consumer compares it with the digest it
was promised in `KernelArtifactReady`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import torch
from torch import nn

from esper.karn.template import BlueprintTemplate, KarnError, SlotShape
from esper.urza.errors import ArtifactFormatError, ChecksumMismatchError

__all__ = [
    "ARTIFACT_FORMAT",
    "REF_PREFIX",
    "Artifact",
    "TemplateLookup",
    "artifact_ref",
    "checksum",
    "guard_digest",
    "hex_of_ref",
    "kernel_id",
    "load_artifact",
    "pack_artifact",
    "rebuild",
]

ARTIFACT_FORMAT = 1
REF_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = frozenset({"format", "blueprint_id", "slot", "params", "torch_version", "guard_digest", "state_dict"})

TemplateLookup = Callable[[str], BlueprintTemplate]
"""blueprint id → trusted template (Karn's `get_template` by default)."""


# -- digests and references ------------------------------------------------------------------------


def _slot_key(slot: SlotShape | str) -> str:
    return slot.as_key() if isinstance(slot, SlotShape) else slot


def kernel_id(blueprint_id: str, slot: SlotShape | str) -> str:
    """The catalogue id of one compiled kernel: `BP001@v64`."""
    return f"{blueprint_id}@{_slot_key(slot)}"


def guard_digest(blueprint_id: str, slot: SlotShape | str, params: Mapping[str, float], torch_version: str) -> str:
    """sha256 hex over canonical JSON (sorted keys) of what the weights were made for."""
    doc = {"blueprint_id": blueprint_id, "slot": _slot_key(slot),
           "params": {str(k): float(v) for k, v in params.items()}, "torch_version": torch_version}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def checksum(data: bytes) -> str:
    """sha256 hex of the artifact bytes (what the catalogue and `KernelArtifactReady` carry)."""
    return hashlib.sha256(data).hexdigest()


def artifact_ref(digest: str) -> str:
    """Content address of an artifact: `sha256:<hex>`."""
    if not _HEX64.fullmatch(digest):
        raise ArtifactFormatError(f"not a sha256 hex digest: {digest[:80]!r}")
    return REF_PREFIX + digest


def hex_of_ref(ref: str) -> str:
    """The hex digest inside `sha256:<hex>`; anything else (path tricks included) is refused."""
    hexdigest = ref.removeprefix(REF_PREFIX)
    if not ref.startswith(REF_PREFIX) or not _HEX64.fullmatch(hexdigest):
        raise ArtifactFormatError(f"bad artifact ref {ref[:80]!r}; expected sha256:<64 hex>")
    return hexdigest


# -- pack ------------------------------------------------------------------------------------------


def _cpu_copy(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ArtifactFormatError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
    # clone: a compact storage of its own (a view would otherwise save its whole base storage).
    return value.detach().to("cpu").contiguous().clone()


def pack_artifact(
    blueprint_id: str,
    slot: SlotShape,
    params: Mapping[str, float],
    state_dict: Mapping[str, Any],
    *,
    torch_version: str = torch.__version__,
) -> bytes:
    """The artifact bytes for initial weights of `blueprint_id` at `slot` with (resolved) `params`."""
    if not blueprint_id:
        raise ArtifactFormatError("artifact without blueprint_id")
    # Plain `str`s only: torch.__version__ is a TorchVersion, which the weights-only loader refuses.
    blueprint_id, torch_version = str(blueprint_id), str(torch_version)
    plain_params = {str(k): float(v) for k, v in params.items()}
    doc = {
        "format": ARTIFACT_FORMAT,
        "blueprint_id": blueprint_id,
        "slot": slot.as_key(),
        "params": plain_params,
        "torch_version": torch_version,
        "guard_digest": guard_digest(blueprint_id, slot, plain_params, torch_version),
        "state_dict": {str(k): _cpu_copy(str(k), v) for k, v in state_dict.items()},
    }
    buf = io.BytesIO()
    torch.save(doc, buf)
    return buf.getvalue()


# -- load ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Artifact:
    """A verified, schema-checked artifact (tensors on CPU)."""

    blueprint_id: str
    slot: str
    params: Mapping[str, float]
    torch_version: str
    guard_digest: str
    checksum: str
    state_dict: Mapping[str, torch.Tensor]

    @property
    def slot_shape(self) -> SlotShape:
        return SlotShape.from_key(self.slot)

    @property
    def kernel_id(self) -> str:
        return kernel_id(self.blueprint_id, self.slot)

    @property
    def artifact_ref(self) -> str:
        return artifact_ref(self.checksum)


def _str_field(doc: Mapping[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise ArtifactFormatError(f"artifact field {key!r} must be a non-empty string")
    return value


def _params(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ArtifactFormatError("artifact field 'params' must be a dict")
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, float | int):
            raise ArtifactFormatError(f"artifact parameter {k!r} must map a string to a number")
        out[k] = float(v)
    return out


def _tensors(value: object) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict):
        raise ArtifactFormatError("artifact field 'state_dict' must be a dict")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ArtifactFormatError(f"state_dict entry {k!r} is not a named tensor")
    return dict(value)


def _validate(doc: object, digest: str) -> Artifact:
    """Schema of the loaded dict (pure: no IO)."""
    if not isinstance(doc, dict):
        raise ArtifactFormatError(f"artifact is a {type(doc).__name__}, not a dict")
    if set(doc) != _KEYS:
        raise ArtifactFormatError(f"artifact keys {sorted(map(str, doc))} != {sorted(_KEYS)}")
    if doc["format"] != ARTIFACT_FORMAT or isinstance(doc["format"], bool):
        raise ArtifactFormatError(f"unsupported artifact format {doc['format']!r}")
    blueprint_id, slot = _str_field(doc, "blueprint_id"), _str_field(doc, "slot")
    torch_version, guard = _str_field(doc, "torch_version"), _str_field(doc, "guard_digest")
    try:
        SlotShape.from_key(slot)
    except KarnError as e:
        raise ArtifactFormatError(str(e)) from e
    params = _params(doc["params"])
    expected = guard_digest(blueprint_id, slot, params, torch_version)
    if guard != expected:
        raise ArtifactFormatError(f"guard digest {guard[:16]}... does not match its fields ({expected[:16]}...)")
    return Artifact(blueprint_id=blueprint_id, slot=slot, params=params, torch_version=torch_version,
                    guard_digest=guard, checksum=digest, state_dict=_tensors(doc["state_dict"]))


def load_artifact(data: bytes, expected_checksum: str) -> Artifact:
    """Verify the sha256 first, then `torch.load(weights_only=True)` and check the schema.

    Nothing is unpickled before the checksum matched, and the restricted unpickler refuses every
    global that is not plain data (modules, functions, arbitrary objects): `ArtifactFormatError`.
    """
    digest = checksum(data)
    if digest != expected_checksum:
        raise ChecksumMismatchError(f"artifact sha256 {digest} != expected {expected_checksum[:80]}")
    try:
        doc = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, KeyError, IndexError) as e:
        raise ArtifactFormatError(f"not a weights-only artifact: {type(e).__name__}: {str(e)[:300]}") from e
    return _validate(doc, digest)


# -- rebuild ---------------------------------------------------------------------------------------


def karn_template(blueprint_id: str) -> BlueprintTemplate:
    """Karn's trusted template for `blueprint_id` (raises Karn's UnknownBlueprintError)."""
    from esper.karn.catalogue import get_template  # imported on use: the whole catalogue is heavy-ish

    return get_template(blueprint_id)


def rebuild(artifact: Artifact, device: torch.device | str | None = None, *,
            templates: TemplateLookup | None = None) -> nn.Module:
    """The module, rebuilt from Karn's template code and loaded with the artifact's weights (strict).

    The template's random initialisation runs under a forked RNG, so rebuilding never disturbs the
    caller's (the trainer's) random stream. Unknown template, unfit slot or parameters, or a state
    dict that does not match the module: `ArtifactFormatError`.
    """
    lookup = templates or karn_template
    try:
        template = lookup(artifact.blueprint_id)
        with torch.random.fork_rng(devices=[]):
            module = template.build(artifact.slot_shape, artifact.params)
        module.load_state_dict(dict(artifact.state_dict), strict=True)
    except (KarnError, RuntimeError) as e:
        raise ArtifactFormatError(f"{artifact.kernel_id}: cannot rebuild: {str(e)[:300]}") from e
    return module if device is None else module.to(device)
