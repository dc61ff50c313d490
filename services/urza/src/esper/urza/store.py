"""Content-addressed artifact files: `<root>/<hex[:2]>/<hex>`, written atomically.

A file is written to a temporary name in its final directory, fsynced, renamed over its final name
and the directory fsynced: after `put` returns, the artifact survives a crash or power loss, and a
reader never sees a partial file. The name *is* the sha256, so writes are idempotent and every read
is verified against the checksum it was asked for.
"""

from __future__ import annotations

from pathlib import Path

from esper.core.files import fsync_dir, write_bytes_atomic
from esper.urza.artifact import Artifact, artifact_ref, checksum, hex_of_ref, load_artifact
from esper.urza.errors import ArtifactFormatError, ChecksumMismatchError, MissingArtifactError

__all__ = ["ArtifactStore"]



_VERIFIED_CAP = 4096  # files remembered as verified (a set cleared when full: cheap, bounded)


class ArtifactStore:
    """The artifact directory (`URZA_ARTIFACT_DIR`). Safe for several processes: files are immutable."""

    def __init__(self, root: Path) -> None:
        self._verified: set[tuple[str, str, int, int, int, int]] = set()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, ref: str) -> Path:
        hexdigest = hex_of_ref(ref)
        return self.root / hexdigest[:2] / hexdigest

    def put(self, data: bytes) -> str:
        """Store `data` durably; returns its ref `sha256:<hex>` (a no-op when already stored intact)."""
        digest = checksum(data)
        ref = artifact_ref(digest)
        final = self.path_for(ref)
        if final.exists():
            try:
                self.get(ref, digest)
                return ref
            except ChecksumMismatchError:
                pass  # a damaged copy: overwrite it with the good bytes below
        folder = final.parent
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        write_bytes_atomic(final, data)
        return ref

    def get(self, ref: str, expected_checksum: str) -> bytes:
        """The bytes of `ref`, verified: missing file → MissingArtifactError; a ref that disagrees with
        `expected_checksum` or bytes that do not hash to it → ChecksumMismatchError."""
        path = self.path_for(ref)
        if hex_of_ref(ref) != expected_checksum:
            raise ChecksumMismatchError(f"ref {ref} does not carry checksum {expected_checksum[:80]}")
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise MissingArtifactError(f"artifact {ref} is not in {self.root}") from e
        except IsADirectoryError as e:
            raise ArtifactFormatError(f"artifact path {path} is a directory") from e
        actual = checksum(data)
        if actual != expected_checksum:
            raise ChecksumMismatchError(f"artifact {ref} on disk hashes to {actual}")
        return data

    def verify(self, ref: str, expected_checksum: str) -> None:
        """`get` without returning the bytes, and without re-hashing a file already verified whose
        inode, size, mtime and ctime are unchanged (ctime cannot be set back from user space, so any
        write since the last check forces a re-hash). Serves repeated prefetches of one kernel."""
        path = self.path_for(ref)
        try:
            st = path.stat()
        except FileNotFoundError as e:
            raise MissingArtifactError(f"artifact {ref} is not in {self.root}") from e
        key = (ref, expected_checksum, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in self._verified:
            return
        self.get(ref, expected_checksum)
        if len(self._verified) >= _VERIFIED_CAP:
            self._verified.clear()
        self._verified.add(key)

    def load(self, ref: str, expected_checksum: str, *, expected_guard_digest: str | None = None) -> Artifact:
        """`get` + `load_artifact`, and (for a `KernelArtifactReady`) the promised guard digest."""
        artifact = load_artifact(self.get(ref, expected_checksum), expected_checksum)
        if expected_guard_digest is not None and artifact.guard_digest != expected_guard_digest:
            raise ArtifactFormatError(
                f"artifact {ref} has guard digest {artifact.guard_digest}, expected {expected_guard_digest}")
        return artifact

    def exists(self, ref: str) -> bool:
        return self.path_for(ref).is_file()
