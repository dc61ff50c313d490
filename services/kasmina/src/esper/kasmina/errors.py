"""Kasmina's exception tree. Failures are explicit (ARCHITECTURE §6): a command that cannot run, a
kernel that cannot be fetched, a stage change the lifecycle forbids — each is a typed error with a
stable reason code, never a silent fallback."""

from __future__ import annotations

from esper.core.errors import DependencyViolationError, EsperError

__all__ = ["CommandRejected", "IllegalTransitionError", "KasminaError", "KernelFetchError"]


class KasminaError(EsperError):
    """Base of Kasmina's own errors (the dependency violations below derive from core's class)."""


class IllegalTransitionError(KasminaError, ValueError):
    """A lifecycle transition that is not in the table (see ``lifecycle.TRANSITIONS``)."""

    def __init__(self, seed_id: str, from_stage: int, to_stage: int) -> None:
        from esper.kasmina.lifecycle import stage_name

        super().__init__(f"{seed_id}: illegal transition {stage_name(from_stage)} -> {stage_name(to_stage)}")
        self.seed_id = seed_id
        self.from_stage = from_stage
        self.to_stage = to_stage


class CommandRejected(DependencyViolationError):
    """An ``AdaptationCommand`` Kasmina refuses to execute; ``reason`` is a stable code
    (``missing_signature``, ``nonce_replayed``, ``missing_confidence_logits``, ``illegal_transition``...)."""

    def __init__(self, reason: str, detail: str = "", *, command_id: str = "", seed_id: str = "") -> None:
        super().__init__(f"command {command_id or '<no id>'} rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail
        self.command_id = command_id
        self.seed_id = seed_id


class KernelFetchError(DependencyViolationError):
    """A kernel could not be obtained (``reason``: ``timeout``, ``breaker_open``, ``bus_unavailable``,
    ``artifact_not_found``, ``missing_artifact``, ``checksum_mismatch``, ``artifact_format``,
    ``artifact_io``, ``rebuild_failed``, ``slot_mismatch``, ``missing_id``, ``unexpected_reply``).
    There is never a fallback kernel."""

    def __init__(self, reason: str, detail: str = "", *, kernel_id: str = "") -> None:
        super().__init__(f"kernel {kernel_id or '?'}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail
        self.kernel_id = kernel_id
