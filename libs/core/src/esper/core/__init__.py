"""Shared runtime for Esper processes: settings, logging, lifecycle, breakers, deadlines, telemetry.

Depends only on ``esper.leyline`` (imports flow services → oona → core → leyline).
"""

from esper.core.breaker import CircuitBreaker
from esper.core.clock import now_ms
from esper.core.deadline import Deadline, wait_for
from esper.core.errors import (
    BreakerOpenError,
    ConfigurationError,
    DeadlineExceededError,
    DependencyViolationError,
    EsperError,
    RedisBinaryNotFoundError,
)
from esper.core.health_server import HealthServer
from esper.core.heartbeat import Heartbeat, check_health
from esper.core.lifecycle import Lifecycle, run, tune_gc_for_hot_loop
from esper.core.logging import configure_logging, get_logger
from esper.core.redis_server import EmbeddedRedis, find_redis_server_binary, free_port
from esper.core.settings import EsperSettings
from esper.core.telemetry import (
    HIGH_PRIORITY_EVENTS,
    build_event,
    build_metric,
    build_telemetry_packet,
    event_name,
    event_priority,
    packet_priority,
)

__all__ = [
    "HIGH_PRIORITY_EVENTS",
    "BreakerOpenError",
    "CircuitBreaker",
    "ConfigurationError",
    "Deadline",
    "DeadlineExceededError",
    "DependencyViolationError",
    "EmbeddedRedis",
    "EsperError",
    "EsperSettings",
    "HealthServer",
    "Heartbeat",
    "Lifecycle",
    "RedisBinaryNotFoundError",
    "build_event",
    "build_metric",
    "build_telemetry_packet",
    "check_health",
    "configure_logging",
    "event_name",
    "event_priority",
    "find_redis_server_binary",
    "free_port",
    "get_logger",
    "now_ms",
    "packet_priority",
    "run",
    "tune_gc_for_hot_loop",
    "wait_for",
]
