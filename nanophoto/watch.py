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
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from nanophoto.contract import (
    COMPLETED,
    EXPECTED_GENERATION_S,
    INITIAL_STATUS_DELAY_S,
    MAX_WAIT_S,
    MIN_STATUS_CHECK_INTERVAL_S,
    STATUS_CHECK_INTERVAL_S,
)
from nanophoto.errors import (
    CompletedWithoutUrlError,
    NanoPhotoError,
    RateLimitError,
    WaitTimeoutError,
)
from nanophoto.models import VideoStatus

CheckStatus = Callable[[str], Awaitable[VideoStatus]]
# (check index, seconds since submit) -> seconds after submit of that check
CheckPlan = Callable[[int, float], float]
NO_URL_PATIENCE = 3


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
        ge=MIN_STATUS_CHECK_INTERVAL_S,
        allow_inf_nan=False,
        description=f"Seconds between status checks: at least "
        f"{MIN_STATUS_CHECK_INTERVAL_S:g} (NanoPhoto advises {STATUS_CHECK_INTERVAL_S:g}). "
        "Each check counts against the key's hourly request limit.",
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
        """The same rhythm, every duration multiplied by ``factor`` (on a compressed
        clock the interval may be shorter than the floor, which is in NanoPhoto's seconds)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor: must be a positive number, not {factor!r}")
        return WatchSchedule.model_construct(
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


def wait_notice(task_id: str, seconds: float, left: float, time_scale: float) -> str:
    """What a person is told when a 429 makes the next check of ``task_id`` wait.

    ``seconds`` and ``left`` (before ``max_wait``) are on our clock; the
    notice gives NanoPhoto's seconds and the wall-clock time of the next check.
    """
    late = seconds >= left
    at = datetime.now().astimezone() + timedelta(seconds=min(seconds, left))
    notice = f"rate limited (429): the next check of {task_id} waits {seconds / time_scale:.0f} s"
    if late:
        return (
            f"{notice}, past the {left / time_scale:.0f} s left to watch it: one last check at "
            f"{at:%H:%M:%S}, then the watch ends and the video can be resumed by its task id"
        )
    return f"{notice}, until {at:%H:%M:%S}"


async def watch_video(
    task_id: str,
    check: CheckStatus,
    schedule: WatchSchedule,
    *,
    submitted_at: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_transient_error: Callable[[NanoPhotoError], None] | None = None,
    on_wait: Callable[[float, float], None] | None = None,
    plan: CheckPlan | None = None,
) -> VideoStatus:
    """Check ``task_id`` on ``schedule`` until it is completed or failed.

    ``on_wait(seconds, left)`` is told when a 429 makes the next check wait
    ``seconds`` (its ``Retry-After``, or a back-off), with ``left`` seconds
    before ``max_wait``. A ``completed`` without a video URL, answered
    ``NO_URL_PATIENCE`` times, raises ``CompletedWithoutUrlError``: the video
    is done and paid for, and no URL came.

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
    without_url = 0  # "completed" answers that gave no video URL
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
                # A wait past max_wait leaves one last check, at max_wait.
                limited += 1
                wait = error.retry_after or schedule.interval * 2 ** (limited - 1)
                not_before = clock() - start + wait
                if on_wait is not None:
                    on_wait(wait, max(0.0, schedule.max_wait - (clock() - start)))
        else:
            limited = 0
            if not last.is_running:
                return last
            if last.status == COMPLETED:  # done, and paid for, but no URL to fetch it from
                without_url += 1
                if without_url >= NO_URL_PATIENCE:
                    raise _completed_without_url(task_id, without_url)
        final = schedule.is_last(index) if plan is None else due >= schedule.max_wait
        if final:
            if last is not None and last.status == COMPLETED:  # never "may still finish"
                raise _completed_without_url(task_id, without_url)
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


def _completed_without_url(task_id: str, answers: int) -> CompletedWithoutUrlError:
    """A video NanoPhoto calls completed (and charged) that came with no URL."""
    return CompletedWithoutUrlError(
        f"NanoPhoto says video {task_id} is completed (and charged) but gave no video URL "
        f"in {answers} answers; it is not a failure and was not refunded. Ask for it again "
        f"later, without paying again: sora2 status --task-id {task_id}, or resume it "
        f"(sora2 resume --task-id {task_id}, resume-video) to download it once a URL is given."
    )
