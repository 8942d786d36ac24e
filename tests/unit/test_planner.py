"""Budget-aware watching: the 120/20 rhythm when the budget allows, predicted checks when not."""

from __future__ import annotations

import pytest

from nanophoto.planner import BudgetPlanner, GenerationTimes
from nanophoto.watch import WatchSchedule


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def planner(
    clock: Clock, *, queued: int = 0, in_flight: int = 1, **kwargs: object
) -> BudgetPlanner:
    made = BudgetPlanner(
        WatchSchedule(),
        requests_per_window=100,
        window=3600.0,
        max_in_flight=10,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )
    for i in range(in_flight):
        made.add(f"t{i}", "sora2", 10, 0.0)
    made.queued = queued
    return made


def test_one_video_keeps_the_familiar_rhythm() -> None:
    clock = Clock()
    plan = planner(clock)
    assert not plan.is_binding()
    assert plan.check_time("t0", 0, 0.0) == 120.0
    assert plan.check_time("t0", 1, 120.3) == 140.0
    assert plan.check_time("t0", 2, 140.0) == 160.0
    assert plan.check_time("t0", 5, 211.0) == 220.0  # a slow check skips a slot, no crowding


def test_a_big_batch_binds_and_checks_once_when_almost_surely_done() -> None:
    clock = Clock()
    times = GenerationTimes()
    for seconds in range(120, 481, 10):  # 37 videos seen, 120..480 s
        times.observe("sora2", 10, float(seconds))
    plan = planner(clock, queued=40, in_flight=10, times=times)
    assert plan.is_binding()
    first = plan.check_time("t0", 0, 0.0)
    assert first == 481.0  # the 98th percentile of what was seen, plus a second
    # A check made early (it waited out a 429) and found it running: the next
    # goes where the times longer than that still put it.
    assert plan.check_time("t0", 1, 300.0) == 481.0
    # Slower than anything seen: one interval on, then doubling.
    assert plan.check_time("t0", 1, first) == first + 40.0
    assert plan.check_time("t0", 2, first + 40.0) == first + 40.0 + 80.0


def test_predictions_follow_each_tier_and_duration() -> None:
    clock = Clock()
    times = GenerationTimes()
    for _ in range(30):
        times.observe("sora2", 10, 130.0)
        times.observe("sora2-pro-high", 15, 400.0)
    plan = planner(clock, queued=40, in_flight=0, times=times)
    plan.add("fast", "sora2", 10, 0.0)
    plan.add("slow", "sora2-pro-high", 15, 0.0)
    for i in range(10):
        plan.add(f"x{i}", "sora2-pro-high", 15, 0.0)
    assert plan.check_time("fast", 0, 0.0) == pytest.approx(131.0)
    assert plan.check_time("slow", 0, 0.0) == pytest.approx(401.0)


def test_a_video_slower_than_any_seen_backs_off_doubling() -> None:
    clock = Clock()
    times = GenerationTimes()
    for _ in range(30):
        times.observe("sora2", 10, 200.0)
    plan = planner(clock, queued=40, in_flight=12, times=times)
    assert plan.check_time("t0", 1, 300.0) == pytest.approx(340.0)
    assert plan.check_time("t0", 2, 340.0) == pytest.approx(420.0)
    assert plan.check_time("t0", 30, 1190.0) == 1200.0  # never past max_wait


def test_time_compression_converts_the_apis_seconds() -> None:
    clock = Clock()
    times = GenerationTimes()
    for _ in range(30):
        times.observe("sora2", 10, 300.0)
    plan = BudgetPlanner(
        WatchSchedule().scaled(0.01),
        requests_per_window=100,
        window=36.0,
        max_in_flight=10,
        times=times,
        api_second=0.01,
        clock=clock,
    )
    for i in range(30):
        plan.add(f"t{i}", "sora2", 10, 0.0)
    assert plan.check_time("t0", 0, 0.0) == pytest.approx(3.01)


def test_learning_uses_the_apis_generation_time() -> None:
    times = GenerationTimes()
    assert times.quantile("sora2", 10, 1.0) == 480.0  # the contract's range, before any data
    clock = Clock()
    plan = planner(clock, times=times)
    for i in range(30):
        plan.add(f"v{i}", "sora2", 10, 0.0)
        plan.finish(f"v{i}", 150.0)
        if i == 4:  # a few fast ones are no bound on the next: the prior stays in
            assert times.quantile("sora2", 10, 1.0) == 480.0
    assert times.quantile("sora2", 10, 1.0) == 150.0
    assert times.quantile("sora2", 10, 0.5, above=150.0) is None


def test_the_windows_spent_requests_count_against_the_eager_schedule() -> None:
    """The last videos of a batch: their eager checks alone fit an hour's budget, but the
    window is spent. Watched eagerly they would take every slot as it came free (checks
    are never paced); counted with the window's requests, each is checked once."""
    clock = Clock()
    spent = 0
    plan = planner(clock, in_flight=3, in_window=lambda: spent)
    assert not plan.is_binding()  # about 3 x 10 eager checks: within 100
    spent = 90
    assert plan.is_binding()
    assert plan.check_time("t0", 0, 0.0) > 120.0  # one check where it is almost surely done
