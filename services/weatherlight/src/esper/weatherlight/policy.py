"""`esper policy show`: the live policy as Tamiyo persisted it, and the newest update on the bus.

Reads Tamiyo's on-disk pointer (`current.json`, a documented JSON format) and the `policy` stream
without importing Tamiyo; the checkpoint's sha256 is re-checked so a tampered file shows as such.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import redis

from esper.core.errors import ConfigurationError
from esper.leyline import CHANNELS, EnvelopeError, decode_envelope, pb, unpack_as, verify_envelope
from esper.oona.settings import OonaSettings

POINTER_FILE = "current.json"


def disk_policy(policy_dir: Path) -> dict[str, Any]:
    pointer = policy_dir / POINTER_FILE
    if not pointer.exists():
        return {"present": False, "policy_dir": str(policy_dir),
                "note": "no policy installed: Tamiyo serves its initial (untrained) weights"}
    try:
        meta = json.loads(pointer.read_text())
        data = (policy_dir / str(meta["file"])).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"present": False, "policy_dir": str(policy_dir), "error": f"unreadable: {e}"}
    return {"present": True, "policy_dir": str(policy_dir), **meta, "bytes": len(data),
            "sha256_ok": hashlib.sha256(data).hexdigest() == meta.get("sha256")}


def bus_policy(settings: OonaSettings) -> dict[str, Any]:
    """The newest PolicyUpdate on `policy` (signature checked when the secret is known)."""
    try:
        url = settings.require_redis_url()
    except ConfigurationError:
        return {"reachable": False, "note": "ESPER_REDIS_URL not set"}
    try:
        with redis.Redis.from_url(url, socket_timeout=5) as r:
            rows: Any = r.xrevrange(CHANNELS["policy"].stream("normal"), count=1)
            depth = int(r.xlen(CHANNELS["policy"].stream("normal")))
    except redis.RedisError as e:
        return {"reachable": False, "error": str(e)}
    if not rows:
        return {"reachable": True, "updates": 0}
    _entry_id, fields = rows[0]
    raw = fields.get(b"payload", b"")
    try:
        env = decode_envelope(raw, max_bytes=settings.max_message_bytes * 64)
        verified: bool | None = None
        if settings.leyline_secret is not None:
            verify_envelope(env, settings.signing_keys(), raw=raw)
            verified = True
        update = unpack_as(env, pb.PolicyUpdate)
    except EnvelopeError as e:
        return {"reachable": True, "updates": depth, "newest": {"error": f"{type(e).__name__}: {e}"}}
    return {"reachable": True, "updates": depth, "newest": {
        "policy_id": update.policy_id, "tamiyo_policy_version": update.tamiyo_policy_version,
        "training_run_id": update.training_run_id, "issued_at": update.issued_at.ToJsonString(),
        "payload_bytes": len(update.payload), "sender": env.sender, "signature_verified": verified}}
