"""The blueprint library: a SQLite catalogue beside the content-addressed artifact store.

SQLite in WAL mode with `synchronous=FULL` and a busy timeout, so several processes can use the same
files at once: Urza answers queries while Tezzeret registers kernels and Urabrask writes safety sheets,
each through its own `UrzaLibrary`. Every write is one `BEGIN IMMEDIATE` transaction, committed and
fsynced when the call returns; a kernel's artifact file is made durable *before* its row is
committed, so a row never names a file that a crash lost.

One instance may be shared by threads (calls are serialised on a lock); it blocks on disk, so async
code calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from esper.core.clock import now_ms
from esper.karn.template import KarnError, SlotShape
from esper.leyline import pb
from esper.urza.artifact import checksum, load_artifact
from esper.urza.errors import ArtifactFormatError, UnknownBlueprintError, UnknownKernelError
from esper.urza.records import (
    KERNEL_COLUMNS,
    KernelRecord,
    check_timing,
    decode_descriptor,
    decode_extras,
    encode_extras,
    entry_from_row,
    record_from_row,
    to_json_dict,
)
from esper.urza.store import ArtifactStore

__all__ = ["UrzaLibrary"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blueprints (
    blueprint_id TEXT PRIMARY KEY,
    descriptor BLOB NOT NULL,
    tier TEXT NOT NULL,
    extras TEXT NOT NULL DEFAULT '{}',
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kernels (
    kernel_id TEXT PRIMARY KEY,
    blueprint_id TEXT NOT NULL,
    slot TEXT NOT NULL,
    artifact_ref TEXT NOT NULL,
    checksum TEXT NOT NULL,
    guard_digest TEXT NOT NULL,
    compile_ms REAL NOT NULL,
    prewarm_p50_ms REAL NOT NULL,
    prewarm_p95_ms REAL NOT NULL,
    registered_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kernels_by_blueprint ON kernels (blueprint_id, registered_at_ms);
"""


def _slot_key(slot: SlotShape | str) -> str:
    if isinstance(slot, SlotShape):
        return slot.as_key()
    try:
        return SlotShape.from_key(slot).as_key()
    except KarnError as e:
        raise ArtifactFormatError(str(e)) from e


class UrzaLibrary:
    """Catalogue (`db_path`) + artifacts (`artifact_root`). Close it when done (or use `with`)."""

    def __init__(self, db_path: Path | str, artifact_root: Path | str, *, busy_timeout_ms: int = 10_000) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.store = ArtifactStore(Path(artifact_root))
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit below; the lock makes the connection thread-safe.
        self._db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False,
                                   timeout=busy_timeout_ms / 1000.0)
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UrzaLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, waits on busy)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # -- blueprints --------------------------------------------------------------------------------

    def upsert_blueprint(self, descriptor: pb.BlueprintDescriptor, graph: pb.BlueprintGraph | None = None) -> None:
        """Insert or replace a blueprint's descriptor (and its graph, when given); other extras are kept."""
        with self._write() as db:
            self._upsert(db, descriptor, graph)

    @staticmethod
    def _upsert(db: sqlite3.Connection, descriptor: pb.BlueprintDescriptor, graph: pb.BlueprintGraph | None) -> None:
        bid = descriptor.blueprint_id
        if not bid:
            raise ValueError("blueprint descriptor without blueprint_id")
        row = db.execute("SELECT extras FROM blueprints WHERE blueprint_id = ?", (bid,)).fetchone()
        extras = decode_extras(row[0]) if row else {}
        if graph is not None:
            extras["graph"] = to_json_dict(graph)
        db.execute(
            "INSERT INTO blueprints (blueprint_id, descriptor, tier, extras, updated_at_ms) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (blueprint_id) DO UPDATE SET descriptor = excluded.descriptor, tier = excluded.tier, "
            "extras = excluded.extras, updated_at_ms = excluded.updated_at_ms",
            (bid, descriptor.SerializeToString(deterministic=True), pb.BlueprintTier.Name(descriptor.tier),
             encode_extras(extras), now_ms()),
        )

    def set_extra(self, blueprint_id: str, key: str, json_value: Any) -> None:
        """Set `extras[key]` of a known blueprint to a JSON value (UnknownBlueprintError otherwise)."""
        with self._write() as db:
            row = db.execute("SELECT extras FROM blueprints WHERE blueprint_id = ?", (blueprint_id,)).fetchone()
            if row is None:
                raise UnknownBlueprintError(f"no blueprint {blueprint_id!r} in the catalogue")
            extras = decode_extras(row[0])
            extras[key] = json_value
            db.execute("UPDATE blueprints SET extras = ?, updated_at_ms = ? WHERE blueprint_id = ?",
                       (encode_extras(extras), now_ms(), blueprint_id))

    def set_bsds(self, bsds: pb.BSDS) -> None:
        """Store Urabrask's safety sheet in `extras["bsds"]` (served with every catalogue entry)."""
        if not bsds.blueprint_id:
            raise ValueError("BSDS without blueprint_id")
        self.set_extra(bsds.blueprint_id, "bsds", to_json_dict(bsds))

    def extras(self, blueprint_id: str) -> dict[str, Any]:
        rows = self._read("SELECT extras FROM blueprints WHERE blueprint_id = ?", (blueprint_id,))
        if not rows:
            raise UnknownBlueprintError(f"no blueprint {blueprint_id!r} in the catalogue")
        return decode_extras(rows[0][0])

    def blueprints(self) -> list[pb.BlueprintDescriptor]:
        """Every descriptor, by blueprint id."""
        rows = self._read("SELECT descriptor FROM blueprints ORDER BY blueprint_id")
        return [decode_descriptor(blob) for (blob,) in rows]

    def catalog_entries(self, blueprint_ids: Iterable[str] = (), include_graph: bool = False,
                        ) -> list[pb.BlueprintCatalogEntry]:
        """Entries for `blueprint_ids` (all when empty; unknown ids are left out), by blueprint id."""
        ids = sorted(set(blueprint_ids))
        if ids:
            marks = ",".join("?" * len(ids))
            rows = self._read(f"SELECT descriptor, extras FROM blueprints WHERE blueprint_id IN ({marks}) "
                              "ORDER BY blueprint_id", ids)
        else:
            rows = self._read("SELECT descriptor, extras FROM blueprints ORDER BY blueprint_id")
        return [entry_from_row(blob, extras, include_graph=include_graph) for blob, extras in rows]

    def seed_from_karn(self, slot: SlotShape | str | None = None) -> int:
        """Register every Karn template's descriptor (and its graph for `slot`, where the template fits
        that slot), in one transaction. Returns how many blueprints were written."""
        from esper.karn.catalogue import CATALOGUE
        from esper.karn.graph import blueprint_graph, descriptor

        shape = SlotShape.from_key(_slot_key(slot)) if slot is not None else None
        rows: list[tuple[pb.BlueprintDescriptor, pb.BlueprintGraph | None]] = []
        # Graphs carry weight norms of a freshly built module: a fixed seed makes them the same on every
        # start, and the forked RNG leaves the caller's random stream alone.
        with torch.random.fork_rng(devices=[]):
            for template in CATALOGUE.values():
                graph = None
                if shape is not None and shape.kind in template.slot_kinds:
                    torch.manual_seed(0)
                    graph = blueprint_graph(template, shape)
                rows.append((descriptor(template), graph))
        with self._write() as db:
            for desc, graph in rows:
                self._upsert(db, desc, graph)
        return len(rows)

    # -- kernels -----------------------------------------------------------------------------------

    def register_kernel(self, blueprint_id: str, slot: SlotShape | str, data: bytes, *, compile_ms: float,
                        prewarm_p50_ms: float, prewarm_p95_ms: float) -> KernelRecord:
        """Store an artifact and (re)register it as kernel `<blueprint_id>@<slot>`.

        The bytes must load as an artifact (weights only, valid schema and guard digest) made for this
        blueprint and slot, or ArtifactFormatError. The file is durable before the row commits.
        """
        slot_key = _slot_key(slot)
        timings = (check_timing("compile_ms", compile_ms), check_timing("prewarm_p50_ms", prewarm_p50_ms),
                   check_timing("prewarm_p95_ms", prewarm_p95_ms))
        digest = checksum(data)
        artifact = load_artifact(data, digest)
        if (artifact.blueprint_id, artifact.slot) != (blueprint_id, slot_key):
            raise ArtifactFormatError(f"artifact is for {artifact.kernel_id}, not {blueprint_id}@{slot_key}")
        record = KernelRecord(
            kernel_id=artifact.kernel_id, blueprint_id=blueprint_id, slot=slot_key,
            artifact_ref=self.store.put(data), checksum=digest, guard_digest=artifact.guard_digest,
            compile_ms=timings[0], prewarm_p50_ms=timings[1], prewarm_p95_ms=timings[2], registered_at_ms=now_ms(),
        )
        with self._write() as db:
            # REPLACE gives the row a new rowid: the tie-breaker of "most recently registered".
            db.execute(f"INSERT OR REPLACE INTO kernels ({KERNEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.kernel_id, record.blueprint_id, record.slot, record.artifact_ref, record.checksum,
                        record.guard_digest, record.compile_ms, record.prewarm_p50_ms, record.prewarm_p95_ms,
                        record.registered_at_ms))
        return record

    def kernel(self, kernel_or_blueprint_id: str) -> KernelRecord:
        """`BP001@v64` exactly, or for a plain `BP001` its most recently registered kernel."""
        if "@" in kernel_or_blueprint_id:
            rows = self._read(f"SELECT {KERNEL_COLUMNS} FROM kernels WHERE kernel_id = ?", (kernel_or_blueprint_id,))
        else:
            rows = self._read(f"SELECT {KERNEL_COLUMNS} FROM kernels WHERE blueprint_id = ? "
                              "ORDER BY registered_at_ms DESC, rowid DESC LIMIT 1", (kernel_or_blueprint_id,))
        if not rows:
            raise UnknownKernelError(f"no kernel registered for {kernel_or_blueprint_id!r}")
        return record_from_row(rows[0])

    def kernels(self, blueprint_id: str | None = None) -> list[KernelRecord]:
        """Every kernel (of one blueprint), by kernel id."""
        if blueprint_id is None:
            rows = self._read(f"SELECT {KERNEL_COLUMNS} FROM kernels ORDER BY kernel_id")
        else:
            rows = self._read(f"SELECT {KERNEL_COLUMNS} FROM kernels WHERE blueprint_id = ? ORDER BY kernel_id",
                              (blueprint_id,))
        return [record_from_row(r) for r in rows]

    def verify_kernel(self, kernel_or_blueprint_id: str) -> KernelRecord:
        """The kernel's record once its artifact is known to be intact (as `fetch_artifact`, but the
        bytes stay on disk and an unchanged, already verified file is not hashed again)."""
        record = self.kernel(kernel_or_blueprint_id)
        self.store.verify(record.artifact_ref, record.checksum)
        return record

    def fetch_artifact(self, kernel_or_blueprint_id: str) -> tuple[KernelRecord, bytes]:
        """The kernel's record and its verified bytes (UnknownKernelError, MissingArtifactError,
        ChecksumMismatchError)."""
        record = self.kernel(kernel_or_blueprint_id)
        return record, self.store.get(record.artifact_ref, record.checksum)
