"""The one typed settings object every Esper process starts from.

Services subclass :class:`EsperSettings` to add their own knobs (optionally with their own
``env_prefix``); the shared fields keep one meaning fleet-wide.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["EsperSettings", "default_instance_id"]


def default_instance_id() -> str:
    """``<hostname>-<pid>``: unique per process on a host, readable in logs and heartbeat keys."""
    return f"{socket.gethostname()}-{os.getpid()}"


class EsperSettings(BaseSettings):
    """Settings shared by every process, read from ``ESPER_*`` environment variables and ``.env``."""

    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    service_name: str = Field(default="esper", description="Process name used in logs, metrics and heartbeat keys.")
    instance_id: str = Field(
        default_factory=default_instance_id,
        description="Distinguishes replicas of one service; defaults to <hostname>-<pid>.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis to connect to; None means unset, i.e. the embedded redis-server of the local fleet.",
    )
    log_level: str = Field(default="INFO", description="Minimum log level (DEBUG, INFO, WARNING, ERROR).")
    log_format: Literal["console", "json"] = Field(
        default="console", description="console for humans, json for log shippers."
    )
    metrics_host: str = Field(default="127.0.0.1", description="Interface of the /metrics and /healthz server.")
    metrics_port: int = Field(
        default=0, ge=-1, le=65535, description="Port of the /metrics server: 0 picks a free port, -1 disables it."
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description="Seconds between heartbeat key refreshes.")
    heartbeat_ttl_s: float = Field(
        default=15.0, gt=0, description="Heartbeat key lifetime; a process silent this long counts as dead."
    )
    drain_timeout_s: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long to finish in-flight work before cancelling it."
    )
