"""Command validation, before anything runs.

Security checks, in the prototype's order (REFERENCE_PROTOTYPE §4), each with its reason code:

1. ``verifier_unavailable`` — no signing keys configured: every command is refused;
2. ``missing_signature`` — no ``annotations["signature"]``;
3. ``invalid_signature`` — HMAC mismatch, unknown key id, or not base64;
4. ``missing_command_id``;
5. ``nonce_replayed`` — this command_id was accepted in the last 300 s;
6. ``issued_in_future`` — ``issued_at`` more than 5 s ahead of this clock;
7. ``stale_command`` — ``issued_at`` more than 60 s old, or (only after the nonce cache overflowed)
   not later than 5 s after an id it had to drop while still fresh (`CommandValidator`);
8. ``missing_timestamp`` — no ``issued_at``.

Then, for SEED/GERMINATE, the annotations Tamiyo attaches (``policy.annotate_blend_mode``):
``blend_mode`` (CONVEX when absent), ``blending_method`` (linear / cosine / warmup_hold; the
prototype's tanh curve when absent), CONFIDENCE needs ``confidence_logits`` (a JSON list of at least
two finite numbers: Tamiyo's logits, from which the gate is computed) and takes ``gate_k``,
``gate_tau``, ``alpha_lo``, ``alpha_hi``; CHANNEL needs a valid ``alpha_vec`` (JSON list of numbers in
[0, 1], matching ``alpha_vec_len`` when given); optional ``mesh_host_layers`` (JSON list or comma
separated host layer names the seed needs, checked by G3) and ``performance_status`` (G4).

A refusal is a :class:`CommandRejected` (a ``DependencyViolationError``) carrying the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from esper.core.clock import now_ms
from esper.kasmina.blending import (
    BLEND_MODES,
    DEFAULT_GATE_K,
    DEFAULT_GATE_TAU,
    SCHEDULE_KINDS,
    BlendMode,
    BlendSpec,
    ScheduleKind,
    confidence_gate_value,
)
from esper.kasmina.errors import CommandRejected
from esper.leyline import BoundedTTLMap, SignatureError, SigningKeys, pb, verify_command
from esper.leyline.signing import COMMAND_SIGNATURE

__all__ = [
    "ANNOTATION_REASONS",
    "MAX_ALPHA_VEC",
    "SECURITY_REASONS",
    "CommandValidator",
    "Germination",
    "parse_germination",
]

SECURITY_REASONS: Final[tuple[str, ...]] = (
    "verifier_unavailable", "missing_signature", "invalid_signature", "missing_command_id", "nonce_replayed",
    "issued_in_future", "stale_command", "missing_timestamp",
)
ANNOTATION_REASONS: Final[tuple[str, ...]] = (
    "invalid_blend_mode", "invalid_blending_method", "missing_confidence_logits", "invalid_confidence_logits",
    "invalid_gate_parameters", "missing_alpha_vec", "invalid_alpha_vec", "invalid_mesh_layers",
)
MAX_ALPHA_VEC: Final[int] = 4096
MAX_LOGITS: Final[int] = 1024

NONCE_TTL_MS: Final[int] = 300_000
MAX_FUTURE_MS: Final[int] = 5_000
MAX_AGE_MS: Final[int] = 60_000


class CommandValidator:
    """Signature, id, nonce and freshness checks (the prototype's order and codes).

    Nonces (command ids) are remembered for ``nonce_ttl_ms`` after acceptance. ``nonce_capacity``
    should exceed the number of commands that can arrive within ``max_age_ms``. If more arrive, ids
    are forgotten before their commands go stale, and a replay of one could pass the nonce check: so
    a command that may have been forgotten (issued no later than ``max_future_ms`` after the newest
    id dropped early) is refused as stale. The check fails closed, at the cost of refusing a command
    delayed that long, and only once the cache has overflowed.
    """

    def __init__(self, keys: SigningKeys | None, *, nonce_ttl_ms: int = NONCE_TTL_MS, nonce_capacity: int = 16_384,
                 max_future_ms: int = MAX_FUTURE_MS, max_age_ms: int = MAX_AGE_MS,
                 clock_ms: Callable[[], int] = now_ms) -> None:
        self.keys = keys
        self._nonces = BoundedTTLMap(capacity=nonce_capacity, ttl_ms=nonce_ttl_ms)
        self._max_future_ms = max_future_ms
        self._max_age_ms = max_age_ms
        self._clock_ms = clock_ms

    def validate(self, cmd: pb.AdaptationCommand) -> None:
        cid = cmd.command_id
        if self.keys is None:
            raise CommandRejected("verifier_unavailable", "no signing key configured", command_id=cid)
        if not cmd.annotations.get(COMMAND_SIGNATURE):
            raise CommandRejected("missing_signature", command_id=cid)
        try:
            verify_command(cmd, self.keys)
        except SignatureError as e:
            raise CommandRejected("invalid_signature", str(e), command_id=cid) from e
        if not cid:
            raise CommandRejected("missing_command_id")
        now = self._clock_ms()
        if self._nonces.get(cid, now) is not None:
            raise CommandRejected("nonce_replayed", command_id=cid)
        self._nonces.put(cid, "1", now)
        has_ts = cmd.HasField("issued_at")
        if has_ts:
            try:
                issued = cmd.issued_at.ToMilliseconds()
            except ValueError as e:  # seconds or nanos outside the Timestamp range: no time to judge it by
                raise CommandRejected("missing_timestamp", f"invalid issued_at: {e}"[:200], command_id=cid) from e
            if issued - now > self._max_future_ms:
                raise CommandRejected("issued_in_future", f"{issued - now} ms ahead", command_id=cid)
            if now - issued > self._max_age_ms:
                raise CommandRejected("stale_command", f"{now - issued} ms old", command_id=cid)
            forgotten = self._nonces.forgotten_until_ms
            if forgotten is not None and issued <= forgotten + self._max_future_ms:
                raise CommandRejected("stale_command", f"issued before the replay window still remembered "
                                      f"(nonce cache full: ids up to {now - forgotten} ms old dropped)",
                                      command_id=cid)
        else:
            raise CommandRejected("missing_timestamp", command_id=cid)


# -- GERMINATE annotations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Germination:
    """What a SEED/GERMINATE command's annotations ask for (numbers from ``parameters`` come later, after G0)."""

    blend: BlendSpec
    mesh_layers: tuple[str, ...] = ()
    performance_status: str = "nominal"


def _reject(reason: str, detail: str, cmd: pb.AdaptationCommand) -> CommandRejected:
    return CommandRejected(reason, detail, command_id=cmd.command_id, seed_id=cmd.target_seed_id)


def _number_list(text: str, *, limit: int) -> list[float]:
    """A JSON list of numbers (or a comma-separated list); ValueError otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [part for part in (p.strip() for p in text.split(",")) if part]
    if not isinstance(data, list) or not data or len(data) > limit:
        raise ValueError(f"expected a list of 1..{limit} numbers")
    out: list[float] = []
    for item in data:
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise ValueError(f"{item!r} is not a number")
        value = float(item)
        if not math.isfinite(value):
            raise ValueError(f"{item!r} is not finite")
        out.append(value)
    return out


def _float(ann: Mapping[str, str], key: str, default: float, cmd: pb.AdaptationCommand) -> float:
    text = ann.get(key)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise _reject("invalid_gate_parameters", f"{key}={text[:40]!r} is not a number", cmd) from None
    if not math.isfinite(value):
        raise _reject("invalid_gate_parameters", f"{key} is not finite", cmd)
    return value


def _confidence(ann: Mapping[str, str], cmd: pb.AdaptationCommand) -> dict[str, float]:
    k = _float(ann, "gate_k", DEFAULT_GATE_K, cmd)
    if k <= 0.0:  # 0 gives a NaN gate on extreme logits, a negative k turns the gate around
        raise _reject("invalid_gate_parameters", f"gate_k must be > 0, got {k}", cmd)
    tau = _float(ann, "gate_tau", DEFAULT_GATE_TAU, cmd)
    lo = _float(ann, "alpha_lo", 0.0, cmd)
    hi = _float(ann, "alpha_hi", 1.0, cmd)
    if not 0.0 <= lo <= hi <= 1.0:
        raise _reject("invalid_gate_parameters", f"need 0 <= alpha_lo <= alpha_hi <= 1, got {lo}, {hi}", cmd)
    text = ann.get("confidence_logits", "")
    if not text:
        raise _reject("missing_confidence_logits", "CONFIDENCE blending needs Tamiyo's logits", cmd)
    try:
        logits = _number_list(text, limit=MAX_LOGITS)
        if len(logits) < 2:
            raise ValueError("need at least two logits")
        gate = confidence_gate_value(logits, k, tau)
        if not math.isfinite(gate):
            raise ValueError(f"the gate is {gate} for these logits")
    except (ValueError, OverflowError) as e:
        raise _reject("invalid_confidence_logits", str(e), cmd) from None
    return {"gate_k": k, "gate_tau": tau, "alpha_lo": lo, "alpha_hi": hi, "gate": gate}


def _alpha_vec(ann: Mapping[str, str], cmd: pb.AdaptationCommand) -> tuple[float, ...]:
    text = ann.get("alpha_vec", "")
    if not text:
        raise _reject("missing_alpha_vec", "CHANNEL blending needs alpha_vec", cmd)
    try:
        vec = _number_list(text, limit=MAX_ALPHA_VEC)
    except (ValueError, OverflowError) as e:  # OverflowError: a JSON integer too large for a float
        raise _reject("invalid_alpha_vec", str(e), cmd) from None
    if any(not 0.0 <= v <= 1.0 for v in vec):
        raise _reject("invalid_alpha_vec", "entries must lie in [0, 1]", cmd)
    declared = ann.get("alpha_vec_len")
    if declared is not None and declared != str(len(vec)):
        raise _reject("invalid_alpha_vec", f"alpha_vec_len={declared[:20]} but {len(vec)} entries", cmd)
    return tuple(vec)


def _mesh_layers(ann: Mapping[str, str], cmd: pb.AdaptationCommand) -> tuple[str, ...]:
    text = ann.get("mesh_host_layers", "").strip()
    if not text:
        return ()
    data: object = text.split(",")  # names, comma separated: "0" is a name (an nn.Sequential child), not JSON 0
    if text[0] in '["{':
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _reject("invalid_mesh_layers", f"mesh_host_layers is not valid JSON: {e}"[:200], cmd) from e
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise _reject("invalid_mesh_layers", "mesh_host_layers must be a list of layer names", cmd)
    names = tuple(dict.fromkeys(x.strip() for x in data if x.strip()))
    if not names:
        raise _reject("invalid_mesh_layers", "mesh_host_layers is empty", cmd)
    return names


def parse_germination(cmd: pb.AdaptationCommand) -> Germination:
    """Check and parse a SEED/GERMINATE command's annotations (reason codes: ``ANNOTATION_REASONS``)."""
    ann = cmd.annotations
    mode_text = ann.get("blend_mode", "CONVEX").strip().upper() or "CONVEX"
    if mode_text not in BLEND_MODES:
        raise _reject("invalid_blend_mode", f"{mode_text[:40]!r} is not one of {BLEND_MODES}", cmd)
    mode: BlendMode = next(m for m in BLEND_MODES if m == mode_text)
    method_text = ann.get("blending_method", "tanh").strip().lower() or "tanh"
    if method_text not in SCHEDULE_KINDS:
        raise _reject("invalid_blending_method", f"{method_text[:40]!r} is not one of {SCHEDULE_KINDS}", cmd)
    schedule: ScheduleKind = next(k for k in SCHEDULE_KINDS if k == method_text)
    spec = BlendSpec(mode=mode, schedule=schedule)
    if mode == "CONFIDENCE":
        c = _confidence(ann, cmd)
        spec = BlendSpec(mode=mode, schedule=schedule, gate_k=c["gate_k"], gate_tau=c["gate_tau"],
                         alpha_lo=c["alpha_lo"], alpha_hi=c["alpha_hi"], gate=c["gate"])
    elif mode == "CHANNEL":
        spec = BlendSpec(mode=mode, schedule=schedule, alpha_vec=_alpha_vec(ann, cmd))
    status = ann.get("performance_status", "nominal").strip().lower() or "nominal"
    return Germination(blend=spec, mesh_layers=_mesh_layers(ann, cmd), performance_status=status)
