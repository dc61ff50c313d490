"""configure_logging, checked in a child process so the test run's own logging stays untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from esper.core.errors import ConfigurationError
from esper.core.logging import configure_logging

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import structlog
    from esper.core.logging import configure_logging, get_logger

    log = get_logger("early")  # created before configuration, must still follow it
    configure_logging(level="INFO", fmt=sys.argv[1], service="oona")
    configure_logging(level="INFO", fmt=sys.argv[1], service="oona")  # idempotent: one line per event
    structlog.contextvars.bind_contextvars(correlation_id="c-1")
    log.info("hello", n=1)
    log.debug("hidden")
    logging.getLogger("redis.thing").warning("from stdlib %s", "args")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("boom")
    """
)


def run_child(fmt: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout == ""
    return out.stderr.splitlines()


def test_json_format_routes_structlog_and_stdlib() -> None:
    lines = run_child("json")
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert [e["event"] for e in events] == ["hello", "from stdlib args", "boom"]
    hello, stdlib, boom = events
    assert hello["service"] == "oona"
    assert hello["level"] == "info"
    assert hello["n"] == 1
    assert hello["correlation_id"] == "c-1"
    assert hello["logger"] == "early"
    assert hello["timestamp"].endswith("Z")
    assert stdlib["level"] == "warning"
    assert stdlib["logger"] == "redis.thing"
    assert stdlib["service"] == "oona"
    assert "ZeroDivisionError" in boom["exception"]


def test_console_format() -> None:
    text = "\n".join(run_child("console"))
    assert text.count("hello") == 1
    assert "hidden" not in text
    assert "from stdlib args" in text
    assert "ZeroDivisionError" in text


def test_unknown_level_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        configure_logging(level="LOUD")
