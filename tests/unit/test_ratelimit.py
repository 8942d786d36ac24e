"""The in-process request budget: a sliding window, granted in priority order."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from nanophoto.client import NanoPhotoClient
from nanophoto.models import VideoRequest
from nanophoto.ratelimit import Done, Priority, RequestLimiter
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


def _at_most_the_limit_in_any_window(granted: list[float], limit: int, window: float) -> bool:
    return all(
        sum(start <= t < start + window for t in granted[i:]) <= limit
        for i, start in enumerate(granted)
    )


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
    assert _at_most_the_limit_in_any_window(granted, 5, 100.0)
    assert granted[5] == pytest.approx(100.0)
    assert granted[10] == pytest.approx(200.0)


async def test_a_batch_expected_to_bind_is_paced_from_its_start() -> None:
    """Granted at once, a batch's requests would fill the first window in a burst that
    comes free, and is spent, in one burst every window after it, leaving a gap each
    time in which a due check waits for the next burst. Paced, they go one every
    window / requests from the first, and no gap opens."""
    time = FakeTime()
    limiter = RequestLimiter(10, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    granted: list[float] = []

    async def request() -> None:
        await limiter.acquire(Priority.PROMPT)  # new work: paced (a check would not be)
        granted.append(time.now)

    limiter.pace()
    await asyncio.wait_for(asyncio.gather(*(request() for _ in range(30))), timeout=5)
    assert granted[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    assert gaps == pytest.approx([10.0] * 29)  # one every 100 s / 10 requests, no gap
    assert _at_most_the_limit_in_any_window(granted, 10, 100.0)


async def test_once_the_window_was_full_grants_are_spread_over_it() -> None:
    """One request at a time is not paced until the window is full; from then on, the
    window's slots come free at the pace, not all at once a window after the first."""
    time = FakeTime()
    limiter = RequestLimiter(10, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    granted: list[float] = []
    for _ in range(20):
        await asyncio.wait_for(limiter.acquire(Priority.SUBMIT), timeout=5)
        granted.append(time.now)
    assert granted[:10] == [0.0] * 10  # not binding yet: at once
    gaps = [b - a for a, b in itertools.pairwise(granted[10:])]
    assert gaps == pytest.approx([10.0] * 9)  # then one every 100 s / 10 requests
    assert _at_most_the_limit_in_any_window(granted, 10, 100.0)


async def test_requests_within_the_budget_are_not_paced() -> None:
    """Videos that fit the budget, checked every 20 s: their requests go when asked, not
    at the hourly pace."""
    time = FakeTime()
    limiter = RequestLimiter(10, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire() for _ in range(5))), timeout=5)
    for _ in range(4):
        await asyncio.wait_for(limiter.acquire(), timeout=5)
    assert time.now == 0.0


async def test_while_paced_a_due_check_goes_at_once_and_new_work_keeps_the_pace() -> None:
    """A check is due on a video most likely done: waiting for the pace behind prompts
    and submits only delays seeing it (detection p50 225 s against a plan's ~180).
    It goes as soon as the window has room, and the new work after it waits the
    longer, so the budget's rate and window hold."""
    time = FakeTime()
    limiter = RequestLimiter(10, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    granted: list[tuple[str, float]] = []
    checks: list[asyncio.Task[None]] = []

    async def request(name: str, priority: Priority) -> None:
        await limiter.acquire(priority)
        granted.append((name, time.now))
        if len(granted) == 4:  # the dispatcher now waits for the pace: a check comes
            checks.append(asyncio.create_task(request("check", Priority.CHECK)))

    limiter.pace()
    work = [asyncio.create_task(request(f"prompt-{i}", Priority.PROMPT)) for i in range(8)]
    await asyncio.wait_for(asyncio.gather(*work), timeout=5)
    await asyncio.wait_for(asyncio.gather(*checks), timeout=5)
    when = dict(granted)
    prompts = [t for name, t in granted if name != "check"]
    assert prompts[:4] == pytest.approx([0.0, 10.0, 20.0, 30.0])
    assert 30.0 <= when["check"] < 40.0  # before the next pace, not behind the prompts
    # The pace's credit the check took is repaid by the new work after it.
    assert prompts[4] == pytest.approx(50.0)
    assert _at_most_the_limit_in_any_window(sorted(t for _, t in granted), 10, 100.0)


async def test_while_paced_checks_never_keep_a_submit_waiting() -> None:
    """Checks go ahead of the pace only within one burst of credit, and never while a
    submit waits: a stream of checks cannot hold back a paid prompt's submit."""
    time = FakeTime()
    limiter = RequestLimiter(10, 100.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    granted: list[tuple[str, float]] = []

    async def request(name: str, priority: Priority) -> None:
        await limiter.acquire(priority)
        granted.append((name, time.now))

    limiter.pace()
    await limiter.acquire(Priority.PROMPT)  # the pace's token, spent at 0
    waiting = [asyncio.create_task(request(f"check-{i}", Priority.CHECK)) for i in range(4)]
    waiting.append(asyncio.create_task(request("submit", Priority.SUBMIT)))
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=5)
    order = [name for name, _ in granted]
    assert order.index("submit") <= 1, granted  # at most one check on credit before it
    assert _at_most_the_limit_in_any_window([0.0] + [t for _, t in granted], 10, 100.0)


async def test_submits_then_checks_then_prompts_when_the_budget_is_spent() -> None:
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
    assert order == ["submit", "check-1", "check-2", "prompt"]


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
        async def acquire(self, count: int) -> Done:
            raise RuntimeError("no such limit")

    limiter = RequestLimiter(10, 10.0, upstream=Missing())
    results = await asyncio.wait_for(
        asyncio.gather(limiter.acquire(), limiter.acquire(), return_exceptions=True), timeout=5
    )
    assert [str(r) for r in results] == ["no such limit", "no such limit"]
    assert limiter.granted_total == 0


async def test_upstream_is_asked_for_waiting_requests_in_one_go() -> None:
    asked: list[int] = []
    told: list[str] = []

    class Counting:
        async def acquire(self, count: int) -> Done:
            asked.append(count)
            return lambda: told.append("done")

    limiter = RequestLimiter(50, 10.0, upstream=Counting())
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire() for _ in range(30))), timeout=5)
    assert sum(asked) == 30
    assert len(asked) < 30
    assert len(told) == 30  # each request told upstream when it was done


async def test_a_slots_window_starts_when_its_request_is_done() -> None:
    """A request granted at once but sent late (a record written first, a slow connect):
    NanoPhoto counts it when it arrives, so its window starts when it is done."""
    time = FakeTime()
    limiter = RequestLimiter(1, 10.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    granted: list[float] = []

    async def late_request() -> None:
        async with limiter.slot(Priority.SUBMIT):
            await time.sleep(4.0)  # granted at 0, done at 4

    async def next_request() -> None:
        await asyncio.sleep(0)  # asks while the first is under way
        await limiter.acquire()
        granted.append(time.now)

    await asyncio.wait_for(asyncio.gather(late_request(), next_request()), timeout=5)
    assert granted == [pytest.approx(14.0)]  # not 10: the first one's window ran 4 to 14


async def test_a_slot_granted_as_its_waiter_is_cancelled_is_spent() -> None:
    time = FakeTime()
    limiter = RequestLimiter(1, 10.0, margin=0.0, clock=time.clock, sleep=time.sleep)
    waiter = asyncio.create_task(limiter.acquire())
    for _ in range(3):  # the dispatcher grants it...
        await asyncio.sleep(0)
    waiter.cancel()  # ...and it is cancelled before it runs again
    await asyncio.gather(waiter, return_exceptions=True)
    assert limiter.in_window() == 1  # counted, and not held for ever
    await asyncio.wait_for(limiter.acquire(), timeout=5)
    assert time.now == pytest.approx(10.0)


def test_bad_budgets_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="requests"):
        RequestLimiter(0, 10.0)
    with pytest.raises(ValueError, match="window"):
        RequestLimiter(1, 0.0)


async def test_every_attempt_takes_a_slot_so_the_key_never_sees_a_429(
    make_simulator: MakeSimulator,
) -> None:
    # 4 requests per 2 s: our limiter waits instead of the server refusing.
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


async def test_a_submit_sent_late_after_its_grant_still_never_sees_a_429(
    make_simulator: MakeSimulator,
) -> None:
    """The submit's record write takes half a window between the grant and the send (a
    loaded machine, a remote store): the checks after it still fit NanoPhoto's window."""
    simulator = make_simulator(rate_limit=2, rate_window_seconds=200.0)
    window = simulator.config.real(simulator.config.rate_window_seconds)
    limiter = RequestLimiter(2, window)

    async def slow_record_write() -> None:
        await asyncio.sleep(window / 2)

    async with NanoPhotoClient(settings=settings_for(simulator), limiter=limiter) as client:
        submitted = await client.submit(
            VideoRequest(prompt="A fox at dawn"), before_send=slow_record_write
        )
        for _ in range(3):
            await asyncio.wait_for(client.check_status(submitted.task_id), timeout=20)
    ledger = simulator.snapshot()
    assert ledger["rate_limited"] == {}
    assert ledger["total_requests"] == 4
