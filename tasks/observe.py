"""What a person sees in the Prefect UI: artifacts, progress and events.

Events name the NanoPhoto task as their resource (``nanophoto.video.<taskId>``)
so automations can react to one video; they never carry the API key.

Reporting is best-effort: a Prefect API hiccup while drawing a progress bar
must never fail a video that was paid for, so every call here logs a warning
instead of raising.
"""

from __future__ import annotations

import functools
import logging
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
        f"| {request.model_tier.value} | {request.video_duration} s | "
        f"{request.aspect_ratio.value} | {request.mode.value} | {request.cost} credits |",
        "",
        _fenced(request.prompt),
    ]
    await acreate_markdown_artifact(markdown="\n".join(lines), description="The video prompt")


@best_effort
async def publish_video(result: VideoResult) -> None:
    """A link artifact to the finished video, with where it was saved."""
    saved = f"; saved to {result.video_path}" if result.video_path else ""
    await acreate_link_artifact(
        link=result.video_url,
        link_text=f"Video {result.task_id}",
        description=f"Sora 2 video, {result.credits_used} credits{saved}",
    )


class WaitProgress:
    """A progress artifact through the wait: elapsed against the expected generation time."""

    def __init__(self, task_id: str, expected_seconds: float) -> None:
        self.task_id = task_id
        self.expected = expected_seconds
        self._artifact: Any = None

    @best_effort
    async def start(self) -> None:
        """Create the bar at 0 %."""
        self._artifact = await acreate_progress_artifact(
            progress=0.0, description=f"Video {self.task_id}: submitted"
        )

    @best_effort
    async def update(self, elapsed: float, status: str) -> None:
        """Move the bar; it stays below 100 % until the video is done."""
        if self._artifact is None:
            return
        progress = min(99.0, 100.0 * elapsed / self.expected) if self.expected else 0.0
        await aupdate_progress_artifact(
            self._artifact,
            progress=progress,
            description=f"Video {self.task_id}: {status} after {elapsed:.0f} s "
            f"(usually ~{self.expected:.0f} s)",
        )

    @best_effort
    async def finish(self, status: str) -> None:
        """Fill the bar: the video is final, whatever it became."""
        if self._artifact is not None:
            await aupdate_progress_artifact(
                self._artifact, progress=100.0, description=f"Video {self.task_id}: {status}"
            )
