"""Training checkpoints (ARCHITECTURE §7): durable, verified, weights-only.

Layout of a checkpoint directory (`<var_dir>/checkpoints`):

    ckpt-s<step>-e<epoch>-<sha12>.pt          torch.save of a plain dict (below); the name embeds its hash
    ckpt-s<step>-e<epoch>-<sha12>.pt.sha256   sidecar: "<sha256 hex>  <file name>\\n" (sha256sum format)
    ckpt-s<step>-e<epoch>-<sha12>.pt.mac      with a signing key: "<key id> <HMAC-SHA256 of the sidecar line>\\n"
    latest.json                               pointer: the newest checkpoint and the last K, written last

A save writes the checkpoint to a temp file, fsyncs, renames, fsyncs the directory; then the sidecar
the same way; then `latest.json` the same way (the prototype's `var/tolaria/wal.json`); then prunes
files the pointer no longer lists. A `kill -9` at any point therefore leaves `latest.json` naming a
complete, verified pair: either the previous checkpoint (still retained) or the new one. File names
are content-addressed, so a save never overwrites a file an older pointer refers to.

A load verifies before it deserialises: the sidecar must exist and parse, the file's sha256 must
match it (and the pointer's, when loading through the pointer), and only then is the file read with
`torch.load(weights_only=True)`. Every refusal is a `CheckpointError` with a `reason`.

A hash only shows that the bytes are what the sidecar and the pointer say: whoever can write the
directory can rewrite all three. A store given the run's signing keys (the trainer passes the Leyline
keys) also writes a MAC of the sidecar line and refuses, on load, a checkpoint whose MAC is missing or
wrong (`bad_signature`), so a tampered checkpoint needs the secret too. The previous key verifies.

The payload is a dict of tensors, numbers, strings, lists and dicts only: format, model state dict,
optimizer state dict, epoch, step, run id, creation time and `extra` (JSON-like values and tensors,
e.g. Kasmina's seed bookkeeping). Rebuilding the architecture (grafted seeds) is the caller's job
before `load_state_dict`; a mismatch is a typed `StateMismatchError` from `esper.tolaria.state`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch
from torch import nn

from esper.core.clock import now_ms
from esper.core.errors import EsperError
from esper.core.files import write_bytes_atomic
from esper.core.logging import get_logger
from esper.leyline import SigningKeys, hmac_sha256
from esper.tolaria.state import TrainingState, restore_state, tensor_nbytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "POINTER_FILE",
    "SIDECAR_SUFFIX",
    "Checkpoint",
    "CheckpointError",
    "CheckpointErrorReason",
    "CheckpointInfo",
    "CheckpointStore",
    "decode_checkpoint",
    "encode_checkpoint",
    "read_checkpoint",
    "sha256_file",
    "write_bytes_atomic",
]

CHECKPOINT_FORMAT: Final[int] = 1
POINTER_FILE: Final[str] = "latest.json"
SIDECAR_SUFFIX: Final[str] = ".sha256"
MAC_SUFFIX: Final[str] = ".mac"
_KIND: Final[str] = "esper.tolaria.checkpoint"
_NAME_RE: Final = re.compile(r"^ckpt-s\d{10}-e\d{6}-[0-9a-f]{12}\.pt$")
_SIDECAR_RE: Final = re.compile(r"^([0-9a-f]{64})  (\S+)\n?$")

log = get_logger("esper.tolaria.checkpoint")

CheckpointErrorReason = Literal[
    "no_checkpoint",  # nothing saved yet / nothing at or before the requested step
    "bad_pointer",  # latest.json unreadable or malformed
    "missing_file",  # the checkpoint file is gone
    "missing_sidecar",  # no .sha256 next to it
    "bad_sidecar",  # the sidecar does not parse or names another file
    "checksum_mismatch",  # the file's bytes do not hash to the sidecar's sha256
    "pointer_mismatch",  # sidecar and file agree, but not with the pointer (swapped or replayed files)
    "foreign_run",  # a verified checkpoint another run wrote into this directory
    "bad_signature",  # a keyed store: the .mac is missing, names an unknown key, or does not verify
    "unsafe_content",  # torch.load(weights_only=True) refused it (pickled objects, code)
    "unreadable",  # not a torch archive (verified bytes that are still not a checkpoint)
    "bad_format",  # loads, but is not our dict (format, fields, types)
    "unserialisable",  # save: something in the state would not load back weights-only
    "io_error",  # save: the filesystem refused
]


class CheckpointError(EsperError):
    """A checkpoint that was not written or must not be loaded; `reason` is a `CheckpointErrorReason`.
    `skipped`: for "no_checkpoint", the broken checkpoints passed over on the way (each reported)."""

    def __init__(self, reason: CheckpointErrorReason, detail: str, path: Path | None = None,
                 skipped: tuple[CheckpointError, ...] = ()) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: CheckpointErrorReason = reason
        self.detail = detail
        self.path = path
        self.skipped = skipped

    def __reduce__(self) -> tuple[type[CheckpointError],
                                  tuple[str, str, Path | None, tuple[CheckpointError, ...]]]:
        return (type(self), (self.reason, self.detail, self.path, self.skipped))


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One checkpoint as the pointer records it."""

    file: str
    sha256: str
    epoch: int
    step: int
    size_bytes: int
    created_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: object) -> CheckpointInfo:
        if not isinstance(obj, Mapping):
            raise TypeError(f"expected an object, got {type(obj).__name__}")
        info = cls(file=str(obj["file"]), sha256=str(obj["sha256"]), epoch=int(obj["epoch"]), step=int(obj["step"]),
                   size_bytes=int(obj["size_bytes"]), created_at_ms=int(obj["created_at_ms"]))
        if not _NAME_RE.match(info.file) or not re.fullmatch(r"[0-9a-f]{64}", info.sha256):
            raise ValueError(f"bad checkpoint entry {info.file!r} / {info.sha256!r}")
        return info


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A verified, decoded checkpoint (tensors on the CPU)."""

    info: CheckpointInfo
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    run_id: str
    extra: dict[str, Any]

    @property
    def epoch(self) -> int:
        return self.info.epoch

    @property
    def step(self) -> int:
        return self.info.step

    def training_state(self) -> TrainingState:
        return TrainingState(self.model_state, self.optimizer_state,
                             tensor_nbytes(self.model_state) + tensor_nbytes(self.optimizer_state))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Load into `model` and `optimizer` (validated first; StateMismatchError changes nothing)."""
        restore_state(model, optimizer, self.training_state())


# -- encoding ----------------------------------------------------------------------------------------

_ALLOWED_LEAVES = (torch.Tensor, str, int, float, bool, type(None))


def _check_weights_only(obj: object, where: str) -> None:
    """Refuse (before writing) anything `torch.load(weights_only=True)` would refuse to read back."""
    if isinstance(obj, _ALLOWED_LEAVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise CheckpointError("unserialisable", f"{where}: key {k!r} is a {type(k).__name__}")
            _check_weights_only(v, f"{where}.{k}")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise CheckpointError("unserialisable", f"{where} is a {type(obj).__name__}; only tensors, numbers, strings, "
                                            "None, lists and dicts load weights-only")


def encode_checkpoint(model_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any], *, epoch: int,
                      step: int, run_id: str = "", extra: Mapping[str, Any] | None = None,
                      created_at_ms: int | None = None) -> bytes:
    """The bytes of one checkpoint (a torch.save'd dict); refuses content that would not load weights-only."""
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0, got {epoch}, {step}")
    body: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "kind": _KIND,
        "epoch": int(epoch),
        "step": int(step),
        "run_id": run_id,
        "created_at_ms": now_ms() if created_at_ms is None else int(created_at_ms),
        "model": dict(model_state),
        "optimizer": dict(optimizer_state),
        "extra": dict(extra or {}),
    }
    _check_weights_only(body, "checkpoint")
    buf = io.BytesIO()
    torch.save(body, buf)
    return buf.getvalue()


def decode_checkpoint(data: bytes, *, path: Path | None = None) -> dict[str, Any]:
    """Verified bytes → the payload dict, read with `weights_only=True`, structure checked."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global / opcode
        raise CheckpointError("unsafe_content", f"refused by weights_only=True: {str(e)[:300]}", path) from e
    except Exception as e:  # torn or foreign archive
        raise CheckpointError("unreadable", f"{type(e).__name__}: {str(e)[:300]}", path) from e
    if not isinstance(obj, dict) or obj.get("kind") != _KIND:
        raise CheckpointError("bad_format", f"not a Tolaria checkpoint ({type(obj).__name__})", path)
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("bad_format", f"checkpoint format {obj.get('format')!r}, expected {CHECKPOINT_FORMAT}",
                              path)
    kinds: dict[str, type | tuple[type, ...]] = {"epoch": int, "step": int, "run_id": str, "created_at_ms": int,
                                                 "model": dict, "optimizer": dict, "extra": dict}
    for name, kind in kinds.items():
        if not isinstance(obj.get(name), kind):
            raise CheckpointError("bad_format", f"field {name!r} missing or not a {kind}", path)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj["model"].items()):
        raise CheckpointError("bad_format", "model state must map names to tensors", path)
    return obj


# -- files -------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _mac_path(path: Path) -> Path:
    return path.with_name(path.name + MAC_SUFFIX)


def _sidecar_line(sha: str, name: str) -> bytes:
    return f"{sha}  {name}\n".encode("ascii")


def _verify_mac(path: Path, sha: str, keys: SigningKeys) -> None:
    """The `.mac` next to `path` must be a MAC, under a key we hold, of the sidecar line for `sha`."""
    mac_file = _mac_path(path)
    try:
        # The key id is the operator's (any text, spaces included); the MAC is hex, after the last space.
        key_id, _, mac = mac_file.read_text(encoding="utf-8").rstrip("\n").rpartition(" ")
    except FileNotFoundError as e:
        raise CheckpointError("bad_signature", f"{mac_file.name} does not exist (an unsigned checkpoint)", path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError("bad_signature", f"{mac_file.name}: {e}", path) from e
    secret = keys.secret_for(key_id)
    if secret is None:
        raise CheckpointError("bad_signature", f"{mac_file.name} names unknown key {key_id!r}", path)
    # Compared as bytes: `compare_digest` raises TypeError on str with non-ASCII characters (a damaged file).
    if not hmac.compare_digest(mac.encode("utf-8"), hmac_sha256(secret, _sidecar_line(sha, path.name)).hex().encode()):
        raise CheckpointError("bad_signature", f"{mac_file.name} does not verify", path)


def _read_sidecar(path: Path) -> str:
    side = _sidecar(path)
    try:
        text = side.read_text(encoding="ascii")
    except FileNotFoundError as e:
        raise CheckpointError("missing_sidecar", f"{side.name} does not exist", path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError("bad_sidecar", f"{side.name}: {e}", path) from e
    m = _SIDECAR_RE.match(text)
    if m is None:
        raise CheckpointError("bad_sidecar", f"{side.name} is not '<sha256>  <name>'", path)
    if m.group(2) != path.name:
        raise CheckpointError("bad_sidecar", f"{side.name} names {m.group(2)!r}", path)
    return m.group(1)


def read_checkpoint(path: Path, *, expected_sha256: str | None = None) -> Checkpoint:
    """Verify `path` against its sidecar (and `expected_sha256`, the pointer's), then decode it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("missing_file", f"{path} does not exist", path)
    recorded = _read_sidecar(path)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise CheckpointError("checksum_mismatch", f"{path.name} hashes to {actual[:12]}, sidecar says "
                                                   f"{recorded[:12]}", path)
    if expected_sha256 is not None and actual != expected_sha256:
        raise CheckpointError("pointer_mismatch", f"{path.name} hashes to {actual[:12]}, pointer says "
                                                  f"{expected_sha256[:12]}", path)
    obj = decode_checkpoint(data, path=path)
    info = CheckpointInfo(file=path.name, sha256=actual, epoch=obj["epoch"], step=obj["step"], size_bytes=len(data),
                          created_at_ms=obj["created_at_ms"])
    return Checkpoint(info=info, model_state=obj["model"], optimizer_state=obj["optimizer"], run_id=obj["run_id"],
                      extra=obj["extra"])


# -- the store ---------------------------------------------------------------------------------------


class CheckpointStore:
    """Checkpoints of one run in one directory: save, the `latest.json` pointer, retention of the last `keep`.

    One writer per directory (the trainer). `save` blocks on fsyncs: call it at an epoch boundary, or
    from a worker thread with a captured `TrainingState` (`save_state`) so training can go on.
    """

    def __init__(self, directory: Path | str, *, keep: int = 3, run_id: str = "",
                 keys: SigningKeys | None = None) -> None:
        """`keys`: sign every checkpoint and load only signed ones (module docstring); None: hashes only."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.run_id = run_id
        self.keys = keys

    @property
    def pointer_path(self) -> Path:
        return self.directory / POINTER_FILE

    # -- save --------------------------------------------------------------------------------------

    def save(self, model_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any], *, epoch: int,
             step: int, extra: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Write a checkpoint durably, then point `latest.json` at it, then prune beyond `keep`."""
        created = now_ms()
        data = encode_checkpoint(model_state, optimizer_state, epoch=epoch, step=step, run_id=self.run_id,
                                 extra=extra, created_at_ms=created)
        sha = hashlib.sha256(data).hexdigest()
        name = f"ckpt-s{step:010d}-e{epoch:06d}-{sha[:12]}.pt"
        info = CheckpointInfo(file=name, sha256=sha, epoch=epoch, step=step, size_bytes=len(data),
                              created_at_ms=created)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / name
            write_bytes_atomic(path, data)
            write_bytes_atomic(_sidecar(path), _sidecar_line(sha, name))
            if self.keys is not None:
                mac = hmac_sha256(self.keys.secret, _sidecar_line(sha, name)).hex()
                write_bytes_atomic(_mac_path(path), f"{self.keys.key_id} {mac}\n".encode())
            history = [info, *[h for h in self._history_or_empty() if h.file != name]][: self.keep]
            pointer = {"format": CHECKPOINT_FORMAT, "run_id": self.run_id, "latest": info.to_json(),
                       "history": [h.to_json() for h in history], "written_at_ms": now_ms()}
            write_bytes_atomic(self.pointer_path, json.dumps(pointer, indent=1, sort_keys=True).encode())
        except OSError as e:
            raise CheckpointError("io_error", f"saving {name}: {e}", self.directory / name) from e
        self._prune({h.file for h in history})
        return info

    def save_state(self, state: TrainingState, *, epoch: int, step: int,
                   extra: Mapping[str, Any] | None = None) -> CheckpointInfo:
        return self.save(state.model, state.optimizer, epoch=epoch, step=step, extra=extra)

    def save_training(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, epoch: int, step: int,
                      extra: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Checkpoint the live model and optimizer (serialised synchronously, so no copy is needed)."""
        opt_state = optimizer.state_dict() if optimizer is not None else {}
        return self.save(dict(model.state_dict()), opt_state, epoch=epoch, step=step, extra=extra)

    def _prune(self, keep: set[str]) -> None:
        """Delete what the pointer no longer lists. The save has landed by now: a file that cannot be
        deleted is logged and tried again at the next save, not raised as a failed checkpoint."""
        try:
            for entry in self.directory.iterdir():
                name = entry.name
                base = name.removesuffix(SIDECAR_SUFFIX).removesuffix(MAC_SUFFIX)
                stale = name.startswith(".") and name.endswith(".tmp") and (".ckpt-" in name or POINTER_FILE in name)
                if (_NAME_RE.match(base) and base not in keep) or stale:
                    entry.unlink(missing_ok=True)
        except OSError as e:
            log.warning("checkpoint retention could not delete an old file; retrying at the next save",
                        error=str(e), directory=str(self.directory))

    # -- pointer -----------------------------------------------------------------------------------

    def history(self) -> list[CheckpointInfo]:
        """Retained checkpoints, newest save first; [] before the first save. CheckpointError if unreadable."""
        try:
            raw = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CheckpointError("bad_pointer", f"{POINTER_FILE}: {e}", self.pointer_path) from e
        try:
            obj = json.loads(raw)
            if obj.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {obj.get('format')!r}")
            history = [CheckpointInfo.from_json(h) for h in obj["history"]]
            latest = CheckpointInfo.from_json(obj["latest"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError("bad_pointer", f"{POINTER_FILE}: {type(e).__name__}: {e}", self.pointer_path) from e
        if not history or history[0] != latest:
            raise CheckpointError("bad_pointer", f"{POINTER_FILE}: latest is not the head of history",
                                  self.pointer_path)
        return history

    def _history_or_empty(self) -> list[CheckpointInfo]:
        try:
            return self.history()
        except CheckpointError as e:
            # The save running now replaces the broken pointer; rebuild its history from the files
            # (verified again on load) so retention does not delete the older checkpoints.
            recovered = self._history_from_files()
            log.warning("checkpoint pointer unreadable; history rebuilt from files", error=str(e),
                        recovered=len(recovered))
            return recovered

    def _history_from_files(self) -> list[CheckpointInfo]:
        found: list[tuple[float, CheckpointInfo]] = []
        for path in self.directory.glob("ckpt-*.pt"):
            if not _NAME_RE.match(path.name):
                continue
            try:
                sha = _read_sidecar(path)
                st = path.stat()
            except (CheckpointError, OSError):
                continue
            step, epoch = int(path.name[6:16]), int(path.name[18:24])
            found.append((st.st_mtime, CheckpointInfo(file=path.name, sha256=sha, epoch=epoch, step=step,
                                                      size_bytes=st.st_size, created_at_ms=int(st.st_mtime * 1000))))
        return [info for _, info in sorted(found, key=lambda t: t[0], reverse=True)]

    def latest_info(self) -> CheckpointInfo | None:
        history = self.history()
        return history[0] if history else None

    # -- load --------------------------------------------------------------------------------------

    def load(self, info: CheckpointInfo) -> Checkpoint:
        """One retained checkpoint, verified against its sidecar *and* the pointer's sha256, and written
        by this store's run (when it has a run id). Runs share `TOLARIA_VAR_DIR/checkpoints`, and the
        pointer's history carries an earlier run's entries until retention drops them: a rollback that
        restored one would put another run's weights into this one whenever the shapes happen to fit."""
        path = self.directory / info.file
        if self.keys is not None:  # before anything is read: the pointer's sha is what the MAC vouches for
            _verify_mac(path, info.sha256, self.keys)
        ckpt = read_checkpoint(path, expected_sha256=info.sha256)
        if (ckpt.epoch, ckpt.step) != (info.epoch, info.step):
            raise CheckpointError("pointer_mismatch", f"{info.file} holds epoch {ckpt.epoch} step {ckpt.step}", path)
        if self.run_id and ckpt.run_id != self.run_id:
            raise CheckpointError("foreign_run", f"{info.file} belongs to run {ckpt.run_id!r}, not {self.run_id!r}",
                                  path)
        return ckpt

    def load_latest(self) -> Checkpoint | None:
        """The checkpoint `latest.json` names, verified; None before the first save."""
        info = self.latest_info()
        return None if info is None else self.load(info)

    def load_at_or_before(self, step: int | None = None) -> tuple[Checkpoint, list[CheckpointError]]:
        """The most recently saved retained checkpoint with step <= `step` (any step if None) that verifies.

        Newer or broken ones are passed over; the broken ones come back in the list (or, when none
        qualifies, in the CheckpointError("no_checkpoint")'s `skipped`), so nothing is skipped silently.
        """
        skipped: list[CheckpointError] = []
        for info in self.history():
            if step is not None and info.step > step:
                continue
            try:
                return self.load(info), skipped
            except CheckpointError as e:
                skipped.append(e)
        detail = "no checkpoint saved" if not skipped else f"{len(skipped)} checkpoints failed verification"
        where = "" if step is None else f" at or before step {step}"
        raise CheckpointError("no_checkpoint", f"{detail}{where}", self.directory, skipped=tuple(skipped))

    def restore_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Checkpoint | None:
        """Load the latest checkpoint into `model`/`optimizer` (resume after a restart); None if there is none."""
        ckpt = self.load_latest()
        if ckpt is not None:
            ckpt.restore(model, optimizer)
        return ckpt
