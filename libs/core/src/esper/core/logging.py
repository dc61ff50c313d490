"""Structured logging for every process: structlog in front, stdlib ``logging`` routed through it.

One configuration renders both structlog events and records from libraries that use stdlib
``logging`` (redis, asyncio), so a process has one log format and one level knob.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from esper.core.errors import ConfigurationError

__all__ = ["configure_logging", "get_logger"]

LogFormat = Literal["console", "json"]

# The handler we installed on the root logger, so reconfiguring replaces it instead of stacking.
_handler: logging.Handler | None = None


def _service_adder(service: str) -> Processor:
    def add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add_service


def _parse_level(level: str) -> int:
    value = logging.getLevelNamesMapping().get(level.upper())
    if value is None:
        raise ConfigurationError(f"unknown log level {level!r}")
    return value


def configure_logging(*, level: str = "INFO", fmt: LogFormat = "console", service: str = "esper") -> None:
    """Configure structlog and the stdlib root logger; safe to call again (it replaces, not stacks).

    Every event carries ``timestamp`` (ISO, UTC), ``level``, ``service`` and whatever is bound with
    ``structlog.contextvars.bind_contextvars`` (e.g. a correlation id for the current task).
    """
    global _handler
    numeric_level = _parse_level(level)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _service_adder(service),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if fmt == "json":
        # ConsoleRenderer formats exceptions itself and warns if they were already formatted.
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: loggers created at import time pick up a later reconfiguration. A hot path
        # that logs often can hold ``get_logger(name).bind()``, which is a concrete logger.
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _handler = handler


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (usually ``__name__``)."""
    return structlog.stdlib.get_logger(name)
