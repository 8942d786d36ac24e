"""The key's request budget: at most ``requests`` API calls in any ``window`` seconds.

NanoPhoto allows a key ``RATE_LIMIT_PER_HOUR`` requests, counted over a sliding hour.
``RequestLimiter`` enforces exactly that in one process, so this process
never causes a 429.

Checks are planned (``nanophoto.planner``): a batch *reserves* each video's
next check at its planned time. A check goes first when it is due, and a
prompt or a submit is granted only if every check reserved within the next
window still finds a slot at its time: that submit's slot stays taken for a
whole window, and a check kept waiting is a video seen late. So submits are
paced by the checks already planned, and the budget stays spent on both.

Several processes share one key through an ``Upstream``: the Prefect flows
plug in a Prefect global concurrency limit (``tasks/ratelimit.py``), and the
command line, which has no Prefect server, uses the limiter alone.
"""

from __future__ import annotations

import asyncio
import bisect
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

    CHECK = 0  # due now (planned), and paid for by the submits paced around it
    SUBMIT = 1
    PROMPT = 2


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
        self._reserved: dict[str, float] = {}  # planned checks: key -> when (our clock)
        self._wake: asyncio.Task[None] | None = None
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

    def reserve(self, key: str, at: float) -> None:
        """Keep a slot free for a check planned ``at`` (this limiter's clock); one per
        ``key`` (a video's task id), replacing its earlier one."""
        self._reserved[key] = at

    def unreserve(self, key: str) -> None:
        """The check of ``key`` is being made, or no longer will be."""
        if self._reserved.pop(key, None) is not None:
            self._start_dispatcher()  # a submit held back for it may fit now

    def _start_dispatcher(self) -> None:
        if self._live_waiters() and (self._dispatcher is None or self._dispatcher.done()):
            self._dispatcher = asyncio.create_task(self._dispatch(), name="nanophoto-limiter")

    async def acquire(self, priority: Priority = Priority.CHECK, reservation: str = "") -> None:
        """Wait for a request slot; returns when this request may be sent. A planned
        check names its ``reservation``: it waits in its place from now on."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._order), future))
        self._reserved.pop(reservation, None)
        self._start_dispatcher()
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

    def _checks_waiting(self) -> int:
        return sum(
            not future.done() and priority == Priority.CHECK
            for priority, _, future in self._waiting
        )

    def _room_beside_reserved(self, now: float, checks: int) -> tuple[int, float | None]:
        """How many requests other than checks may go now, after ``checks`` checks, so
        that every check reserved within a window still finds a slot at its time; and,
        if none may, when the first reservation would be dropped (a check that comes,
        or a slot that frees, looks again sooner)."""
        for key, at in list(self._reserved.items()):
            if at < now - self._grace:
                del self._reserved[key]
        due = sorted(max(at, now) for at in self._reserved.values() if at < now + self.window)
        granted = list(self._granted) + [now] * checks
        room = self.requests - len(granted)
        for index, at in enumerate(due):
            # At ``at``: grants still in its window, reserved checks up to it (this one
            # included), and whatever goes now (its slot is held until now + window).
            held = len(granted) - bisect.bisect_right(granted, at - self.window)
            room = min(room, self.requests - held - (index + 1))
        if room > 0 or not due:
            return max(room, 0), None
        return 0, min(self._reserved.values()) + self._grace

    @property
    def _grace(self) -> float:
        """A reservation this far past its time was dropped by its watcher (a video that
        ended, a run cancelled): it holds nothing back any more."""
        return self.window / 20

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
                checks = min(free, self._checks_waiting())
                others, look_again = self._room_beside_reserved(now, checks)
                count = min(free, checks + min(others, waiting - checks))
                if count <= 0:
                    # Only submits and prompts wait, and planned checks need the slots:
                    # look again when a slot frees or a stale plan goes, or at once when
                    # a check comes (``acquire``) or a plan is dropped (``unreserve``).
                    nexts = [t for t in (look_again,) if t is not None]
                    if self._granted:
                        nexts.append(self._granted[0] + self.window)
                    self._wake_at(min(nexts) if nexts else now + self.window / 20)
                    return
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

    def _wake_at(self, when: float) -> None:
        """Start the dispatcher again at ``when`` (this limiter's clock)."""
        if self._wake is not None and not self._wake.done():
            self._wake.cancel()

        async def wake() -> None:
            await self._sleep(max(0.0, when - self._clock()))
            self._start_dispatcher()

        self._wake = asyncio.create_task(wake(), name="nanophoto-limiter-wake")

    def _fail_waiters(self, error: Exception | None) -> None:
        """Whoever is waiting learns why, instead of waiting forever."""
        for _, _, future in self._waiting:
            if not future.done():
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)
        self._waiting.clear()
