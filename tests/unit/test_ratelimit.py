"""The in-process request budget: a sliding window, granted in priority order."""

from __future__ import annotations

import asyncio

import pytest

from nanophoto.client import NanoPhotoClient
from nanophoto.models import VideoRequest
from nanophoto.ratelimit import Priority, RequestLimiter
from tests.helpers import MakeSimulator, settings_for


class FakeTime:
    """A clock that only moves when something sleeps: tests run instantly."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        for _ in range(5):  # let whoever was just granted run first
            await asyncio.sleep(0)
        self.now += max(seconds, 0.0)


async def test_never_more_than_the_limit_in_any_window() -> None:
    time = FakeTime()
    limiter = RequestLimiter(5, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    granted: list[float] = []

    async def request() -> None:
        await limiter.acquire()
        granted.append(time.now)

    await asyncio.wait_for(asyncio.gather(*(request() for _ in range(12))), timeout=5)
    assert len(granted) == 12
    # Any 100 s window holds at most 5 grants; the first 5 go at once.
    assert granted[:5] == [0.0] * 5
    for i, start in enumerate(granted):
        assert sum(start <= t < start + 100.0 for t in granted[i:]) <= 5
    assert granted[5] == pytest.approx(100.0)
    assert granted[10] == pytest.approx(200.0)


async def test_checks_go_before_submits_and_prompts_when_the_budget_is_spent() -> None:
    """A check is made when it is planned (the submits pace around it, see below)."""
    time = FakeTime()
    limiter = RequestLimiter(1, 10.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    await limiter.acquire()  # spends the window
    order: list[str] = []

    async def request(name: str, priority: Priority) -> None:
        await limiter.acquire(priority)
        order.append(name)

    waiting = [
        asyncio.create_task(request("check-1", Priority.CHECK)),
        asyncio.create_task(request("check-2", Priority.CHECK)),
        asyncio.create_task(request("submit", Priority.SUBMIT)),
        asyncio.create_task(request("prompt", Priority.PROMPT)),
    ]
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=5)
    assert order == ["check-1", "check-2", "submit", "prompt"]


class ManualTime:
    """A clock the test moves; sleepers wake when it passes their time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._moved = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + max(seconds, 0.0)
        while self.now < until:
            self._moved.clear()
            await self._moved.wait()

    async def advance(self, to: float) -> None:
        self.now = to
        self._moved.set()
        for _ in range(20):  # let whoever wakes run
            await asyncio.sleep(0)


async def _granted_at(
    limiter: RequestLimiter, time: ManualTime, priority: Priority, reservation: str = ""
) -> float:
    await limiter.acquire(priority, reservation)
    return time.now


async def test_a_submit_waits_so_that_a_planned_check_finds_its_slot() -> None:
    time = ManualTime()
    limiter = RequestLimiter(3, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    await limiter.acquire(Priority.SUBMIT)
    await limiter.acquire(Priority.CHECK)
    limiter.reserve("task_1", 50.0)  # one slot left, and a check planned within the window
    submit = asyncio.create_task(_granted_at(limiter, time, Priority.SUBMIT))
    await time.advance(10.0)
    assert not submit.done()  # it would hold the check's slot until t=100
    await time.advance(50.0)
    check = await asyncio.wait_for(_granted_at(limiter, time, Priority.CHECK, "task_1"), timeout=5)
    assert check == 50.0  # on time, not after the submit's window
    await time.advance(100.0)
    assert await asyncio.wait_for(submit, timeout=5) == 100.0


async def test_submits_take_what_the_planned_checks_leave() -> None:
    time = ManualTime()
    limiter = RequestLimiter(5, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    for _ in range(2):
        await limiter.acquire(Priority.SUBMIT)
    limiter.reserve("task_1", 30.0)
    limiter.reserve("task_2", 60.0)
    limiter.reserve("task_3", 250.0)  # beyond the window: slots free up before it
    submits = [asyncio.create_task(_granted_at(limiter, time, Priority.SUBMIT)) for _ in range(3)]
    await time.advance(1.0)
    assert [s.done() for s in submits] == [True, False, False]  # 5 - 2 used - 2 planned
    for task_id, at in (("task_1", 30.0), ("task_2", 60.0)):
        await time.advance(at)
        check = _granted_at(limiter, time, Priority.CHECK, task_id)
        assert await asyncio.wait_for(check, timeout=5) == at
    await time.advance(100.0)  # the first two slots free up
    assert await asyncio.wait_for(asyncio.gather(*submits[1:]), timeout=5) == [100.0, 100.0]


async def test_a_plan_its_watcher_dropped_holds_nothing_back_for_long() -> None:
    time = ManualTime()
    limiter = RequestLimiter(2, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    await limiter.acquire(Priority.SUBMIT)
    limiter.reserve("task_gone", 10.0)  # its video ended and nobody said so
    submit = asyncio.create_task(_granted_at(limiter, time, Priority.SUBMIT))
    await time.advance(12.0)
    assert not submit.done()
    await time.advance(16.0)  # 10 s + a twentieth of the window: dropped
    assert await asyncio.wait_for(submit, timeout=5) == 16.0


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    time = FakeTime()
    limiter = RequestLimiter(1, 10.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    await limiter.acquire()
    gone = asyncio.create_task(limiter.acquire(Priority.SUBMIT))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.wait_for(limiter.acquire(), timeout=5)
    assert limiter.granted_total == 2
    assert time.now == pytest.approx(10.0)


async def test_an_upstream_failure_reaches_every_waiter() -> None:
    class Missing:
        async def acquire(self, count: int) -> None:
            raise RuntimeError("no such limit")

    limiter = RequestLimiter(10, 10.0, upstream=Missing())
    results = await asyncio.wait_for(
        asyncio.gather(limiter.acquire(), limiter.acquire(), return_exceptions=True), timeout=5
    )
    assert [str(r) for r in results] == ["no such limit", "no such limit"]
    assert limiter.granted_total == 0


async def test_upstream_is_asked_for_waiting_requests_in_one_go() -> None:
    asked: list[int] = []

    class Counting:
        async def acquire(self, count: int) -> None:
            asked.append(count)

    limiter = RequestLimiter(50, 10.0, upstream=Counting())
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire() for _ in range(30))), timeout=5)
    assert sum(asked) == 30
    assert len(asked) < 30


def test_bad_budgets_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="requests"):
        RequestLimiter(0, 10.0)
    with pytest.raises(ValueError, match="window"):
        RequestLimiter(1, 0.0)


async def test_every_attempt_takes_a_slot_so_the_key_never_sees_a_429(
    make_simulator: MakeSimulator,
) -> None:
    # 4 requests per 2 s: our limiter waits instead of the server refusing. (The window's
    # 1 % margin must cover how late a request reaches the server: 20 ms here.)
    simulator = make_simulator(rate_limit=4, rate_window_seconds=200.0)
    settings = settings_for(simulator)
    window = simulator.config.real(simulator.config.rate_window_seconds)
    limiter = RequestLimiter(4, window)
    async with NanoPhotoClient(settings=settings, limiter=limiter) as client:
        submitted = await client.submit(VideoRequest(prompt="A fox at dawn"))
        simulator.queue_fault("check-status", "internal_error")  # one retry: a request too
        for _ in range(6):
            await asyncio.wait_for(client.check_status(submitted.task_id), timeout=10)
    ledger = simulator.snapshot()
    assert ledger["rate_limited"] == {}
    assert ledger["total_requests"] == limiter.granted_total == 1 + 6 + 1
