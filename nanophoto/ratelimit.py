"""The key's request budget: at most ``requests`` API calls in any ``window`` seconds.

NanoPhoto allows a key ``RATE_LIMIT_PER_HOUR`` requests, counted over a sliding hour.
``RequestLimiter`` enforces exactly that in one process, so this process
never causes a 429. Requests are granted in priority order (``PROMPT`` and
``SUBMIT`` before ``CHECK``): a submit starts a generation that runs while we
wait, a status check only learns sooner what is already under way.

Several processes share one key through an ``Upstream``: the Prefect flows
plug in a Prefect global concurrency limit (``tasks/ratelimit.py``), and the
command line, which has no Prefect server, uses the limiter alone.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Protocol

from nanophoto.contract import RATE_LIMIT_PER_HOUR, RATE_WINDOW_S

# Our clock starts a request a little before the server counts it; a window
# this much longer keeps request N+1 out of request 1's hour on the server.
WINDOW_MARGIN = 0.01


class Priority(IntEnum):
    """Which waiting request goes first when the budget is spent (lowest first)."""

    SUBMIT = 0
    PROMPT = 1
    CHECK = 2


class Upstream(Protocol):
    """A budget shared with other processes: grants ``count`` requests at once."""

    async def acquire(self, count: int) -> None:
        """Wait until ``count`` more requests fit in the shared budget, and take them."""


class RequestLimiter:
    """At most ``requests`` grants in any ``window`` seconds, highest priority first.

    One dispatcher grants waiting requests: as many as the window has room
    for, in one go from ``upstream`` when there is one. A waiter that is
    cancelled before its grant takes nothing.

    Example:
        ```python
        limiter = RequestLimiter(RATE_LIMIT_PER_HOUR, RATE_WINDOW_S)
        await limiter.acquire(Priority.SUBMIT)
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
        self._granted: deque[float] = deque()
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        self.granted_total = 0
        self.waited_seconds = 0.0

    def __repr__(self) -> str:
        return f"RequestLimiter(requests={self.requests}, window={self.window:g})"

    @property
    def per_second(self) -> float:
        """The budget's long-run rate."""
        return self.requests / self.window

    def in_window(self) -> int:
        """Requests granted within the last window."""
        self._expire(self._clock())
        return len(self._granted)

    async def acquire(self, priority: Priority = Priority.CHECK) -> None:
        """Wait for a request slot; returns when this request may be sent."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._order), future))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="nanophoto-limiter")
        started = self._clock()
        try:
            await future
        finally:
            self.waited_seconds += self._clock() - started

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
                free = self.requests - len(self._granted)
                if free <= 0:
                    await self._sleep(self._granted[0] + self.window - now)
                    continue
                count = min(free, waiting)
                if self.upstream is not None:
                    await self.upstream.acquire(count)
                granted_at = self._clock()
                while count and self._waiting:
                    _, _, future = heapq.heappop(self._waiting)
                    if future.done():
                        continue  # cancelled meanwhile: its slot goes to the next waiter
                    future.set_result(None)
                    self._granted.append(granted_at)
                    self.granted_total += 1
                    count -= 1
                # Slots taken upstream for waiters that left are spent: count them.
                self._granted.extend([granted_at] * count)
        except asyncio.CancelledError:
            self._fail_waiters(None)
            raise
        except Exception as error:  # e.g. the shared limit is missing
            self._fail_waiters(error)

    def _fail_waiters(self, error: Exception | None) -> None:
        """Whoever is waiting learns why, instead of waiting forever."""
        for _, _, future in self._waiting:
            if not future.done():
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)
        self._waiting.clear()
