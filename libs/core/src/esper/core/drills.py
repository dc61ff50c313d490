"""The drill runner every service's `python -m esper.<name> drill` shares.

A drill is an async function returning `(ok, evidence)`. The runner gives each its own uvloop
event loop and a hang timeout, turns a crash into a FAIL with the reason (never a bare traceback),
prints `PASS|FAIL <name>: <evidence> [<seconds>]` lines and a closing `N passed, M failed` line
(the plain summary CI reads), and returns the exit code: 0 all passed, 1 any failed, 2 unknown name.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

from esper.core.lifecycle import _loop_factory
from esper.core.logging import configure_logging

DrillResult = tuple[bool, str]
Drill = Callable[[], Awaitable[DrillResult]]

LOG_LEVEL_ENV = "ESPER_DRILL_LOG_LEVEL"  # services log every expected failure; keep drill output readable


def verdict(problems: list[str], evidence: str) -> DrillResult:
    """PASS with the evidence when nothing went wrong, else FAIL with the evidence and every problem."""
    return (not problems, evidence if not problems else f"{evidence}; PROBLEMS: {'; '.join(problems)}")


async def _guarded(drill: Drill, timeout_s: float) -> DrillResult:
    try:
        async with asyncio.timeout(timeout_s):
            return await drill()
    except TimeoutError:
        return False, f"drill hung for more than {timeout_s:.0f} s"
    except Exception as e:  # a drill that crashes is a FAIL with the reason
        return False, f"drill raised {type(e).__name__}: {e}"


def run_drill(drill: Drill, *, timeout_s: float) -> DrillResult:
    """Run one drill on a fresh event loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_guarded(drill, timeout_s))


def run_drills(drills: Mapping[str, Drill], name: str, *, service: str, timeout_s: float = 120.0) -> int:
    """Run `name` (or every drill for 'all'), print the PASS/FAIL lines and the summary line."""
    if name != "all" and name not in drills:
        print(f"unknown drill {name!r}; known: {', '.join(drills)} (or 'all')", file=sys.stderr)
        return 2
    names = list(drills) if name == "all" else [name]
    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "ERROR"), service=f"{service}-drill")
    passed = failed = 0
    for n in names:
        t0 = time.perf_counter()
        ok, evidence = run_drill(drills[n], timeout_s=timeout_s)
        passed, failed = (passed + 1, failed) if ok else (passed, failed + 1)
        print(f"{'PASS' if ok else 'FAIL'} {n}: {evidence} [{time.perf_counter() - t0:.1f} s]", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1
