"""Watching a video task: when to check, and when to give up.

NanoPhoto's advice, stated once: wait ``initial_delay`` after submit, then
check every ``interval`` until the video is completed or failed, and give up
at ``max_wait``. Checks are timed from the submit on a fixed cadence
(120 s, 140 s, 160 s, ...), so a slow check does not push the rhythm back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field

from nanophoto.contract import (
    EXPECTED_GENERATION_S,
    INITIAL_STATUS_DELAY_S,
    MAX_WAIT_S,
    STATUS_CHECK_INTERVAL_S,
)
from nanophoto.errors import NanoPhotoError, RateLimitError, WaitTimeoutError
from nanophoto.models import VideoStatus

CheckStatus = Callable[[str], Awaitable[VideoStatus]]
# (check index, seconds since submit) -> seconds after submit of that check
CheckPlan = Callable[[int, float], float]
_MAX_RATE_LIMIT_WAIT = 600.0


class WatchSchedule(BaseModel):
    """When to check a video's status, in seconds from its submit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_delay: float = Field(
        INITIAL_STATUS_DELAY_S,
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait after submit before the first status check "
        f"(NanoPhoto advises {INITIAL_STATUS_DELAY_S:g}: no video is ready sooner).",
    )
    interval: float = Field(
        STATUS_CHECK_INTERVAL_S,
        gt=0,
        allow_inf_nan=False,
        description=f"Seconds between status checks (NanoPhoto advises "
        f"{STATUS_CHECK_INTERVAL_S:g}). Each check counts against the key's hourly "
        "request limit.",
    )
    max_wait: float = Field(
        MAX_WAIT_S,
        gt=0,
        allow_inf_nan=False,
        description="Seconds after submit to stop watching. The video may still "
        "finish later; it can be resumed by its task id.",
    )
    expected_generation: float = Field(
        EXPECTED_GENERATION_S,
        gt=0,
        allow_inf_nan=False,
        description="How long a video usually takes, in seconds; it only draws the progress bar.",
    )

    def on_clock(self, time_scale: float) -> WatchSchedule:
        """This schedule on our clock: it is in NanoPhoto's seconds, and a
        time-compressed simulator (``NANOPHOTO_TIME_SCALE``) runs them faster."""
        return self if time_scale == 1 else self.scaled(time_scale)

    def scaled(self, factor: float) -> WatchSchedule:
        """The same rhythm, every duration multiplied by ``factor``."""
        return WatchSchedule(
            initial_delay=self.initial_delay * factor,
            interval=self.interval * factor,
            max_wait=self.max_wait * factor,
            expected_generation=self.expected_generation * factor,
        )

    def check_time(self, index: int) -> float:
        """Seconds after submit of check number ``index`` (0-based), capped at max_wait.

        Computed from the index, not summed, so scaled floats do not drift.
        """
        return min(self.initial_delay + index * self.interval, self.max_wait)

    def is_last(self, index: int) -> bool:
        """Whether check ``index`` is the one at max_wait."""
        return self.initial_delay + index * self.interval >= self.max_wait * (1 - 1e-9)

    def next_index(self, index: int, elapsed: float) -> int:
        """The check after ``index`` that is not already past at ``elapsed``.

        Slots missed while a check was slow are skipped, not crowded in.
        """
        following = index + 1
        behind = elapsed - (self.initial_delay + following * self.interval)
        if behind > 0:
            following += math.ceil(behind / self.interval - 1e-9)
        return following


class ResumeSchedule(WatchSchedule):
    """When to check a video submitted earlier, in seconds from now."""

    initial_delay: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds from now before the first status check (0: at once, since "
        "the video was submitted earlier).",
    )
    max_wait: float = Field(
        MAX_WAIT_S,
        gt=0,
        allow_inf_nan=False,
        description="Seconds from now to stop watching. The video may still finish "
        "later; it can be resumed again by its task id.",
    )


async def watch_video(
    task_id: str,
    check: CheckStatus,
    schedule: WatchSchedule,
    *,
    submitted_at: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_transient_error: Callable[[NanoPhotoError], None] | None = None,
    plan: CheckPlan | None = None,
) -> VideoStatus:
    """Check ``task_id`` on ``schedule`` until it is completed or failed.

    ``plan``, when given, chooses each check's time instead of the fixed
    cadence (a batch's budget-aware planner); ``max_wait`` still ends the watch.

    A transient error (after the client's own retries) does not end the
    watch while time is left: the next scheduled check tries again. An error
    no retry can fix (401, 404, ...) ends it at once. Raises
    ``WaitTimeoutError`` once ``max_wait`` has passed.
    """
    start = clock() if submitted_at is None else submitted_at
    last: VideoStatus | None = None
    index = 0
    not_before = 0.0  # seconds after submit; a 429 pushes it out
    limited = 0  # 429s in a row
    while True:
        elapsed = clock() - start
        if plan is None:
            due = schedule.check_time(index)
        else:
            due = min(max(plan(index, elapsed), not_before), schedule.max_wait)
        await sleep(max(0.0, due - elapsed))
        try:
            last = await check(task_id)
        except NanoPhotoError as error:
            if not error.retryable:
                raise
            if on_transient_error is not None:
                on_transient_error(error)
            if isinstance(error, RateLimitError):
                # The budget is per hour: back off, doubling with each 429 in a
                # row, unless the server said how long to wait.
                limited += 1
                wait = error.retry_after or schedule.interval * 2 ** (limited - 1)
                not_before = clock() - start + min(wait, _MAX_RATE_LIMIT_WAIT)
        else:
            limited = 0
            if not last.is_running:
                return last
        final = schedule.is_last(index) if plan is None else due >= schedule.max_wait
        if final:
            seen = last.status if last is not None else "no answer"
            raise WaitTimeoutError(
                f"video {task_id} was not finished after {schedule.max_wait:g} s "
                f"(last status: {seen}). It may still finish: resume watching it "
                f"by its task id instead of submitting again."
            )
        if plan is None:
            index = schedule.next_index(index, max(clock() - start, not_before))
        else:
            index += 1
