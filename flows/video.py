"""The flows users run: topic → video, ready prompt → video, and resume by task id.

Each reads like the product: prompt, submit, wait, download (the steps live
in ``flows/pipeline.py``). Every input is validated before the first call,
so bad input costs nothing.

The parameters are flat, as users pass them from the UI, the API and
``prefect.yaml``; their types and defaults come from the options declared in
``nanophoto.models`` and their form descriptions from ``flows.forms``. The
two signatures list the same options because Prefect builds a run form from
a function's own signature.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Final

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.forms import described
from flows.pipeline import (
    SubmittedVideo,
    Watching,
    finish_video,
    make_video_once,
    on_our_clock,
    refuse_crash_loop,
)
from nanophoto.contract import (
    PROCESSING,
    AspectRatio,
    Duration,
    Locale,
    Mode,
    ModelTier,
    Technique,
)
from nanophoto.models import (
    ImageUrls,
    ModelName,
    PromptOptions,
    PromptRequest,
    PromptText,
    TaskIdText,
    Topic,
    VideoOptions,
    VideoRequest,
    VideoResult,
    VideoStatus,
)
from nanophoto.watch import ResumeSchedule, WatchSchedule
from tasks.submissions import IdempotencyKey, resolve_idempotency_key
from tasks.video import OutputDir

# Each run's result is kept in result storage (it holds no secret): readable from the
# API after the run (run_deployment, the UI), and still there when a retried state
# change makes the server answer with its own copy of the state. Prefect's default
# serializer: its JSON one hands a pydantic result back as a plain dict.
RESULTS: Final[dict[str, Any]] = {"persist_result": True}
PROMPTING: Final = PromptOptions()
RENDERING: Final = VideoOptions()


def _run_name(prefix: str, parameter: str) -> str:
    """``prefix: <first 60 characters of the parameter>``, for the runs list."""
    value = " ".join(str(flow_run.parameters.get(parameter, "")).split())
    return f"{prefix}: {value[:60]}{'…' if len(value) > 60 else ''}"


def _topic_run_name() -> str:
    return _run_name("video", "topic")


def _prompt_run_name() -> str:
    return _run_name("prompt video", "prompt")


def _resume_run_name() -> str:
    return _run_name("resume", "task_id")


# ``described`` writes each parameter's line of ``Args:`` (the run form's description).
@flow(name="topic-to-video", flow_run_name=_topic_run_name, **RESULTS)
@described
async def topic_to_video(
    topic: Topic,
    technique: Technique = PROMPTING.technique,
    duration: Duration = RENDERING.duration,
    locale: Locale = PROMPTING.locale,
    mode: Mode = RENDERING.mode,
    image_urls: ImageUrls = [],  # noqa: B006 (never mutated; a list renders as a list field)
    model_tier: ModelTier = RENDERING.model_tier,
    aspect_ratio: AspectRatio = RENDERING.aspect_ratio,
    prompt_model: ModelName = PROMPTING.prompt_model,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: OutputDir = ".",
    idempotency_key: IdempotencyKey | None = None,
    resubmit_unknown_up_to_credits: Annotated[int, Field(ge=0)] = 0,
) -> VideoResult:
    """Turn a topic into a finished Sora 2 video: prompt, submit, wait, download.

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    job = PromptRequest.pick(locals())
    return await make_video_once(
        job,
        resolve_idempotency_key(idempotency_key),
        Watching(on_our_clock(schedule), output_dir),
        resubmit_unknown_up_to=resubmit_unknown_up_to_credits,
    )


@flow(name="prompt-to-video", flow_run_name=_prompt_run_name, **RESULTS)
@described
async def prompt_to_video(
    prompt: PromptText,
    mode: Mode = RENDERING.mode,
    image_urls: ImageUrls = [],  # noqa: B006 (never mutated; a list renders as a list field)
    model_tier: ModelTier = RENDERING.model_tier,
    aspect_ratio: AspectRatio = RENDERING.aspect_ratio,
    duration: Duration = RENDERING.duration,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: OutputDir = ".",
    idempotency_key: IdempotencyKey | None = None,
    resubmit_unknown_up_to_credits: Annotated[int, Field(ge=0)] = 0,
) -> VideoResult:
    """Turn a ready prompt into a finished Sora 2 video: submit, wait, download.

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    request = VideoRequest.pick(locals())
    return await make_video_once(
        request,
        resolve_idempotency_key(idempotency_key),
        Watching(on_our_clock(schedule), output_dir),
        resubmit_unknown_up_to=resubmit_unknown_up_to_credits,
    )


@flow(name="resume-video", flow_run_name=_resume_run_name, **RESULTS)
@described
async def resume_video(
    task_id: TaskIdText,
    schedule: ResumeSchedule = ResumeSchedule(),
    output_dir: OutputDir = ".",
) -> VideoResult:
    """Finish a video that was already submitted: watch it, download it, report it.

    For a run that timed out or crashed, or a job started elsewhere. Nothing
    is submitted, so nothing is charged.

    Args:
        task_id: The NanoPhoto task id of the submitted video (as task_abc123:
            letters, digits and the characters _ . -).
        schedule: When to check, in NanoPhoto's seconds from now: first check (0:
            at once), interval, and when to stop watching.

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    refuse_crash_loop()
    video = SubmittedVideo(
        status=VideoStatus(task_id=task_id, status=PROCESSING), submitted_at=time.monotonic()
    )
    return await finish_video(video, Watching(on_our_clock(schedule), output_dir))
