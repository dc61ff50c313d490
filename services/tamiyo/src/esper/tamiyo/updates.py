"""Live policy updates (`PolicyUpdate` on the `policy` channel): check, build aside, persist, swap.

Order matters: cheap checks on the message (version, id, freshness), then the payload decoded with
`weights_only=True` and built into a *new* model of the serving architecture (registry and shapes
checked), then persisted (content-addressed file + pointer), and only then swapped in with one
reference assignment. Any failure before the swap leaves the live policy and the stored one as they
were; the caller turns `PolicyUpdateRejected` into a `policy_update_rejected` event with its reason.
The envelope signature is checked earlier, by the Oona consumer; its rejections reach the service
through the consumer's dead-letter hook (`bus_rejection_reason`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch

from esper.leyline import pb
from esper.tamiyo.checkpoint import PolicyStore, PolicyUpdateRejected, StoredPolicy, decode_checkpoint
from esper.tamiyo.compile import CompiledPolicy
from esper.tamiyo.gnn import GNNConfig, TamiyoGNN
from esper.tamiyo.registry import RegistrySet

__all__ = ["UPDATE_MESSAGE_VERSION", "Candidate", "LivePolicy", "PolicyUpdater", "bus_rejection_reason", "check_update"]

UPDATE_MESSAGE_VERSION: Final[int] = 1
_CLOCK_SKEW_MS: Final[int] = 5_000

# Bus-level dead-letter codes on the `policy` channel → the prototype's rejection reasons.
_BUS_REASONS: Final[dict[str, str]] = {
    "bad_signature": "bad_signature", "missing_signature": "bad_signature", "unknown_key": "bad_signature",
    "stale": "stale_update", "from_future": "stale_update", "expired": "stale_update",
    "replayed": "duplicate_update", "undecodable": "invalid_payload", "oversize": "invalid_payload",
    "missing_id": "invalid_payload", "unknown_type": "invalid_payload", "max_deliveries": "swap_failed",
}


@dataclass(frozen=True, slots=True)
class LivePolicy:
    """What serves decisions, swapped as one object so weights and version label never disagree."""

    policy: CompiledPolicy
    version: str
    policy_id: str = ""
    issued_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A validated policy not yet live: the policy, its checkpoint bytes and registry assignments."""

    live: LivePolicy
    data: bytes
    registry_entries: dict[str, dict[str, int]]


def bus_rejection_reason(dead_letter_code: str) -> str | None:
    """The rejection reason for a dead-lettered `policy` entry; None for the handler's own rejections
    (already reported) and codes that are not about the update."""
    return _BUS_REASONS.get(dead_letter_code)


def check_update(update: pb.PolicyUpdate, live: LivePolicy, *, now_ms: int, verify: bool,
                 freshness_s: float) -> None:
    """The message-level checks (no payload work). `verify` adds the prototype's optional version
    and freshness checks (`TAMIYO_VERIFY_UPDATES`, `TAMIYO_UPDATE_FRESHNESS_SEC`; 0 = no age limit)."""
    if update.version != UPDATE_MESSAGE_VERSION:
        raise PolicyUpdateRejected("version_mismatch", f"message version {update.version}, expected "
                                                       f"{UPDATE_MESSAGE_VERSION}")
    if not update.policy_id:
        raise PolicyUpdateRejected("invalid_payload", "missing policy_id")
    if update.policy_id == live.policy_id:
        raise PolicyUpdateRejected("duplicate_update", f"policy {update.policy_id!r} is already live")
    if not verify:
        return
    if not update.tamiyo_policy_version:
        raise PolicyUpdateRejected("version_mismatch", "missing tamiyo_policy_version")
    if not update.HasField("issued_at"):
        raise PolicyUpdateRejected("stale_update", "missing issued_at")
    issued = update.issued_at.ToMilliseconds()
    if issued > now_ms + _CLOCK_SKEW_MS:
        raise PolicyUpdateRejected("stale_update", f"issued {issued - now_ms} ms in the future")
    if freshness_s > 0 and now_ms - issued > freshness_s * 1000.0:
        raise PolicyUpdateRejected("stale_update", f"issued {(now_ms - issued) / 1000:.1f} s ago "
                                                   f"(limit {freshness_s:g} s)")
    if issued <= live.issued_at_ms:
        raise PolicyUpdateRejected("stale_update", f"not newer than the live policy {live.version!r}")


class PolicyUpdater:
    """Builds a candidate `LivePolicy` from an update's payload, and persists accepted ones."""

    def __init__(self, *, config: GNNConfig, registries: RegistrySet, store: PolicyStore,
                 compile_enabled: bool, device: torch.device) -> None:
        self.config = config
        self.registries = registries
        self.store = store
        self.compile_enabled = compile_enabled
        self.device = device

    def prepare(self, update: pb.PolicyUpdate) -> Candidate:
        """Decode and validate the payload into a new (not yet live) policy. Blocking: run off-loop."""
        checkpoint = decode_checkpoint(update.payload)
        if update.tamiyo_policy_version and checkpoint.policy_version != update.tamiyo_policy_version:
            raise PolicyUpdateRejected("version_mismatch", f"message says {update.tamiyo_policy_version!r}, "
                                                           f"checkpoint says {checkpoint.policy_version!r}")
        model = checkpoint.build_model(self.config, self.registries)
        live = LivePolicy(self._serve(model), checkpoint.policy_version, update.policy_id,
                          update.issued_at.ToMilliseconds() if update.HasField("issued_at") else 0)
        return Candidate(live, update.payload, checkpoint.registry_entries)

    def commit(self, candidate: Candidate) -> LivePolicy:
        """Persist the candidate (what a restart loads), then adopt its registry assignments; the
        caller swaps it in after this returns. A failure here is `swap_failed` with nothing changed."""
        live = candidate.live
        try:
            self.store.save(candidate.data, policy_version=live.version, policy_id=live.policy_id,
                            issued_at_ms=live.issued_at_ms)
        except OSError as e:
            raise PolicyUpdateRejected("swap_failed", f"could not persist the policy: {e}") from e
        self.registries.adopt(candidate.registry_entries)
        return live

    def restore(self, stored: StoredPolicy) -> LivePolicy:
        """The stored policy, re-validated exactly as an update would be (start-up path)."""
        checkpoint = decode_checkpoint(stored.data)
        model = checkpoint.build_model(self.config, self.registries)
        self.registries.adopt(checkpoint.registry_entries)
        return LivePolicy(self._serve(model), stored.policy_version, stored.policy_id, stored.issued_at_ms)

    def _serve(self, model: TamiyoGNN) -> CompiledPolicy:
        return CompiledPolicy(model.to(self.device).eval(), enabled=self.compile_enabled)
