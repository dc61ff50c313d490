"""Oona's one typed settings object (`ESPER_*` env vars; defaults follow the prototype's StreamConfig)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from esper.core.errors import ConfigurationError
from esper.core.settings import EsperSettings
from esper.leyline import DEFAULT_MAX_MESSAGE_BYTES, SigningKeys


class OonaSettings(EsperSettings):
    service_name: str = "oona"
    leyline_secret: SecretStr | None = Field(None, description="HMAC key; required (no default outside embedded mode)")
    leyline_key_id: str = Field("k1", description="id of the current key, carried in every envelope")
    leyline_previous_secret: SecretStr | None = Field(None, description="previous key, still accepted on receipt")
    leyline_previous_key_id: str | None = Field(None, description="id of the previous key")

    freshness_window_ms: int = Field(60_000, description="envelopes older than this are stale")
    max_clock_skew_ms: int = Field(5_000, description="envelopes further in the future are refused")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, description="size cap checked before decoding")
    replay_cache_size: int = Field(4096, description="message ids remembered for replay detection")

    read_batch: int = Field(50, description="entries per XREADGROUP per lane (emergency latency grows with it)")
    block_ms: int = Field(200, description="BLOCK of the consume read; the socket timeout sits above it")
    emergency_poll_ms: float = Field(
        1.0, description="batch-ack consumers peek at the emergency lane this often while handling a normal batch"
    )
    visibility_timeout_ms: int = Field(30_000, description="pending entries idle this long are reclaimed")
    claim_interval_ms: int = Field(1_000, description="how often a consumer runs XAUTOCLAIM")
    max_deliveries: int = Field(5, description="deliveries before an entry is dead-lettered")
    done_ttl_ms: int = Field(900_000, description="how long a consumer remembers processed ids (redelivery dedupe)")

    emergency_max_per_min: int = Field(120, description="emergency-lane token bucket (prototype 120/min)")
    emergency_maxlen_floor: int = Field(10_000, description="emergency lanes are never trimmed below this")
    deadletter_maxlen: int = Field(100_000, description="approximate cap of oona.deadletter")
    reply_maxlen: int = Field(1_000, description="approximate cap of a requester's reply stream")

    socket_timeout_s: float = Field(2.0, description="socket timeout of non-blocking commands")
    connect_timeout_s: float = Field(2.0, description="TCP connect timeout")
    max_connections: int = Field(16, description="BlockingConnectionPool size for commands")
    redis_retries: int = Field(3, description="redis-py retries (exponential backoff) per command")
    breaker_failures: int = Field(3, description="failures that open the publish/consume breaker")
    breaker_reset_s: float = Field(
        5.0, description="open publish breaker fails fast this long before HALF_OPEN (prototype: 30 s)"
    )
    consume_breaker_reset_s: float = Field(
        1.0, description="open consume breaker pauses reads this long; short so consumers resume soon after an outage"
    )

    # Stream keeper (`python -m esper.oona`).
    keeper_interval_s: float = Field(5.0, description="reclaim / trim / gauge refresh period")
    message_ttl_ms: int = Field(900_000, description="normal lanes trimmed by XTRIM MINID now - ttl")
    reply_stream_ttl_ms: int = Field(3_600_000, description="keeper deletes reply streams idle this long")

    def signing_keys(self) -> SigningKeys:
        """The HMAC keys, or a clear error: there is no default secret."""
        if self.leyline_secret is None:
            raise ConfigurationError("ESPER_LEYLINE_SECRET is not set; every Oona envelope must be signed")
        prev = self.leyline_previous_secret
        try:
            return SigningKeys(
                key_id=self.leyline_key_id,
                secret=self.leyline_secret.get_secret_value().encode(),
                previous_key_id=self.leyline_previous_key_id if prev is not None else None,
                previous_secret=prev.get_secret_value().encode() if prev is not None else None,
            )
        except ValueError as e:
            raise ConfigurationError(f"invalid Leyline keys: {e}") from e

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ConfigurationError("ESPER_REDIS_URL is not set")
        return self.redis_url
