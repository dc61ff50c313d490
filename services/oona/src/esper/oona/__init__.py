"""Oona: the Redis Streams bus every Esper process talks through (client, consumer, keeper)."""

from esper.oona.client import OonaClient, Published
from esper.oona.consumer import Consumer, ConsumerStats, Handler
from esper.oona.delivery import Delivery
from esper.oona.errors import (
    EmergencyRateLimitedError,
    OonaError,
    PublishError,
    Reject,
    RequestTimeoutError,
    SetupError,
)
from esper.oona.metrics import OonaMetrics
from esper.oona.settings import OonaSettings

__all__ = [
    "Consumer",
    "ConsumerStats",
    "Delivery",
    "EmergencyRateLimitedError",
    "Handler",
    "OonaClient",
    "OonaError",
    "OonaMetrics",
    "OonaSettings",
    "PublishError",
    "Published",
    "Reject",
    "RequestTimeoutError",
    "SetupError",
]
