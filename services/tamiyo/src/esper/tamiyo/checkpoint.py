"""Policy checkpoints: what Simic ships in a `PolicyUpdate` and what Tamiyo keeps on disk.

A checkpoint is a plain dict `torch.save`d and read back with `weights_only=True` (tensors, strings,
numbers, nested dicts: never a pickled module or arbitrary object). Besides the weights it records
what they mean: the architecture version and GNN widths, and the registry schema and assignments it
was trained with (ARCHITECTURE §7), so a policy that would read our indices differently is refused
instead of silently deciding on shuffled embeddings.

On disk (`PolicyStore`) checkpoints are content-addressed files plus a `current.json` pointer written
atomically last: a `kill -9` at any point leaves the old pointer (old policy) or the new one, and a
file that does not hash to its pointer's sha256 is never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from esper.core.errors import EsperError
from esper.core.files import write_bytes_atomic
from esper.tamiyo.gnn import GNNConfig, TamiyoGNN
from esper.tamiyo.registry import RegistryMismatchError, RegistrySet, write_json_atomic
from esper.tamiyo.schema import POLICY_VERSION

__all__ = [
    "ARCHITECTURE_VERSION",
    "CHECKPOINT_FORMAT",
    "PolicyCheckpoint",
    "PolicyStore",
    "PolicyUpdateRejected",
    "StoredPolicy",
    "decode_checkpoint",
    "encode_checkpoint",
]

CHECKPOINT_FORMAT: Final[int] = 1
ARCHITECTURE_VERSION: Final[str] = POLICY_VERSION
POINTER_FILE: Final[str] = "current.json"
_KEEP_FILES: Final[int] = 3


class PolicyUpdateRejected(EsperError):
    """A policy (update or stored checkpoint) that must not serve. `reason` is the prototype's code:
    invalid_payload, registry_mismatch, shape_mismatch, incompatible_update, swap_failed,
    version_mismatch, stale_update (plus bad_signature / duplicate_update from the bus checks)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[PolicyUpdateRejected], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True, slots=True)
class PolicyCheckpoint:
    """A decoded checkpoint; nothing in it has been trusted yet (see :meth:`build_model`)."""

    policy_version: str
    architecture_version: str
    gnn_config: dict[str, Any]
    registry_schema: str
    registry_entries: dict[str, dict[str, int]]
    state_dict: dict[str, torch.Tensor]

    def build_model(self, config: GNNConfig, registries: RegistrySet) -> TamiyoGNN:
        """A model of the *serving* architecture with these weights, or PolicyUpdateRejected.

        Widths are a deployment decision, not something an update may change: a checkpoint for other
        widths is a shape mismatch even when its own config is self-consistent.
        """
        if self.architecture_version != ARCHITECTURE_VERSION:
            raise PolicyUpdateRejected("incompatible_update",
                                       f"architecture {self.architecture_version!r}, serving {ARCHITECTURE_VERSION!r}")
        try:
            registries.check_compatible(self.registry_schema, self.registry_entries)
        except RegistryMismatchError as e:
            raise PolicyUpdateRejected("registry_mismatch", str(e)) from e
        model = TamiyoGNN(config)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:  # missing/unexpected keys and size mismatches
            raise PolicyUpdateRejected("shape_mismatch", str(e).replace("\n", " ")[:400]) from e
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise PolicyUpdateRejected("invalid_payload", "non-finite weights")
        return model.eval()


def encode_checkpoint(model: TamiyoGNN, registries: RegistrySet, *, policy_version: str) -> bytes:
    """Serialise `model` with what it was trained against (Simic's side of the contract)."""
    body = {
        "format": CHECKPOINT_FORMAT,
        "policy_version": policy_version,
        "architecture_version": ARCHITECTURE_VERSION,
        "gnn_config": dataclasses.asdict(model.config),
        "registry_schema": registries.schema_digest(),
        "registry_digest": registries.digest(),
        "registry_entries": registries.entries(),
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(body, buf)
    return buf.getvalue()


def decode_checkpoint(data: bytes) -> PolicyCheckpoint:
    """Bytes → PolicyCheckpoint with `weights_only=True`; any surprise is `invalid_payload`."""
    if not data:
        raise PolicyUpdateRejected("invalid_payload", "empty payload")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, torn zip, not a torch file: all the same to us
        raise PolicyUpdateRejected("invalid_payload", f"not a weights-only checkpoint: {type(e).__name__}: "
                                                      f"{str(e)[:200]}") from e
    if not isinstance(obj, Mapping):
        raise PolicyUpdateRejected("invalid_payload", f"expected a dict, got {type(obj).__name__}")
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise PolicyUpdateRejected("version_mismatch", f"checkpoint format {obj.get('format')!r}")
    fields: dict[str, type] = {"policy_version": str, "architecture_version": str, "gnn_config": dict,
                               "registry_schema": str, "registry_entries": dict, "state_dict": dict}
    for name, kind in fields.items():
        if not isinstance(obj.get(name), kind):
            raise PolicyUpdateRejected("invalid_payload", f"field {name!r} missing or not a {kind.__name__}")
    state = obj["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise PolicyUpdateRejected("invalid_payload", "state_dict must map names to tensors")
    entries = obj["registry_entries"]
    if not all(isinstance(t, Mapping) and all(isinstance(k, str) and isinstance(i, int) for k, i in t.items())
               for t in entries.values()):
        raise PolicyUpdateRejected("invalid_payload", "registry_entries must map names to {key: index}")
    return PolicyCheckpoint(
        policy_version=obj["policy_version"], architecture_version=obj["architecture_version"],
        gnn_config=dict(obj["gnn_config"]), registry_schema=obj["registry_schema"],
        registry_entries={str(n): dict(t) for n, t in entries.items()}, state_dict=dict(state),
    )


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """What `current.json` points at: the checkpoint bytes and the update that installed them."""

    data: bytes
    policy_version: str
    policy_id: str
    issued_at_ms: int


class PolicyStore:
    """`policy_dir/<sha256>.pt` files and the `current.json` pointer (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, data: bytes, *, policy_version: str, policy_id: str, issued_at_ms: int) -> str:
        """Persist and point at `data`; returns its sha256. Older files beyond a few are pruned."""
        self.directory.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256(data).hexdigest()
        path = self.directory / f"{sha}.pt"
        if not path.exists():
            write_bytes_atomic(path, data)
        write_json_atomic(self.directory / POINTER_FILE, {
            "format": CHECKPOINT_FORMAT, "file": path.name, "sha256": sha, "policy_version": policy_version,
            "policy_id": policy_id, "issued_at_ms": issued_at_ms})
        self._prune(keep=path.name)
        return sha

    def load(self) -> StoredPolicy | None:
        """The current checkpoint, verified against its pointer; None when none was ever saved."""
        pointer = self.directory / POINTER_FILE
        if not pointer.exists():
            return None
        try:
            meta = json.loads(pointer.read_text())
            data = (self.directory / str(meta["file"])).read_bytes()
            sha, version, pid, issued = meta["sha256"], meta["policy_version"], meta["policy_id"], meta["issued_at_ms"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PolicyUpdateRejected("invalid_payload", f"stored policy unreadable: {e}") from e
        if hashlib.sha256(data).hexdigest() != sha:
            raise PolicyUpdateRejected("invalid_payload", f"stored policy {meta['file']} does not match its sha256")
        return StoredPolicy(data, str(version), str(pid), int(issued))

    def _prune(self, *, keep: str) -> None:
        files = sorted(self.directory.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [f for f in files if f.name != keep][_KEEP_FILES - 1:]:
            old.unlink(missing_ok=True)
