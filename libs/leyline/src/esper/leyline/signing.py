"""HMAC-SHA256 envelope signing with key rotation.

The signature covers the envelope serialised deterministically with `signature` empty, so every
routing field (reply_to, deadline, priority, ...) is authenticated, not just the payload. `key_id`
names the key: verification accepts the current and the previous key, so a rotation never drops
in-flight traffic.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from esper.leyline._generated import leyline_pb2 as pb
from esper.leyline.errors import SignatureError

MIN_SECRET_BYTES = 16


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """Current key (signs and verifies) plus an optional previous key (verifies only)."""

    key_id: str
    secret: bytes
    previous_key_id: str | None = None
    previous_secret: bytes | None = None

    def __post_init__(self) -> None:
        if not self.key_id:
            raise ValueError("key_id must not be empty")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret must be at least {MIN_SECRET_BYTES} bytes")
        if self.previous_key_id is not None and not self.previous_key_id:
            raise ValueError("previous_key_id must not be empty")
        if (self.previous_key_id is None) != (self.previous_secret is None):
            raise ValueError("previous_key_id and previous_secret go together")
        if self.previous_key_id == self.key_id:
            raise ValueError("previous_key_id must differ from key_id")
        if self.previous_secret is not None and len(self.previous_secret) < MIN_SECRET_BYTES:
            raise ValueError(f"previous secret must be at least {MIN_SECRET_BYTES} bytes")

    def secret_for(self, key_id: str) -> bytes | None:
        if key_id == self.key_id:
            return self.secret
        if self.previous_key_id is not None and key_id == self.previous_key_id:
            return self.previous_secret
        return None


def hmac_sha256(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def _signing_bytes(env: pb.BusEnvelope) -> bytes:
    sig = env.signature
    env.signature = b""
    try:
        return env.SerializeToString(deterministic=True)
    finally:
        env.signature = sig


def sign_envelope(env: pb.BusEnvelope, keys: SigningKeys) -> pb.BusEnvelope:
    """Sign in place with the current key and return the envelope."""
    env.key_id = keys.key_id
    env.signature = b""
    env.signature = hmac_sha256(keys.secret, env.SerializeToString(deterministic=True))
    return env


# `signature` is field 13 (wire type 2): tag byte 0x6a, then a one-byte length for a 32-byte MAC.
_SIGNATURE_TAG = b"\x6a\x20"


def _signed_prefix(env: pb.BusEnvelope, raw: bytes | None) -> bytes:
    """The bytes the signer MACed. Deterministic serialisation writes fields in number order, so a
    conforming sender's signature field is the last 34 bytes and the rest is exactly the envelope
    serialised with `signature` empty: reuse it instead of serialising again (hot path). Any other
    layout (another serialiser) is re-serialised; both paths are equally strict."""
    if raw is not None and len(env.signature) == 32 and raw.endswith(_SIGNATURE_TAG + env.signature):
        return raw[: -len(_SIGNATURE_TAG) - 32]
    return _signing_bytes(env)


def verify_envelope(env: pb.BusEnvelope, keys: SigningKeys, *, raw: bytes | None = None) -> None:
    """Raise SignatureError (with the precise dead-letter reason) unless the signature holds.

    `raw`, when given, must be the bytes `env` was parsed from (saves a re-serialisation).
    """
    if not env.signature:
        raise SignatureError("envelope is unsigned", reason=pb.DEAD_LETTER_REASON_MISSING_SIGNATURE)
    secret = keys.secret_for(env.key_id)
    if secret is None:
        raise SignatureError(f"unknown key_id {env.key_id!r}", reason=pb.DEAD_LETTER_REASON_UNKNOWN_KEY)
    expected = hmac_sha256(secret, _signed_prefix(env, raw))
    if not hmac.compare_digest(expected, env.signature):
        raise SignatureError("signature mismatch", reason=pb.DEAD_LETTER_REASON_BAD_SIGNATURE)


# -- AdaptationCommand signatures -----------------------------------------------------------------
# Commands carry their own signature (ARCHITECTURE §9): Kasmina verifies it before executing,
# independently of the envelope that carried it. As in the prototype, the signature lives in
# `annotations["signature"]` (base64 HMAC-SHA256 over the command serialised deterministically
# without that annotation), with the key id beside it in `annotations["signature_key_id"]`.

COMMAND_SIGNATURE = "signature"
COMMAND_KEY_ID = "signature_key_id"


def _command_signing_bytes(cmd: pb.AdaptationCommand) -> bytes:
    copy = pb.AdaptationCommand()
    copy.CopyFrom(cmd)
    copy.annotations.pop(COMMAND_SIGNATURE, None)
    return copy.SerializeToString(deterministic=True)


def sign_command(cmd: pb.AdaptationCommand, keys: SigningKeys) -> pb.AdaptationCommand:
    """Sign in place (the caller has set command_id and issued_at) and return the command."""
    if not cmd.command_id:
        raise SignatureError("command has no command_id", reason=pb.DEAD_LETTER_REASON_MISSING_ID)
    cmd.annotations[COMMAND_KEY_ID] = keys.key_id
    mac = hmac_sha256(keys.secret, _command_signing_bytes(cmd))
    cmd.annotations[COMMAND_SIGNATURE] = base64.b64encode(mac).decode("ascii")
    return cmd


def verify_command(cmd: pb.AdaptationCommand, keys: SigningKeys) -> None:
    """Raise SignatureError (missing_signature / unknown_key / bad_signature) unless it holds."""
    sig = cmd.annotations.get(COMMAND_SIGNATURE)
    if not sig:
        raise SignatureError("command is unsigned", reason=pb.DEAD_LETTER_REASON_MISSING_SIGNATURE)
    secret = keys.secret_for(cmd.annotations.get(COMMAND_KEY_ID, ""))
    if secret is None:
        raise SignatureError("command signed with an unknown key", reason=pb.DEAD_LETTER_REASON_UNKNOWN_KEY)
    try:
        given = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SignatureError(f"signature is not base64: {e}") from e
    if not hmac.compare_digest(hmac_sha256(secret, _command_signing_bytes(cmd)), given):
        raise SignatureError("command signature mismatch")
