"""Deterministic categorical registries: strings (seed ids, layer types, ...) to embedding indices.

Why not first-come numbering (the prototype's): it depends on the order keys arrive, so Tamiyo and
Simic, or two Tamiyo replicas, number the same key differently unless they share one file, and its
overflow path used Python's per-process salted ``hash()``. Here a key's *home slot* is a stable
hash of the key alone (blake2b, 64 bits) into ``1 .. vocab_size - 1``, so while keys do not collide
(the normal case: tens of keys in 1023 slots) every process computes the same index with no shared
state at all. A collision is resolved by linear probing; that choice depends on which key came
first, so the assignment is persisted (JSON with a sha256 digest) and a policy checkpoint records
the digest it was trained with (ARCHITECTURE §7). Index 0 is reserved for "absent": the graph
builder writes ``index / vocab_size`` into feature columns, so 0 there means "no category".

When every slot is taken a new key shares its home slot (the deterministic hashing trick) and is
counted in ``overflow_total`` so telemetry can report it; nothing random, nothing silent.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from esper.core.errors import EsperError
from esper.core.files import write_bytes_atomic
from esper.tamiyo.schema import SMALL_VOCAB_SIZE, VOCAB_SIZE

__all__ = [
    "REGISTRY_FILE",
    "REGISTRY_NAMES",
    "REGISTRY_SPECS",
    "SCHEME",
    "CategoryRegistry",
    "RegistryMismatchError",
    "RegistrySet",
    "canonical_json",
    "write_json_atomic",
]

SCHEME: Final[str] = "blake2b64-home-slot+linear-probe/1"
FORMAT_VERSION: Final[int] = 1
REGISTRY_FILE: Final[str] = "registries.json"

# The six registries and their vocabulary sizes (prototype: 1024, 256 for optimizer / hazard).
REGISTRY_SPECS: Final[tuple[tuple[str, int], ...]] = (
    ("seed", VOCAB_SIZE),
    ("blueprint", VOCAB_SIZE),
    ("layer_type", VOCAB_SIZE),
    ("activation_type", VOCAB_SIZE),
    ("optimizer_family", SMALL_VOCAB_SIZE),
    ("hazard_class", SMALL_VOCAB_SIZE),
)
REGISTRY_NAMES: Final[tuple[str, ...]] = tuple(name for name, _ in REGISTRY_SPECS)


class RegistryMismatchError(EsperError):
    """A persisted registry cannot be trusted: corrupt, tampered, or not the one expected.

    ``reason`` is a short stable code for telemetry (``corrupt``, ``digest_mismatch``,
    ``name_mismatch``, ``vocab_mismatch``, ``scheme_mismatch``, ``invalid_entry``,
    ``expected_digest_mismatch``, ``missing_registry``).
    """

    def __init__(self, registry: str, reason: str, detail: str) -> None:
        super().__init__(f"registry {registry!r}: {reason}: {detail}")
        self.registry = registry
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[RegistryMismatchError], tuple[str, str, str]]:
        return (type(self), (self.registry, self.reason, self.detail))


def canonical_json(obj: object) -> bytes:
    """The one serialisation digests are taken over (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON so a reader sees the old file or the new one, never a torn mix (esper.core.files)."""
    write_bytes_atomic(Path(path), json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False,
                                              allow_nan=False).encode())


def _home_slot(key: str, vocab_size: int) -> int:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return 1 + h % (vocab_size - 1)


class CategoryRegistry:
    """Maps strings to stable indices in ``1 .. vocab_size - 1`` (0 = absent). Thread-safe."""

    __slots__ = ("_lock", "_table", "_taken", "name", "overflow_total", "vocab_size")

    def __init__(self, name: str, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (slot 0 is reserved), got {vocab_size}")
        self.name = name
        self.vocab_size = vocab_size
        self.overflow_total = 0
        self._table: dict[str, int] = {}
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def entries(self) -> dict[str, int]:
        """A copy of the key → index table."""
        with self._lock:
            return dict(self._table)

    def adopt(self, entries: Mapping[str, int]) -> None:
        """Record known assignments for new keys whose index is free (collision-resolved keys from
        another process keep their index here too); keys we already have, or taken slots, are skipped."""
        with self._lock:
            for key, index in entries.items():
                if key not in self._table and index not in self._taken and 0 < index < self.vocab_size:
                    self._table[key] = index
                    self._taken.add(index)

    def index(self, key: str) -> int:
        """The key's index, assigning one on first sight (never 0; see the module docstring)."""
        found = self._table.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._table.get(key)
            if found is not None:
                return found
            return self._assign(key)

    def _assign(self, key: str) -> int:
        home = _home_slot(key, self.vocab_size)
        if len(self._taken) >= self.vocab_size - 1:
            self.overflow_total += 1
            return home
        slot = home
        while slot in self._taken:
            slot = slot + 1 if slot < self.vocab_size - 1 else 1
        self._table[key] = slot
        self._taken.add(slot)
        return slot

    # -- persistence -------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "scheme": SCHEME,
            "vocab_size": self.vocab_size,
            "entries": dict(self._table),
        }

    def digest(self) -> str:
        """sha256 of the canonical content: name, vocabulary, scheme and every assignment."""
        with self._lock:
            body = self._body()
        return hashlib.sha256(canonical_json(body)).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The persisted form: the content plus its digest."""
        with self._lock:
            body = self._body()
        body["digest"] = hashlib.sha256(canonical_json(body)).hexdigest()
        return body

    @classmethod
    def from_json(cls, obj: object, *, name: str, vocab_size: int) -> CategoryRegistry:
        """Rebuild from :meth:`to_json` output, verifying it is intact and the one expected."""
        if not isinstance(obj, Mapping):
            raise RegistryMismatchError(name, "corrupt", f"expected an object, got {type(obj).__name__}")
        body = {k: v for k, v in obj.items() if k != "digest"}
        stored = obj.get("digest")
        try:
            actual = hashlib.sha256(canonical_json(body)).hexdigest()
        except (TypeError, ValueError) as exc:
            raise RegistryMismatchError(name, "corrupt", str(exc)) from exc
        if stored != actual:
            raise RegistryMismatchError(name, "digest_mismatch", f"stored {stored!r}, content hashes to {actual!r}")
        checks = (
            ("format", FORMAT_VERSION, "corrupt"),
            ("name", name, "name_mismatch"),
            ("scheme", SCHEME, "scheme_mismatch"),
            ("vocab_size", vocab_size, "vocab_mismatch"),
        )
        for field, expected, reason in checks:
            if body.get(field) != expected:
                raise RegistryMismatchError(name, reason, f"{field} is {body.get(field)!r}, expected {expected!r}")
        entries = body.get("entries")
        if not isinstance(entries, Mapping):
            raise RegistryMismatchError(name, "corrupt", "entries is not an object")
        reg = cls(name, vocab_size)
        for key, idx in entries.items():
            if type(idx) is not int or not 1 <= idx < vocab_size or idx in reg._taken:
                raise RegistryMismatchError(name, "invalid_entry", f"{key!r} -> {idx!r}")
            reg._table[key] = idx
            reg._taken.add(idx)
        return reg

    def save(self, path: Path) -> str:
        """Persist atomically; returns the digest written."""
        obj = self.to_json()
        write_json_atomic(Path(path), obj)
        return str(obj["digest"])

    @classmethod
    def load(cls, path: Path, *, name: str, vocab_size: int) -> CategoryRegistry:
        """Load and verify one registry file (``FileNotFoundError`` if it is not there)."""
        return cls.from_json(_read_json(Path(path), name), name=name, vocab_size=vocab_size)

    def __repr__(self) -> str:
        return f"CategoryRegistry({self.name!r}, vocab_size={self.vocab_size}, entries={len(self._table)})"


def _read_json(path: Path, name: str) -> object:
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryMismatchError(name, "corrupt", f"{path}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RegistrySet:
    """The six registries Tamiyo and Simic must agree on, saved together in one file.

    One file, not six, so a save is one atomic replace: a crash can never leave a mix of old and
    new registries on disk.
    """

    seed: CategoryRegistry
    blueprint: CategoryRegistry
    layer_type: CategoryRegistry
    activation_type: CategoryRegistry
    optimizer_family: CategoryRegistry
    hazard_class: CategoryRegistry

    @classmethod
    def new(cls) -> RegistrySet:
        """Empty registries with the standard names and vocabulary sizes."""
        return cls(*(CategoryRegistry(name, vocab) for name, vocab in REGISTRY_SPECS))

    def __iter__(self) -> Iterator[CategoryRegistry]:
        return iter((self.seed, self.blueprint, self.layer_type, self.activation_type,
                     self.optimizer_family, self.hazard_class))

    def digest(self) -> str:
        """sha256 over every registry's digest, in the fixed order of ``REGISTRY_SPECS``."""
        return hashlib.sha256(canonical_json([[r.name, r.digest()] for r in self])).hexdigest()

    def save(self, directory: Path) -> str:
        """Write ``<directory>/registries.json`` atomically; returns the set digest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        registries = {r.name: r.to_json() for r in self}
        digest = hashlib.sha256(
            canonical_json([[name, registries[name]["digest"]] for name in REGISTRY_NAMES])
        ).hexdigest()
        write_json_atomic(directory / REGISTRY_FILE, {"format": FORMAT_VERSION, "registries": registries,
                                                      "digest": digest})
        return digest

    @classmethod
    def load(cls, directory: Path, *, expected_digest: str | None = None) -> RegistrySet:
        """Load and verify; ``expected_digest`` (e.g. from a policy checkpoint) must match if given."""
        obj = _read_json(Path(directory) / REGISTRY_FILE, "*")
        if not isinstance(obj, Mapping) or not isinstance(obj.get("registries"), Mapping):
            raise RegistryMismatchError("*", "corrupt", "no registries object")
        stored = obj["registries"]
        for name in REGISTRY_NAMES:
            if name not in stored:
                raise RegistryMismatchError(name, "missing_registry", f"not in {directory}")
        loaded = cls(*(CategoryRegistry.from_json(stored[name], name=name, vocab_size=vocab)
                       for name, vocab in REGISTRY_SPECS))
        digest = loaded.digest()
        if obj.get("digest") != digest:
            raise RegistryMismatchError("*", "digest_mismatch", f"stored {obj.get('digest')!r}, content {digest!r}")
        if expected_digest is not None and expected_digest != digest:
            detail = f"expected {expected_digest!r}, got {digest!r}"
            raise RegistryMismatchError("*", "expected_digest_mismatch", detail)
        return loaded

    def schema_digest(self) -> str:
        """sha256 of what fixes the meaning of an index: format, scheme, names and vocabulary sizes.

        Unlike :meth:`digest` it does not change as keys arrive, so a checkpoint can be checked
        against a live set that has seen more (or fewer) keys than the one it was trained with.
        """
        return hashlib.sha256(
            canonical_json([FORMAT_VERSION, SCHEME, [[r.name, r.vocab_size] for r in self]])).hexdigest()

    def entries(self) -> dict[str, dict[str, int]]:
        """Every registry's key → index table (copies)."""
        return {r.name: r.entries() for r in self}

    def check_compatible(self, schema_digest: str, entries: Mapping[str, Mapping[str, int]]) -> None:
        """Raise unless a policy trained with (`schema_digest`, `entries`) reads our indices as it was trained.

        Same scheme and vocabularies, no key both sides know at different indices, and no key the
        checkpoint knows whose index we gave to another key (the policy would confuse the two).
        """
        if schema_digest != self.schema_digest():
            raise RegistryMismatchError("*", "schema_mismatch",
                                        f"checkpoint schema {schema_digest[:12]}, live {self.schema_digest()[:12]}")
        for registry in self:
            theirs = entries.get(registry.name, {})
            mine = registry.entries()
            owners = {index: key for key, index in mine.items()}
            conflicts = [key for key, index in theirs.items()
                         if mine.get(key, index) != index or owners.get(index, key) != key]
            if conflicts:
                raise RegistryMismatchError(registry.name, "conflicting_entry",
                                            f"{len(conflicts)} keys indexed differently, e.g. {sorted(conflicts)[:3]}")

    def adopt(self, entries: Mapping[str, Mapping[str, int]]) -> None:
        """Take the checkpoint's assignments for keys we have not seen (after `check_compatible`)."""
        for registry in self:
            registry.adopt(entries.get(registry.name, {}))
