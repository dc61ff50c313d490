"""Deadline arithmetic and the wait_for helper."""

from __future__ import annotations

import asyncio

import pytest

from esper.core import deadline as deadline_module
from esper.core.clock import now_ms
from esper.core.deadline import Deadline, wait_for
from esper.core.errors import DeadlineExceededError


def test_now_ms_is_epoch_milliseconds() -> None:
    import time

    assert abs(now_ms() - time.time() * 1000) < 1000


def test_after_ms_sets_wire_time_and_remaining() -> None:
    before = now_ms()
    deadline = Deadline.after_ms(10_000)
    after = now_ms()
    assert before + 10_000 <= deadline.epoch_ms <= after + 10_000
    assert 0 < deadline.remaining_s() <= 10.0
    assert deadline.remaining_ms() == pytest.approx(deadline.remaining_s() * 1000, abs=50)
    assert not deadline.expired()
    deadline.check("decision")


def test_at_epoch_ms_round_trips_the_wire_value() -> None:
    epoch = now_ms() + 60_000
    deadline = Deadline.at_epoch_ms(epoch)
    assert deadline.epoch_ms == epoch
    assert 0 < deadline.remaining_ms() <= 60_000


@pytest.mark.parametrize("deadline", [Deadline.after_ms(0), Deadline.after_ms(-5), Deadline.at_epoch_ms(0)])
def test_past_deadline_is_expired_and_never_negative(deadline: Deadline) -> None:
    assert deadline.expired()
    assert deadline.remaining_s() == 0.0
    assert deadline.remaining_ms() == 0.0


def test_check_names_what_and_how_late() -> None:
    deadline = Deadline.at_epoch_ms(now_ms() - 2_000)
    assert deadline.overdue_ms() >= 1_990
    with pytest.raises(DeadlineExceededError, match=r"^tamiyo step: deadline passed \d+\.\d ms ago$") as info:
        deadline.check("tamiyo step")
    assert isinstance(info.value, TimeoutError)


def test_remaining_ignores_wall_clock_jumps_after_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    deadline = Deadline.after_ms(30_000)
    monkeypatch.setattr(deadline_module, "now_ms", lambda: now_ms() + 3_600_000)  # NTP steps an hour ahead
    assert not deadline.expired()
    assert deadline.remaining_s() > 20.0


async def test_wait_for_returns_result_in_time() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 42

    assert await wait_for(quick(), Deadline.after_ms(5_000), "quick") == 42


async def test_wait_for_raises_deadline_exceeded_and_cancels() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(DeadlineExceededError, match="slow reply: deadline passed"):
        await wait_for(slow(), Deadline.after_ms(20), "slow reply")
    assert cancelled.is_set()


async def test_wait_for_with_expired_deadline_raises() -> None:
    with pytest.raises(DeadlineExceededError):
        await wait_for(asyncio.sleep(1), Deadline.after_ms(-1), "late")


async def test_wait_for_lets_inner_timeout_through_unchanged() -> None:
    async def inner() -> None:
        raise TimeoutError("inner")

    with pytest.raises(TimeoutError, match="inner") as info:
        await wait_for(inner(), Deadline.after_ms(5_000), "inner")
    assert not isinstance(info.value, DeadlineExceededError)
