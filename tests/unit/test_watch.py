"""The watch schedule: 120 s, then every 20 s, until done, failed or 1200 s."""

from __future__ import annotations

import pytest

from nanophoto.errors import (
    CompletedWithoutUrlError,
    ConnectionDroppedError,
    NanoPhotoError,
    RateLimitError,
    TaskNotFoundError,
    WaitTimeoutError,
)
from nanophoto.models import VideoStatus
from nanophoto.watch import WatchSchedule, watch_video


class FakeVideo:
    """A video that is ready at ``ready_at`` on a fake clock; records each check."""

    def __init__(
        self, ready_at: float, *, fail: bool = False, url: str | None = "https://v/t.mp4"
    ) -> None:
        self.ready_at = ready_at
        self.fail = fail
        self.url = url
        self.now = 0.0
        self.checks: list[float] = []
        self.errors: dict[int, NanoPhotoError] = {}

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def check(self, task_id: str) -> VideoStatus:
        self.checks.append(self.now)
        error = self.errors.get(len(self.checks))
        if error is not None:
            raise error
        if self.now < self.ready_at:
            return VideoStatus(task_id=task_id, status="processing")
        if self.fail:
            return VideoStatus(task_id=task_id, status="failed", error_code="GENERATION_FAILED")
        return VideoStatus(task_id=task_id, status="completed", video_url=self.url)

    async def watch(self, schedule: WatchSchedule | None = None) -> VideoStatus:
        return await watch_video(
            "t1",
            self.check,
            schedule or WatchSchedule(),
            submitted_at=0.0,
            clock=self.clock,
            sleep=self.sleep,
        )


async def test_a_130_second_video_is_seen_at_the_140_second_check() -> None:
    video = FakeVideo(ready_at=130)
    status = await video.watch()
    assert status.is_completed
    assert video.checks == [120, 140]


async def test_a_video_ready_before_the_first_check_needs_one_check() -> None:
    video = FakeVideo(ready_at=30)
    await video.watch()
    assert video.checks == [120]


async def test_a_failed_video_ends_the_watch_with_its_status() -> None:
    video = FakeVideo(ready_at=200, fail=True)
    status = await video.watch()
    assert status.is_failed
    assert video.checks[-1] == 200


async def test_watching_gives_up_at_max_wait_after_the_last_check() -> None:
    video = FakeVideo(ready_at=10_000)
    with pytest.raises(WaitTimeoutError) as caught:
        await video.watch()
    assert video.checks[0] == 120
    assert video.checks[-1] == 1200
    assert len(video.checks) == 55  # 120, 140, ..., 1200
    assert "resume" in str(caught.value)
    assert caught.value.code == "WAIT_TIMEOUT"


async def test_a_transient_error_does_not_end_the_watch() -> None:
    video = FakeVideo(ready_at=150)
    video.errors[1] = ConnectionDroppedError("reset")
    video.errors[2] = ConnectionDroppedError("reset")
    status = await video.watch()
    assert status.is_completed
    assert video.checks == [120, 140, 160]


async def test_an_error_no_retry_can_fix_ends_the_watch_at_once() -> None:
    video = FakeVideo(ready_at=150)
    video.errors[1] = TaskNotFoundError("no such task")
    with pytest.raises(TaskNotFoundError):
        await video.watch()
    assert video.checks == [120]


async def test_a_slow_check_skips_missed_slots_instead_of_crowding_them() -> None:
    video = FakeVideo(ready_at=10_000)
    slow_check = video.check

    async def slow(task_id: str) -> VideoStatus:
        status = await slow_check(task_id)
        if len(video.checks) == 1:
            video.now += 45  # the first check took 45 s
        return status

    video.check = slow  # type: ignore[method-assign]
    with pytest.raises(WaitTimeoutError):
        await video.watch(WatchSchedule(max_wait=240))
    assert video.checks == [120, 180, 200, 220, 240]


async def test_a_scaled_schedule_keeps_its_count_of_checks() -> None:
    # 1.2 + 4 * 0.2 is 1.9999999999999998 in floats: no extra check for that.
    video = FakeVideo(ready_at=10_000)
    schedule = WatchSchedule(initial_delay=120, interval=20, max_wait=200).scaled(0.01)
    with pytest.raises(WaitTimeoutError):
        await video.watch(schedule)
    assert video.checks == pytest.approx([1.2, 1.4, 1.6, 1.8, 2.0])


async def test_a_429_with_retry_after_skips_the_slots_it_asks_us_to_skip() -> None:
    video = FakeVideo(ready_at=150)
    limited = RateLimitError("over the limit")
    limited.retry_after = 50
    video.errors[1] = limited
    status = await video.watch()
    assert status.is_completed
    assert video.checks == [120, 180]  # not 140 or 160: the server asked for 50 s


async def test_429s_without_retry_after_back_off_doubling() -> None:
    video = FakeVideo(ready_at=10_000)
    for check in (1, 2, 3):
        video.errors[check] = RateLimitError("over the limit")
    with pytest.raises(WaitTimeoutError):
        await video.watch(WatchSchedule(max_wait=400))
    # 429 at 120 -> wait 20; 429 at 140 -> wait 40; 429 at 180 -> wait 80; then every 20.
    assert video.checks[:5] == [120, 140, 180, 260, 280]


def test_schedule_refuses_infinite_values() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        WatchSchedule(max_wait=float("inf"))


def test_schedule_scales_every_duration() -> None:
    scaled = WatchSchedule().scaled(0.01)
    assert (scaled.initial_delay, scaled.interval, scaled.max_wait) == pytest.approx(
        (1.2, 0.2, 12.0)
    )


def test_schedule_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        WatchSchedule(interval=0)


async def test_completed_without_a_url_is_reported_as_paid_never_as_not_finished() -> None:
    video = FakeVideo(ready_at=130, url=None)
    with pytest.raises(CompletedWithoutUrlError, match="completed \\(and charged\\)"):
        await video.watch()
    assert video.checks == [120, 140, 160, 180]  # asked three times once it was done

    # The watch's end comes before the third answer: still "completed, no URL".
    short = FakeVideo(ready_at=135, url=None)
    with pytest.raises(CompletedWithoutUrlError, match="not refunded"):
        await short.watch(WatchSchedule(max_wait=150))
    assert short.checks == [120, 140, 150]  # two "completed" answers, then max_wait
