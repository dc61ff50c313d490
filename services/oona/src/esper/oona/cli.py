"""What every bus process's `run` command does: load and check its settings, then serve.

A configuration problem (no secret, no Redis URL, a bad value) is one clear line on stderr and exit
code 2 — never a traceback — so compose health checks and operators see what to fix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import typer
from pydantic import ValidationError

from esper.core.errors import ConfigurationError
from esper.core.lifecycle import run as run_async
from esper.oona.settings import OonaSettings

S = TypeVar("S", bound=OonaSettings)


def serve_or_exit(service: str, settings_cls: type[S], serve: Callable[[S], Awaitable[int]]) -> NoReturn:
    try:
        settings = settings_cls()
        settings.signing_keys()
        settings.require_redis_url()
    except (ConfigurationError, ValidationError) as e:
        typer.echo(f"{service}: configuration error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_async(lambda: serve(settings)))
