"""The key's request budget: at most ``requests`` API calls in any ``window`` seconds.

NanoPhoto allows a key ``RATE_LIMIT_PER_HOUR`` requests, counted over a sliding hour.
``RequestLimiter`` enforces exactly that in one process, so this process
never causes a 429. Waiting requests are granted in ``Priority`` order:
submits, then status checks, then prompts.

A request holds its slot from its grant until it is done, and one window
after that: NanoPhoto counts it when it arrives, which may be well after the
grant (a submission record written first, a connection made on a loaded
machine), and never after its answer.

New work (prompts and submits) is paced at the budget's average rate, a
request every ``window / requests`` seconds with a burst of ``PACED_BURST``
of the budget, while the budget binds: once the window has been full, or
from the start of a batch whose planner expects it to bind (``pace``). A
sliding window frees its slots when the requests of a window ago age out, so
an unpaced burst (a batch's first hour spent in its first minutes) comes
back every hour, and a status check due in the gap waits for the next
hour's burst. Paced, the slots come free evenly. A status check is never
paced: it goes as soon as the window has room, on the pace's credit, which
the new work after it repays (a check waiting a pace behind prompts only
delays seeing a video that is most likely done). Videos that fit the
budget checked every 20 s are never paced: their requests go when asked.
Pacing ends a window after the budget last bound.

Several processes share one key through an ``Upstream``: the Prefect flows
plug in a Prefect global concurrency limit (``tasks/ratelimit.py``), and the
command line, which has no Prefect server, uses the limiter alone.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import IntEnum
from typing import Protocol

from nanophoto.contract import RATE_LIMIT_PER_HOUR, RATE_WINDOW_S

# Our clock starts a request a little before the server counts it; a window
# this much longer keeps request N+1 out of request 1's hour on the server.
WINDOW_MARGIN = 0.01
# Grants that may go at once while paced, as a share of the budget (at least one).
PACED_BURST = 0.02


class Priority(IntEnum):
    """Which waiting request goes first when the budget is spent (lowest first).

    A submit finishes what a paid prompt began; a check is due on a video
    that is most likely done; a prompt starts a new item, so it takes only the
    slots the others leave, and new items start at the pace the budget allows
    once the videos already paid for are seen (``nanophoto/planner.py``).
    """

    SUBMIT = 0
    CHECK = 1
    PROMPT = 2


Done = Callable[[], None]  # a request is done: its slot's window starts now


class Upstream(Protocol):
    """A budget shared with other processes: grants ``count`` requests at once."""

    async def acquire(self, count: int) -> Done:
        """Wait until ``count`` more requests fit in the shared budget, and take them.

        The answer is called once per request, when it is done.
        """


def _nothing() -> None:
    """No upstream: nothing to tell."""


class RequestLimiter:
    """At most ``requests`` grants in any ``window`` seconds, highest priority first.

    One dispatcher grants waiting requests: as many as the window has room
    for, in one go from ``upstream`` when there is one. A waiter that is
    cancelled before its grant takes nothing. A slot is in use from its grant
    until its request is done, then for one window.

    Example:
        ```python
        limiter = RequestLimiter(RATE_LIMIT_PER_HOUR, RATE_WINDOW_S)
        async with limiter.slot(Priority.SUBMIT):
            await send_the_request()
        ```
    """

    def __init__(
        self,
        requests: int = RATE_LIMIT_PER_HOUR,
        window: float = RATE_WINDOW_S,
        *,
        upstream: Upstream | None = None,
        margin: float = WINDOW_MARGIN,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if requests < 1:
            raise ValueError("requests: must be at least 1")
        if window <= 0:
            raise ValueError("window: must be positive")
        self.requests = requests
        self.window = window * (1 + margin)
        self.upstream = upstream
        self._clock = clock
        self._sleep = sleep
        self._granted: deque[float] = deque()  # when each request of the window was done
        self._under_way = 0  # granted, not done yet
        self._done = asyncio.Event()  # a request under way was done
        self._waiting: list[tuple[int, int, asyncio.Future[Done]]] = []
        self._order = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        # Pacing: the budget last bound at ``_binding_at``; tokens refill at ``per_second``.
        self._binding_at: float | None = None
        self._burst = max(1.0, round(requests * PACED_BURST))
        self._tokens = self._burst
        self._refilled_at = clock()
        self.granted_total = 0
        self.waited_seconds = 0.0

    def __repr__(self) -> str:
        return f"RequestLimiter(requests={self.requests}, window={self.window:g})"

    def pace(self) -> None:
        """The budget is about to bind (a batch's planner says so): pace grants from now
        on, for a window, rather than wait for the window to fill in a burst first."""
        self._binding_at = self._clock()

    @property
    def per_second(self) -> float:
        """The budget's long-run rate."""
        return self.requests / self.window

    def in_window(self) -> int:
        """Requests under way, and those done within the last window."""
        self._expire(self._clock())
        return len(self._granted) + self._under_way

    @asynccontextmanager
    async def slot(self, priority: Priority = Priority.CHECK) -> AsyncIterator[None]:
        """Wait for a request slot, and hold it while the request is under way: its
        window starts when the block ends."""
        done = await self._wait(priority)
        try:
            yield
        finally:
            done()

    async def acquire(self, priority: Priority = Priority.CHECK) -> None:
        """Wait for a request slot, for a request sent at once: its window starts now."""
        (await self._wait(priority))()

    async def _wait(self, priority: Priority) -> Done:
        """Wait for a grant; the answer says when its request is done."""
        future: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._order), future))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="nanophoto-limiter")
        started = self._clock()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result()()  # granted as it was cancelled: spent, from now
            raise
        finally:
            self.waited_seconds += self._clock() - started

    def _finisher(self, upstream_done: Done) -> Done:
        """What a granted request calls (once) when it is done."""
        finished = False

        def done() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self._under_way -= 1
            self._granted.append(self._clock())
            upstream_done()
            self._done.set()

        return done

    def _pace(self, now: float) -> float:
        """Grants the pace allows now (at most ``_burst``); any number if not paced."""
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self.per_second)
        self._refilled_at = now
        if self._binding_at is None or now - self._binding_at > self.window:
            return math.inf  # the budget has not bound for a window
        return self._tokens

    def _expire(self, now: float) -> None:
        while self._granted and self._granted[0] <= now - self.window:
            self._granted.popleft()

    def _live_waiters(self) -> int:
        while self._waiting and self._waiting[0][2].done():
            heapq.heappop(self._waiting)  # cancelled while waiting
        return sum(not future.done() for _, _, future in self._waiting)

    async def _dispatch(self) -> None:
        """Grant waiting requests as the window frees up, until none is left."""
        try:
            while waiting := self._live_waiters():
                now = self._clock()
                self._expire(now)
                free = self.requests - len(self._granted) - self._under_way
                if free <= 0:
                    self._binding_at = now
                    if self._granted:
                        await self._sleep(self._granted[0] + self.window - now)
                    else:  # every slot is under way: the first one done starts its window
                        self._done.clear()
                        await self._done.wait()
                    continue
                paced = self._pace(now)
                if paced < 1:  # still binding: new work waits for the pace
                    self._binding_at = now
                    # A video's check: now, on the pace's credit, within one burst of it,
                    # unless a submit waits (it goes first, at the pace: a stream of
                    # checks must never keep a paid prompt's submit waiting).
                    check = None
                    if self._waiting[0][0] != Priority.SUBMIT:
                        check = self._due_check()
                    if check is not None and self._tokens - 1 >= -self._burst:
                        self._tokens -= 1
                        await self._grant([check])
                        continue
                    # A quarter of a pace at most: a check that comes meanwhile goes then.
                    pace = 1 / self.per_second
                    await self._sleep(min((1 - paced) * pace, pace / 4))
                    continue
                count = int(min(free, waiting, paced))
                self._tokens = max(0.0, self._tokens - count)
                await self._grant(count)
        except asyncio.CancelledError:
            self._fail_waiters(None)
            raise
        except Exception as error:  # e.g. the shared limit is missing
            self._fail_waiters(error)

    def _due_check(self) -> asyncio.Future[Done] | None:
        """The longest-waiting status check, if one waits (checks are never paced)."""
        checks = [
            (order, future)
            for priority, order, future in self._waiting
            if priority == Priority.CHECK and not future.done()
        ]
        return min(checks, key=lambda entry: entry[0])[1] if checks else None

    async def _grant(self, what: int | list[asyncio.Future[Done]]) -> None:
        """Take slots upstream in one go and grant them: to the ``what`` first waiters, or
        to these waiters."""
        count = what if isinstance(what, int) else len(what)
        upstream_done = _nothing
        if self.upstream is not None:
            upstream_done = await self.upstream.acquire(count)
        chosen = iter(what) if isinstance(what, list) else None
        while count:
            if chosen is not None:
                future = next(chosen, None)
                if future is None:
                    break
            elif self._waiting:
                _, _, future = heapq.heappop(self._waiting)
            else:
                break
            if future.done():
                continue  # cancelled meanwhile: its slot goes to the next waiter
            self._under_way += 1
            future.set_result(self._finisher(upstream_done))
            self.granted_total += 1
            count -= 1
        # Slots taken upstream for waiters that left are spent: count them.
        for _ in range(count):
            self._granted.append(self._clock())
            upstream_done()

    def _fail_waiters(self, error: Exception | None) -> None:
        """Whoever is waiting learns why, instead of waiting forever."""
        for _, _, future in self._waiting:
            if not future.done():
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)
        self._waiting.clear()
