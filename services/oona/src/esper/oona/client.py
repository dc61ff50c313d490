"""The Oona client every Esper process uses: signed publish, request/reply, dead letters.

Hot-path habits (ARCHITECTURE §4): one round trip per publish, replies and acks pipelined by the
consumer, metrics children pre-bound, no extra reads. IO lives here; checks are in `inbound`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from esper.core.breaker import CircuitBreaker
from esper.core.clock import now_ms
from esper.core.deadline import Deadline
from esper.core.errors import BreakerOpenError
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet, packet_priority
from esper.leyline import (
    CHANNELS,
    DEADLETTER_STREAM,
    Channel,
    EnvelopeError,
    Lane,
    ReplayCache,
    SigningKeys,
    channel,
    encode_envelope,
    lane_for,
    new_message_id,
    pack,
    pb,
    reason_code,
    sign_envelope,
)
from esper.oona.connection import RETRYABLE, blocking_client, command_client
from esper.oona.delivery import Delivery
from esper.oona.errors import EmergencyRateLimitedError, OonaError, PublishError, RequestTimeoutError, SetupError
from esper.oona.inbound import PAYLOAD_FIELD, InboundPolicy, best_effort_ids, validate_entry
from esper.oona.metrics import OonaMetrics
from esper.oona.ratelimit import TokenBucket
from esper.oona.settings import OonaSettings

log = get_logger("esper.oona.client")

REPLY_PREFIX = "oona.{reply."
# Streams a reply may be written to: private reply streams and per-run command channels. Anything
# else (above all a channel lane, whose MAXLEN a reply would trim) is refused.
REPLY_TARGET_PREFIXES = (REPLY_PREFIX, "oona.{command.")


def valid_reply_target(stream: str) -> bool:
    return stream.startswith(REPLY_TARGET_PREFIXES) and stream.endswith("}") and stream.count("{") == 1


@dataclass(frozen=True, slots=True)
class Published:
    stream: str
    entry_id: str
    message_id: str
    lane: Lane


def _as_channel(ch: str | Channel) -> Channel:
    return ch if isinstance(ch, Channel) else channel(ch)


class OonaClient:
    """Signed access to Oona's streams. Create with `from_settings`, `await connect()`, `await close()`."""

    def __init__(self, *, settings: OonaSettings, keys: SigningKeys, sender: str, metrics: OonaMetrics | None = None):
        self.settings = settings
        self.keys = keys
        self.sender = sender
        self.metrics = metrics or OonaMetrics()
        self.url = settings.require_redis_url()
        self.redis: Redis = command_client(
            self.url,
            socket_timeout_s=settings.socket_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            max_connections=settings.max_connections,
            retries=settings.redis_retries,
        )
        self.policy = InboundPolicy(
            keys=keys,
            max_bytes=settings.max_message_bytes,
            window_ms=settings.freshness_window_ms,
            max_skew_ms=settings.max_clock_skew_ms,
        )
        self.conservative = False  # when set, everything rides the emergency lane (ARCHITECTURE §4)
        self.publish_breaker = self._breaker("publish")
        self._bucket = TokenBucket(settings.emergency_max_per_min)
        # Bus telemetry (dead-letter events) has its own bucket: forged traffic must not use up the
        # process's quota for its own emergencies.
        self._telemetry_bucket = TokenBucket(settings.emergency_max_per_min)
        self._reply_stream = f"{REPLY_PREFIX}{sender}.{uuid.uuid4().hex[:12]}}}"
        self._pending: dict[str, asyncio.Future[Delivery]] = {}
        # One reader task reads the reply stream while any request waits, and wakes each requester
        # through its future; a requester gives up at its own deadline, whatever the read is doing.
        self._reply_reader: asyncio.Task[None] | None = None
        self._reply_conn: Redis | None = None
        self._reply_last_id: bytes = b"0-0"
        self._reply_replay = ReplayCache(capacity=settings.replay_cache_size, ttl_ms=2 * settings.freshness_window_ms)
        self._closed = False
        self._close_finished = False

    @classmethod
    def from_settings(
        cls, settings: OonaSettings, *, sender: str | None = None, metrics: OonaMetrics | None = None
    ) -> OonaClient:
        return cls(settings=settings, keys=settings.signing_keys(), sender=sender or settings.service_name,
                   metrics=metrics)

    def _breaker(self, name: str, *, reset_timeout_s: float | None = None) -> CircuitBreaker:
        s = self.settings

        def on_transition(bname: str, old: int, new: int) -> None:
            self.metrics.record_breaker(bname, new)
            log.warning("breaker transition", breaker=bname, old=old, new=new)

        br = CircuitBreaker(name, failure_threshold=s.breaker_failures,
                            reset_timeout_s=s.breaker_reset_s if reset_timeout_s is None else reset_timeout_s,
                            on_transition=on_transition)
        self.metrics.record_breaker(name, br.state)
        return br

    # -- lifecycle ---------------------------------------------------------------------------------

    async def connect(self, *, attempts: int = 20, delay_s: float = 0.25) -> None:
        """PING until Redis answers, logging each failed attempt (arq's create_pool habit)."""
        for attempt in range(1, attempts + 1):
            try:
                await self.redis.ping()
                return
            except RETRYABLE as e:
                log.warning("redis not reachable", url=self.url, attempt=attempt, error=str(e))
                if attempt == attempts:
                    raise PublishError(f"redis at {self.url} unreachable after {attempts} attempts") from e
                await asyncio.sleep(min(delay_s * attempt, 2.0))

    async def close(self) -> None:
        """Fail waiting requests, stop the reply reader, count late replies, delete the reply stream and
        close the connections. A close() that was cancelled part way is finished by the next one."""
        if self._close_finished:
            return
        self._closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(OonaError("client closed while the request was waiting"))
        reader, self._reply_reader = self._reply_reader, None
        if reader is not None and not reader.done():
            # A cancelled read drops its connection, but on Python 3.11 redis-py's `wait_for` around the
            # send swallows a cancel that lands there, and the read then runs its whole BLOCK: wait a
            # moment, then close the connection under it (the reader sees the client closed and stops).
            # `asyncio.wait`, not `await reader`: a cancel of the task running close() still propagates.
            reader.cancel()
            await asyncio.wait([reader], timeout=0.05)
        if self._reply_conn is not None:
            await self._reply_conn.aclose()  # a read still blocked on it ends now
            with contextlib.suppress(*RETRYABLE):  # count replies that came after their requester gave up
                await self._read_replies(block_ms=0, conn=self.redis)
                await self.redis.delete(self._reply_stream)
        if reader is not None and not reader.done():
            await asyncio.wait([reader], timeout=1.0)
        await self.redis.aclose()
        self._close_finished = True

    async def __aenter__(self) -> OonaClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def blocking_connection(self) -> Redis:
        s = self.settings
        return blocking_client(self.url, block_ms=s.block_ms, connect_timeout_s=s.connect_timeout_s)

    # -- envelopes ---------------------------------------------------------------------------------

    def seal(
        self,
        message: Message,
        *,
        priority: pb.MessagePriority.ValueType = pb.MESSAGE_PRIORITY_NORMAL,
        deadline_ms: int = 0,
        reply_to: str = "",
        correlation_id: str = "",
        message_id: str | None = None,
        attributes: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
    ) -> tuple[pb.BusEnvelope, bytes]:
        """Pack and sign; refuse (before touching Redis) anything over the size cap."""
        env = pack(message, sender=self.sender, issued_at_ms=now_ms(), priority=priority, message_id=message_id,
                   correlation_id=correlation_id, reply_to=reply_to, deadline_ms=deadline_ms, attributes=attributes)
        raw = encode_envelope(sign_envelope(env, self.keys))
        cap = max_bytes or self.settings.max_message_bytes
        if len(raw) > cap:
            raise PublishError(f"envelope is {len(raw)} bytes, cap is {cap}")
        return env, raw

    def route(self, ch: Channel, env: pb.BusEnvelope) -> tuple[Lane, str, int]:
        """Lane, stream and approximate MAXLEN for an envelope on a channel."""
        lane = lane_for(env.priority, message_type=env.message_type, conservative=self.conservative)
        if ch.emergency_only:
            lane = "emergency"
        if lane == "emergency":
            return lane, ch.emergency_stream, max(self.settings.emergency_maxlen_floor, ch.maxlen)
        return lane, ch.stream(lane), ch.maxlen

    def _take_emergency_token(self, ch: Channel) -> None:
        if not self._bucket.try_take():
            self.metrics.emergency_rate_limited.labels(ch.name).inc()
            raise EmergencyRateLimitedError(
                f"emergency lane of {ch.name!r} over {self.settings.emergency_max_per_min}/min; message not sent"
            )

    # -- publish -----------------------------------------------------------------------------------

    async def publish(
        self,
        ch: str | Channel,
        message: Message,
        *,
        priority: pb.MessagePriority.ValueType = pb.MESSAGE_PRIORITY_NORMAL,
        deadline_ms: int = 0,
        reply_to: str = "",
        correlation_id: str = "",
        message_id: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> Published:
        """Sign and XADD one message. Raises PublishError (typed subclasses); blocks at most
        `socket_timeout_s` per attempt (connection errors are retried `redis_retries` times, timeouts
        never); an open breaker fails fast."""
        chan = _as_channel(ch)
        env, raw = self.seal(message, priority=priority, deadline_ms=deadline_ms, reply_to=reply_to,
                             correlation_id=correlation_id, message_id=message_id, attributes=attributes,
                             max_bytes=chan.max_message_bytes)
        lane, stream, maxlen = self.route(chan, env)
        if lane == "emergency":
            self._take_emergency_token(chan)
        entry_id = await self._xadd(chan.name, lane, stream, raw, maxlen, approximate=not chan.exact_trim)
        return Published(stream, entry_id, env.message_id, lane)

    async def publish_raw(self, stream: str, fields: Mapping[Any, Any], *, maxlen: int = 0) -> str:
        """Write arbitrary entry fields (drills and fuzzing use it to inject hostile input)."""
        entry_id = await self.redis.xadd(stream, dict(fields), maxlen=maxlen or None, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def _check_publish_breaker(self, chname: str) -> None:
        """Fail fast (typed, counted) while the publish breaker is open: the caller never stalls."""
        try:
            self.publish_breaker.check()
        except BreakerOpenError as e:
            self.metrics.record_publish_error(chname, "breaker_open")
            raise PublishError(f"publish breaker open, retry in {e.retry_after_s:.1f}s") from e

    async def _xadd(self, chname: str, lane: Lane, stream: str, raw: bytes, maxlen: int, *,
                    approximate: bool = True) -> str:
        self._check_publish_breaker(chname)
        t0 = time.perf_counter()
        try:
            entry_id = await self.redis.xadd(stream, {PAYLOAD_FIELD: raw}, maxlen=maxlen, approximate=approximate)
        except RETRYABLE as e:
            self.publish_breaker.record_failure()
            self.metrics.record_publish_error(chname, "redis")
            raise PublishError(f"XADD {stream} failed: {e}") from e
        self.publish_breaker.record_success()
        self.metrics.record_publish(chname, lane, time.perf_counter() - t0)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def publish_many(
        self,
        ch: str | Channel,
        messages: Sequence[Message],
        *,
        priority: pb.MessagePriority.ValueType = pb.MESSAGE_PRIORITY_NORMAL,
    ) -> list[str]:
        """Pipelined publish of a batch (one round trip); returns the entry ids in order."""
        chan = _as_channel(ch)
        if not messages:
            return []
        self._check_publish_breaker(chan.name)
        pipe = self.redis.pipeline(transaction=False)
        lane: Lane = "normal"
        for m in messages:
            env, raw = self.seal(m, priority=priority, max_bytes=chan.max_message_bytes)
            lane, stream, maxlen = self.route(chan, env)
            if lane == "emergency":
                self._take_emergency_token(chan)
            pipe.xadd(stream, {PAYLOAD_FIELD: raw}, maxlen=maxlen, approximate=not chan.exact_trim)
        t0 = time.perf_counter()
        try:
            ids = await pipe.execute()
        except RETRYABLE as e:
            self.publish_breaker.record_failure()
            self.metrics.record_publish_error(chan.name, "redis")
            raise PublishError(f"pipelined XADD to {chan.name} failed: {e}") from e
        self.publish_breaker.record_success()
        self.metrics.record_publish(chan.name, lane, time.perf_counter() - t0, len(messages))
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    # -- request / reply ---------------------------------------------------------------------------

    @property
    def reply_stream(self) -> str:
        return self._reply_stream

    async def request(
        self,
        ch: str | Channel,
        message: Message,
        *,
        timeout_ms: float,
        priority: pb.MessagePriority.ValueType = pb.MESSAGE_PRIORITY_NORMAL,
        attributes: Mapping[str, str] | None = None,
    ) -> Delivery:
        """Publish with `reply_to`/`correlation_id`/`deadline_ms` and wait for the verified reply.

        Raises RequestTimeoutError at the deadline. A reply that arrives after its requester gave up
        is discarded and counted (`oona_late_replies_total`) when the reply stream is next read.
        """
        if self._closed:  # it would publish, wait out its deadline, and re-create the deleted reply stream
            raise OonaError("client closed: no request can be made")
        chan = _as_channel(ch)
        deadline = Deadline.after_ms(timeout_ms)
        correlation_id = new_message_id()
        fut: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = fut
        t0 = time.perf_counter()
        try:
            # The publish is bounded by the request's own deadline, not by socket timeouts and retries
            # (redis-py drops a connection whose command is cancelled, so nothing is left mid-reply).
            async with asyncio.timeout(deadline.remaining_s()):
                await self.publish(chan, message, priority=priority, deadline_ms=deadline.epoch_ms,
                                   reply_to=self._reply_stream, correlation_id=correlation_id,
                                   attributes=attributes)
            reply = await self._await_reply(fut, deadline)
        except TimeoutError as e:
            self.metrics.request_timeouts.labels(chan.name).inc()
            raise RequestTimeoutError(f"no reply on {chan.name} within {timeout_ms} ms") from e
        finally:
            self._pending.pop(correlation_id, None)
        self.metrics.request_latency.labels(chan.name).observe(time.perf_counter() - t0)
        return reply

    async def _await_reply(self, fut: asyncio.Future[Delivery], deadline: Deadline) -> Delivery:
        """Wait for `fut` until the deadline, by the client's clock.

        The reader's XREAD BLOCK cannot keep the deadline: Redis times a blocked read out on its own
        cron (every 100 ms at the default `hz 10`), so a 5 ms budget took ~100 ms when no reply came.
        The read runs in its own task (`_read_loop`) and is never cancelled mid-reply; the requester
        stops waiting at its deadline, and a reply that lands after it is counted as late.
        """
        if self._reply_reader is None or self._reply_reader.done():
            self._reply_reader = asyncio.create_task(self._read_loop(), name=f"oona-replies-{self.sender}")
        try:
            async with asyncio.timeout(deadline.remaining_s()):  # at the deadline `fut` is cancelled: a late reply
                return await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # dispatched in the loop pass the deadline fired in: it made it
                return fut.result()
            raise

    async def _read_loop(self) -> None:
        """Read the reply stream while any request waits, dispatching each reply to its future."""
        try:
            while self._pending and not self._closed:
                try:
                    if await self._read_replies(block_ms=self.settings.block_ms):
                        await asyncio.sleep(0)  # the woken requesters run before the next read is sent
                except RETRYABLE as e:
                    if self._closed:  # close() closed the connection under the read
                        return
                    log.warning("reply stream read failed", error=str(e), stream=self._reply_stream)
                    await asyncio.sleep(0.05)
        except Exception as e:  # a Redis error reply (OOM, MISCONF): every waiting request gets it, typed
            log.warning("reply stream reader stopped", error=f"{type(e).__name__}: {e}", stream=self._reply_stream)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(e)

    async def _read_replies(self, *, block_ms: int, conn: Redis | None = None) -> bool:
        """Read and dispatch what the reply stream holds past the last id; True when it held anything.
        The blocking reads use the reader's own connection; `conn` serves one that does not block."""
        if conn is None:
            if self._reply_conn is None:
                self._reply_conn = self.blocking_connection()
            conn = self._reply_conn
        resp: Any = await conn.xread({self._reply_stream: self._reply_last_id}, count=100, block=block_ms or None)
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                self._reply_last_id = entry_id
                await self._on_reply(entry_id.decode(), fields)
        return bool(resp)

    def reply_entry(self, request: Delivery, message: Message) -> tuple[str, bytes] | None:
        """(stream, raw) of the signed reply to `request`, or None when it asked for no reply."""
        to = request.envelope.reply_to
        if not to:
            return None
        if not valid_reply_target(to):
            raise SetupError(f"refusing reply_to {to!r}: replies go to oona.{{reply.*}} or oona.{{command.*}}")
        _, raw = self.seal(message, correlation_id=request.envelope.correlation_id or request.message_id,
                           deadline_ms=request.envelope.deadline_ms, priority=request.envelope.priority)
        return to, raw

    async def _on_reply(self, entry_id: str, fields: Mapping[bytes, bytes]) -> None:
        now = now_ms()
        try:
            # A late reply fails freshness on its deadline: count it as late, not as hostile.
            env = validate_entry(fields, entry_id, policy=self.policy, now_ms=now, replay=self._reply_replay)
        except EnvelopeError as e:
            if e.reason == pb.DEAD_LETTER_REASON_EXPIRED:
                self.metrics.late_replies.inc()
                return
            await self.dead_letter(stream=self._reply_stream, entry_id=entry_id, fields=fields, error=e,
                                   group="", consumer=self.sender, channel_name="reply", deliveries=1)
            return
        fut = self._pending.get(env.correlation_id)
        if fut is None or fut.done():
            self.metrics.late_replies.inc()
            return
        fut.set_result(Delivery(env, "reply", self._reply_stream, entry_id, "normal"))

    # -- dead letters and bus telemetry ------------------------------------------------------------

    def telemetry_entry(self, event: pb.TelemetryEvent) -> tuple[str, bytes, int] | None:
        """(stream, raw, maxlen) of a telemetry packet carrying one bus event, or None when the
        emergency bucket refuses it (counted in `oona_telemetry_dropped_total`)."""
        packet = build_telemetry_packet(self.sender, events=[event])
        prio = packet_priority(packet)
        chan = CHANNELS["telemetry"]
        env, raw = self.seal(packet, priority=prio)  # type: ignore[arg-type]
        lane, stream, maxlen = self.route(chan, env)
        if lane == "emergency" and not self._telemetry_bucket.try_take():
            self.metrics.telemetry_dropped.labels("emergency_rate").inc()
            return None
        return stream, raw, maxlen

    def dead_letter_fields(
        self,
        *,
        stream: str,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        reason: pb.DeadLetterReason.ValueType,
        detail: str,
        group: str,
        consumer: str,
        deliveries: int,
    ) -> dict[bytes, bytes]:
        raw = fields.get(PAYLOAD_FIELD)
        if raw is None:  # keep whatever the entry had, byte for byte
            raw = b"\n".join(k + b"=" + v for k, v in fields.items())
        message_id, message_type = best_effort_ids(fields.get(PAYLOAD_FIELD), max_bytes=self.settings.max_message_bytes)
        # Small originals ride inside the signed record; big ones (oversize input) go beside it in
        # a plain `raw` field, so nothing is lost and the record itself stays under the cap.
        inline = len(raw) <= self.settings.max_message_bytes // 2
        record = pb.DeadLetterRecord(
            reason=reason, detail=detail[:2000], source_stream=stream, source_entry_id=entry_id, group=group,
            consumer=consumer, deliveries=deliveries, dead_at_ms=now_ms(), raw_payload=raw if inline else b"",
            message_id=message_id, message_type=message_type,
        )
        _, sealed = self.seal(record)
        out = {PAYLOAD_FIELD: sealed, b"reason": reason_code(reason).encode(), b"source": stream.encode()}
        if not inline:
            out[b"raw"] = raw
        return out

    def add_dead_letter(
        self,
        pipe: Pipeline,
        *,
        channel_name: str,
        stream: str,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        reason: pb.DeadLetterReason.ValueType,
        detail: str,
        group: str,
        consumer: str,
        deliveries: int,
    ) -> None:
        """Queue on `pipe`: the dead-letter entry and its telemetry event (the caller adds the XACK)."""
        dl = self.dead_letter_fields(stream=stream, entry_id=entry_id, fields=fields, reason=reason, detail=detail,
                                     group=group, consumer=consumer, deliveries=deliveries)
        pipe.xadd(DEADLETTER_STREAM, dl, maxlen=self.settings.deadletter_maxlen, approximate=True)  # type: ignore[arg-type]
        code = reason_code(reason)
        signature_problem = reason in (pb.DEAD_LETTER_REASON_BAD_SIGNATURE, pb.DEAD_LETTER_REASON_UNKNOWN_KEY,
                                       pb.DEAD_LETTER_REASON_MISSING_SIGNATURE)
        event = build_event(
            "oona.dead_letter.bad_signature" if signature_problem else "oona.dead_letter",
            level=pb.TELEMETRY_LEVEL_ERROR if signature_problem else pb.TELEMETRY_LEVEL_WARNING,
            description=f"{code}: {detail[:200]}",
            reason=code, stream=stream, entry_id=entry_id, group=group, consumer=consumer,
        )
        tel = self.telemetry_entry(event)
        if tel is not None:
            tstream, traw, tmaxlen = tel
            pipe.xadd(tstream, {PAYLOAD_FIELD: traw}, maxlen=tmaxlen, approximate=True)
        self.metrics.record_dead_letter(channel_name, code)
        log.warning("dead letter", reason=code, detail=detail[:200], stream=stream, entry_id=entry_id)

    async def dead_letter(
        self,
        *,
        stream: str,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        error: EnvelopeError,
        group: str,
        consumer: str,
        channel_name: str,
        deliveries: int,
    ) -> None:
        """Dead-letter one entry (plus telemetry, plus XACK when it belongs to a group) in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        self.add_dead_letter(pipe, channel_name=channel_name, stream=stream, entry_id=entry_id, fields=fields,
                             reason=error.reason, detail=error.detail, group=group, consumer=consumer,
                             deliveries=deliveries)
        if group:
            pipe.xack(stream, group, entry_id)
        await pipe.execute()

    # -- groups ------------------------------------------------------------------------------------

    async def ensure_group(self, ch: str | Channel, group: str) -> None:
        """Create `group` on every lane of the channel (MKSTREAM, from the start), tolerating BUSYGROUP."""
        chan = _as_channel(ch)
        for stream in chan.streams:
            await ensure_group_on(self.redis, stream, group)


async def ensure_group_on(redis: Redis, stream: str, group: str, *, start_id: str = "0") -> None:
    from redis.exceptions import ResponseError

    try:
        await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def decode_id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
