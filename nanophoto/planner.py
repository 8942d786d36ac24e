"""Budget-aware watching: when to check each video of a batch.

Every status check spends one request of the key's hourly budget (100 by
default). A video needs at least three (prompt, submit, one check that finds
it done), so the most a key can make is about 33 videos an hour, and only
if almost no check is wasted on a video that is still running.

The strategy, decided again before every check:

* **Budget not binding**: the checks the 120 s / 20 s schedule would make
  for the videos in flight, plus those the batch's next videos would need,
  fit in what the window's budget has left (the requests of the last window,
  ``in_window``, still count). Then every video gets that familiar rhythm:
  nothing is gained by waiting longer.
* **Budget binding**: a check that finds a video still running is a request
  another video needed. Each video is checked once, when the generation
  times observed so far for its tier and duration say it is almost surely
  done (their 98th percentile, plus a second). If it is not done yet, the
  next check goes where the times still possible put the same percentile,
  or one interval on, doubling while no observed time reaches that far.

Starts are paced so that each planned check finds a slot when it is due. The
limiter (``nanophoto/ratelimit.py``) grants a waiting submit first, then a
due check, and a prompt, which starts a new item, only with a slot neither
needs; while the budget binds (a batch's requests waiting at once, or the
window full) it spreads new work evenly over the window, so no hour starts
with a burst that leaves the rest of it without a slot, and a due check
goes as soon as the window has room, not a pace later. So new videos start
at the rate the key's budget leaves after the videos already paid for are
seen (about one every 3.1 requests' worth of time, 36 s per request at 100
an hour), a check is seen to within seconds of its plan, and the budget
never idles while items wait: throughput stays at the limit. Submits first:
a prompt already paid for should start its generation at once.

Observed times are the API's own ``generationTime``, not when we happened to
notice completion (that would feed our own waiting back into the estimate).
Until a tier and duration has 30, the contract's 120-480 s is mixed in. A
batch in parts runs one planner per part, each learning the times every part
of the batch observed (``tasks/times.py``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from nanophoto.contract import GENERATION_RANGE_S
from nanophoto.watch import CheckPlan, WatchSchedule

BINDING_QUANTILE: Final = 0.98
_PRIOR_POINTS: Final = 13
_MIN_SAMPLES: Final = 30
_MAX_SAMPLES: Final = 500


class GenerationTimes:
    """Generation times seen per (tier, duration), in the API's seconds."""

    def __init__(self, prior: tuple[float, float] = GENERATION_RANGE_S) -> None:
        low, high = prior
        step = (high - low) / (_PRIOR_POINTS - 1)
        self._prior = [low + i * step for i in range(_PRIOR_POINTS)]
        self._seen: dict[tuple[str, int], deque[float]] = defaultdict(
            lambda: deque(maxlen=_MAX_SAMPLES)
        )
        # Sorted samples and their running sums per kind, until the next observation:
        # the planner asks for every video in flight before every check.
        self._sorted: dict[tuple[str, int], tuple[list[float], list[float]]] = {}

    def observe(self, tier: str, duration: int, seconds: float) -> None:
        """Record one finished video's generation time."""
        if seconds > 0 and math.isfinite(seconds):
            self._seen[(str(tier), int(duration))].append(float(seconds))
            self._sorted.clear()

    def _sorted_with_sums(self, tier: str, duration: int) -> tuple[list[float], list[float]]:
        key = (str(tier), int(duration))
        if key not in self._sorted:
            times = self.samples(tier, duration)
            self._sorted[key] = (times, list(itertools.accumulate(times, initial=0.0)))
        return self._sorted[key]

    def samples(self, tier: str, duration: int) -> list[float]:
        """Sorted times to predict from: this kind's, else every kind's, with the prior.

        Until there are enough, the contract's range stays in: the slowest of a
        few videos seen is no bound on the next one, and a check made too soon
        is a request wasted.
        """
        own = list(self._seen.get((str(tier), int(duration)), ()))
        if len(own) >= _MIN_SAMPLES:
            return sorted(own)
        pooled = [t for times in self._seen.values() for t in times]
        return sorted((own if own else pooled) + self._prior)

    def quantile(self, tier: str, duration: int, q: float, above: float = 0.0) -> float | None:
        """The ``q`` quantile of the times longer than ``above``; None if none is."""
        times, _ = self._sorted_with_sums(tier, duration)
        start = bisect.bisect_right(times, above)
        count = len(times) - start
        if not count:
            return None
        return times[start + min(count - 1, math.ceil(q * count) - 1)]

    def mean(self, tier: str, duration: int, above: float = 0.0) -> float:
        """Expected time, given that it is longer than ``above``."""
        times, sums = self._sorted_with_sums(tier, duration)
        start = bisect.bisect_right(times, above)
        count = len(times) - start
        return (sums[-1] - sums[start]) / count if count else above


@dataclass
class _Video:
    tier: str
    duration: int
    submitted_at: float


class BudgetPlanner:
    """Chooses each check's time for the videos of one batch (see the module's docstring).

    Times it returns are seconds after the video's submit, on ``clock``.
    ``api_second`` is how many of our seconds one of the API's seconds lasts
    (1, except against a time-compressed simulator).
    """

    def __init__(
        self,
        schedule: WatchSchedule,
        *,
        requests_per_window: int,
        window: float,
        max_in_flight: int,
        requests_per_item: int = 2,
        times: GenerationTimes | None = None,
        quantile: float = BINDING_QUANTILE,
        api_second: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        in_window: Callable[[], int] | None = None,
    ) -> None:
        self.schedule = schedule
        self.requests_per_window = requests_per_window
        self.window = window
        self.max_in_flight = max_in_flight
        self.requests_per_item = requests_per_item
        self.times = times or GenerationTimes()
        self.quantile = quantile
        self.api_second = api_second
        self.queued = 0  # items not yet submitted; the batch keeps it current
        self._clock = clock
        # Requests this process made in the last window (the limiter's count): they
        # still take the budget's slots. Without it, the last videos of a batch would
        # be watched eagerly into a window already spent.
        self._in_window = in_window
        self._videos: dict[str, _Video] = {}
        self.binding_decisions = 0
        self.eager_decisions = 0

    def add(self, task_id: str, tier: str, duration: int, submitted_at: float) -> None:
        """Start planning checks for a submitted video."""
        self._videos[task_id] = _Video(str(tier), int(duration), submitted_at)

    def track(self, task_id: str, tier: str, duration: int, submitted_at: float) -> CheckPlan:
        """``add``, and the plan ``watch_video`` asks for each check's time."""
        self.add(task_id, tier, duration, submitted_at)
        return lambda index, elapsed: self.check_time(task_id, index, elapsed)

    def finish(self, task_id: str, generation_time: float | None = None) -> None:
        """Stop planning for a video; learn from its ``generationTime`` (API seconds)."""
        video = self._videos.pop(task_id, None)
        if video is not None and generation_time is not None:
            self.times.observe(video.tier, video.duration, generation_time)

    def eager_checks(self, video: _Video, elapsed: float) -> float:
        """Checks the 120 s / 20 s schedule is expected to make from ``elapsed`` on."""
        above = elapsed / self.api_second
        done = self.times.mean(video.tier, video.duration, above) * self.api_second
        first = max(self.schedule.initial_delay, elapsed)
        return max(0.0, (min(done, self.schedule.max_wait) - first) / self.schedule.interval) + 1

    def is_binding(self) -> bool:
        """Whether the eager schedule would need more than the window's budget has left."""
        now = self._clock()
        demand = sum(self.eager_checks(v, now - v.submitted_at) for v in self._videos.values())
        if self.queued:
            kind = next(iter(self._videos.values()), _Video("sora2", 10, now))
            per_item = self.requests_per_item + self.eager_checks(kind, 0.0)
            cycle = self.times.mean(kind.tier, kind.duration) * self.api_second
            cycle += self.schedule.interval / 2
            starts = self.max_in_flight * self.window / max(cycle, 1e-9)
            demand += min(self.queued, math.ceil(starts)) * per_item
        spent = self._in_window() if self._in_window is not None else 0
        return demand + spent > self.requests_per_window

    def check_time(self, task_id: str, index: int, elapsed: float) -> float:
        """When (seconds after submit) to make check ``index`` of ``task_id``, now ``elapsed``."""
        video = self._videos.get(task_id)
        if video is None or not self.is_binding():
            self.eager_decisions += 1
            return self._eager_time(index, elapsed)
        self.binding_decisions += 1
        above = elapsed / self.api_second if index else 0.0
        predicted = self.times.quantile(video.tier, video.duration, self.quantile, above)
        if predicted is None:  # slower than any seen: back off, doubling
            later = elapsed + self.schedule.interval * float(2 ** min(index, 6))
        else:
            # generationTime is rounded to whole seconds: one more covers it.
            later = (predicted + 1.0) * self.api_second
        return min(max(later, self.schedule.initial_delay, elapsed), self.schedule.max_wait)

    def _eager_time(self, index: int, elapsed: float) -> float:
        """The next slot of the 120 s / 20 s grid that is not already past."""
        schedule = self.schedule
        if index == 0:
            return schedule.initial_delay
        past = max(0.0, elapsed - schedule.initial_delay)
        slots = math.floor(past / schedule.interval + 1e-9) + 1
        return min(schedule.initial_delay + slots * schedule.interval, schedule.max_wait)
