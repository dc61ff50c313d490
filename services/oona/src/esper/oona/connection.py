"""redis-py asyncio clients configured per ARCHITECTURE §4's pitfalls.

- Commands share a `BlockingConnectionPool` (callers wait for a connection instead of opening
  unbounded ones) with an explicit socket timeout and bounded exponential-backoff retries.
- Every blocking read (XREADGROUP/XREAD BLOCK) gets its *own* single connection whose socket
  timeout sits above the BLOCK, so a slow read never times out mid-reply or blocks a publisher.
- We never wrap a command on a shared connection in `wait_for`: cancelling mid-reply would leave
  the connection desynchronised. Request deadlines are enforced on futures instead.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

RETRYABLE = (RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError)


def command_client(
    url: str, *, socket_timeout_s: float, connect_timeout_s: float, max_connections: int, retries: int
) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout_s,  # how long to wait for a free pooled connection
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        # Retry only connection errors: a timed-out XADD may have been applied, and re-sending it
        # would duplicate the entry (consumers would then dead-letter the copy as `replayed`). The
        # Retry's own list must say so: redis-py adds `retry_on_error` to its default (connection
        # *and* timeout errors), so a stalled Redis had each XADD re-sent 3 times (8 s, duplicates).
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), retries, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
        retry_on_timeout=False,
        health_check_interval=30,
    )
    return Redis.from_pool(pool)  # the client owns (and on aclose disconnects) its pool


def blocking_client(url: str, *, block_ms: int, connect_timeout_s: float) -> Redis:
    """A dedicated single-connection client for one blocking reader; no retries (the loop backs off)."""
    return Redis.from_url(
        url,
        single_connection_client=True,
        socket_timeout=block_ms / 1000.0 + 2.0,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 0),
    )
