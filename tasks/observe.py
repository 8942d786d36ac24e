"""What a person sees in the Prefect UI: artifacts, progress and events.

Events name the NanoPhoto task as their resource (``nanophoto.video.<taskId>``)
so automations can react to one video; they never carry the API key.

Reporting is best-effort: a Prefect API hiccup while drawing a progress bar
must never fail a video that was paid for, so every call here logs a warning
instead of raising.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, ParamSpec, TypeVar

from prefect.artifacts import (
    acreate_link_artifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    aupdate_progress_artifact,
)
from prefect.events import emit_event

from nanophoto.models import VideoRequest, VideoResult

EVENT_PREFIX: Final = "nanophoto.video"
VideoEvent = Literal["submitted", "completed", "failed"]
_logger = logging.getLogger("sora2.observe")
P = ParamSpec("P")
R = TypeVar("R")


def best_effort(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | None]]:
    """Run ``function``; on any error, log a warning and return None."""

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return await function(*args, **kwargs)
        except Exception as error:
            _logger.warning("could not report to Prefect (%s): %r", function.__name__, error)
            return None

    return wrapper


def video_resource(task_id: str) -> dict[str, str]:
    """The event resource for one NanoPhoto video task."""
    return {
        "prefect.resource.id": f"{EVENT_PREFIX}.{task_id}",
        "prefect.resource.name": task_id,
        "nanophoto.task-id": task_id,
    }


def emit_video_event(kind: VideoEvent, task_id: str, **payload: Any) -> None:
    """Emit ``nanophoto.video.<kind>`` about ``task_id``, related to the current run."""
    try:
        emit_event(f"{EVENT_PREFIX}.{kind}", resource=video_resource(task_id), payload=payload)
    except Exception as error:
        _logger.warning("could not emit %s.%s: %r", EVENT_PREFIX, kind, error)


def emit_unknown_outcome(key: str, cost: int, *, resubmitted: bool) -> None:
    """Emit ``nanophoto.submission.unknown``: a submit under ``key`` may have been charged
    and nobody knows its task id (the submissions ledger lists it, with what to do)."""
    try:
        emit_event(
            "nanophoto.submission.unknown",
            resource={
                "prefect.resource.id": f"nanophoto.submission.{key}",
                "prefect.resource.name": key,
                "nanophoto.idempotency-key": key,
            },
            payload={"cost": cost, "resubmitted": resubmitted},
        )
    except Exception as error:
        _logger.warning("could not emit nanophoto.submission.unknown: %r", error)


def _fenced(text: str) -> str:
    fence = "~~~~"
    while fence in text:
        fence += "~"
    return f"{fence}text\n{text}\n{fence}"


@best_effort
async def publish_prompt(request: VideoRequest, topic: str | None = None) -> None:
    """A markdown artifact with the prompt and the options it will be rendered with."""
    lines = ["# Video prompt", ""]
    if topic:
        lines += [f"**Topic:** {topic}", ""]
    lines += [
        "| tier | duration | aspect | mode | cost |",
        "|---|---|---|---|---|",
        f"| {request.model_tier.value} | {request.duration} s | "
        f"{request.aspect_ratio.value} | {request.mode.value} | {request.cost} credits |",
        "",
        _fenced(request.prompt),
    ]
    await acreate_markdown_artifact(markdown="\n".join(lines), description="The video prompt")


@best_effort
async def publish_video(result: VideoResult, *, paid_here: bool = True) -> None:
    """A link artifact to the finished video, with what it cost and where it was saved."""
    saved = f"; saved to {result.video_path}" if result.video_path else ""
    cost = (
        f"{result.credits_used} credits"
        if paid_here
        else f"no credits spent by this run ({result.video_credits} charged at its submit)"
    )
    await acreate_link_artifact(
        link=result.video_url,
        link_text=f"Video {result.task_id}",
        description=f"Sora 2 video, {cost}{saved}",
    )


class WaitProgress:
    """A progress artifact through the wait: elapsed time against the expected generation time.

    It moves with time (``tick``), not only at status checks, so the first
    two minutes do not sit at 0 %; it reaches 100 % only for a finished video.
    """

    def __init__(self, task_id: str, expected_seconds: float, api_second: float = 1.0) -> None:
        self.task_id = task_id
        self.expected = expected_seconds
        self.api_second = api_second  # our seconds per NanoPhoto second: texts use NanoPhoto's
        self.status = "submitted"
        self.progress = 0.0
        self._artifact: Any = None

    @property
    def tick_seconds(self) -> float:
        """How often to move the bar between checks: about every 5 % of the usual wait."""
        return max(self.expected / 20, 2.0)

    @best_effort
    async def start(self) -> None:
        """Create the bar at 0 %."""
        self._artifact = await acreate_progress_artifact(
            progress=0.0, description=f"Video {self.task_id}: submitted"
        )

    @best_effort
    async def update(self, elapsed: float, status: str | None = None) -> None:
        """Move the bar to ``elapsed``; it stays below 100 % until the video is done."""
        if self._artifact is None:
            return
        self.status = status or self.status
        self.progress = min(99.0, 100.0 * elapsed / self.expected) if self.expected else 0.0
        await aupdate_progress_artifact(
            self._artifact,
            progress=self.progress,
            description=f"Video {self.task_id}: {self.status} after "
            f"{elapsed / self.api_second:.0f} s (usually ~{self.expected / self.api_second:.0f} s)",
        )

    @best_effort
    async def finish(self, outcome: str, *, completed: bool) -> None:
        """Fill the bar for a finished video; a failed one keeps where it stopped."""
        if self._artifact is not None:
            await aupdate_progress_artifact(
                self._artifact,
                progress=100.0 if completed else self.progress,
                description=f"Video {self.task_id}: {outcome}",
            )


class BatchProgress:
    """One progress bar for a batch: the items finished, plus the wait of those in flight.

    A batch waits minutes between events; ``tick`` moves the bar with time so
    a person sees it working. Best-effort, like every report here.
    """

    def __init__(
        self, total: int, expected_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.expected = expected_seconds
        self._clock = clock
        self._watching: dict[int, float] = {}  # index -> when its video was submitted
        self._done: dict[str, int] = {}
        self._artifact: Any = None
        self._shown: tuple[float, str] | None = None
        self._showing = asyncio.Lock()  # the ticker and finishing items: one bar, not two

    @property
    def tick_seconds(self) -> float:
        """How often to move the bar: about every 5 % of a video's usual wait."""
        return max(self.expected / 20, 2.0)

    def watching(self, index: int, submitted_at: float) -> None:
        """Item ``index`` has a video being generated since ``submitted_at``."""
        self._watching[index] = submitted_at

    def finished(self, index: int, status: str) -> None:
        """Item ``index`` reached its outcome (delivered, failed, over_budget)."""
        self._watching.pop(index, None)
        self._done[status] = self._done.get(status, 0) + 1

    def fraction(self) -> float:
        """Share of the batch done, counting a generating video by its expected wait."""
        now = self._clock()
        waiting = sum(
            min(0.9, (now - since) / self.expected) if self.expected else 0.0
            for since in self._watching.values()
        )
        return (sum(self._done.values()) + waiting) / self.total if self.total else 1.0

    def description(self) -> str:
        """``3 of 10 finished (2 delivered, 1 failed); 5 generating``."""
        finished = sum(self._done.values())
        counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in self._done.items())
        text = f"Batch: {finished} of {self.total} finished" + (f" ({counts})" if counts else "")
        return text + f"; {len(self._watching)} generating"

    @best_effort
    async def show(self) -> None:
        """Create the bar, or move it if anything changed."""
        async with self._showing:
            progress = round(100.0 * self.fraction(), 1)
            shown = (progress, self.description())
            if shown == self._shown:
                return
            if self._artifact is None:
                self._artifact = await acreate_progress_artifact(
                    progress=progress, description=shown[1]
                )
            else:
                await aupdate_progress_artifact(
                    self._artifact, progress=progress, description=shown[1]
                )
            self._shown = shown
