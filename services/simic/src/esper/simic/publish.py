"""Publishing a policy checkpoint as a signed `PolicyUpdate` on `policy` (what `esper policy publish` calls).

The checkpoint is decoded first with Tamiyo's own reader (`weights_only=True`, format and fields), so
nothing Tamiyo would refuse as `invalid_payload` leaves Simic; the architecture, registries and shapes
are Tamiyo's to check against what it serves. The envelope is signed by the Oona client
(HMAC-SHA256, `ESPER_LEYLINE_SECRET`); `policy_id` defaults to the checkpoint's content hash, so
publishing the same bytes twice is refused by Tamiyo as a `duplicate_update` instead of applied twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from esper.core.clock import now_ms
from esper.leyline import pb
from esper.oona import OonaClient
from esper.tamiyo.checkpoint import decode_checkpoint
from esper.tamiyo.updates import UPDATE_MESSAGE_VERSION

__all__ = ["build_update", "publish_policy"]


def _read(checkpoint: Path | str | bytes) -> bytes:
    if isinstance(checkpoint, bytes):
        return checkpoint
    return Path(checkpoint).read_bytes()


def build_update(checkpoint: Path | str | bytes, *, policy_id: str | None = None, training_run_id: str = "",
                 issued_at_ms: int | None = None) -> pb.PolicyUpdate:
    """The `PolicyUpdate` for a checkpoint file or its bytes. Raises `PolicyUpdateRejected` (Tamiyo's
    reasons) when the checkpoint is not one Tamiyo could even read."""
    data = _read(checkpoint)
    decoded = decode_checkpoint(data)
    update = pb.PolicyUpdate(version=UPDATE_MESSAGE_VERSION,
                             policy_id=policy_id or f"simic-{hashlib.sha256(data).hexdigest()[:16]}",
                             training_run_id=training_run_id, tamiyo_policy_version=decoded.policy_version,
                             payload=data)
    update.issued_at.FromMilliseconds(now_ms() if issued_at_ms is None else issued_at_ms)
    return update


async def publish_policy(client: OonaClient, checkpoint: Path | str | bytes, *, policy_id: str | None = None,
                         training_run_id: str = "", issued_at_ms: int | None = None) -> pb.PolicyUpdate:
    """Publish `checkpoint` (a path or the bytes of `encode_checkpoint`) on `policy`, signed; returns
    the update sent. `client` must be connected. Raises `PolicyUpdateRejected` for an unreadable
    checkpoint and Oona's `PublishError` when the bus refuses it."""
    update = build_update(checkpoint, policy_id=policy_id, training_run_id=training_run_id,
                          issued_at_ms=issued_at_ms)
    await client.publish("policy", update)
    return update
