"""The flows users run: topic → prompt → video, and ready prompt → video.

Each reads like the product: prompt, submit, wait, download. Every input is
validated before the first call, so bad input costs nothing.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from nanophoto.contract import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_DURATION,
    DEFAULT_LOCALE,
    DEFAULT_MODE,
    DEFAULT_PROMPT_MODEL,
    DEFAULT_TECHNIQUE,
    DEFAULT_TIER,
    PROMPT_COST,
    AspectRatio,
    Duration,
    Locale,
    Mode,
    ModelTier,
    Technique,
)
from nanophoto.errors import GenerationFailedError, NanoPhotoError
from nanophoto.models import (
    ImageUrl,
    PromptRequest,
    PromptText,
    StageTimings,
    Topic,
    VideoOptions,
    VideoRequest,
    VideoResult,
    VideoStatus,
)
from nanophoto.watch import WatchSchedule, watch_video
from tasks.video import check_video_status, download_video, generate_prompt, submit_video


@flow(name="topic-to-video")
async def topic_to_video(
    topic: Topic,
    technique: Technique = DEFAULT_TECHNIQUE,
    duration: Duration = DEFAULT_DURATION,
    locale: Locale = DEFAULT_LOCALE,
    mode: Mode = DEFAULT_MODE,
    image_urls: list[ImageUrl] | None = None,
    model_tier: ModelTier = DEFAULT_TIER,
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO,
    prompt_model: str = DEFAULT_PROMPT_MODEL,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: str | None = "videos",
) -> VideoResult:
    """Turn a topic into a finished Sora 2 video: prompt, submit, wait, download.

    Args:
        topic: What the video is about, 1 to 500 characters.
        technique: The cinematic technique the shots are built around.
        duration: Video length in seconds, 10 or 15.
        locale: The language the prompt is written in.
        mode: textToVideo, or imageToVideo to start from reference images.
        image_urls: Up to 3 public http(s) image URLs; required for imageToVideo.
        model_tier: sora2 (4/8 credits), sora2-pro-standard (60/100, 720p) or
            sora2-pro-high (120/240, 1080p), for 10/15 seconds.
        aspect_ratio: portrait or landscape.
        prompt_model: The model that writes the prompt.
        schedule: When to check the video: first check, interval, and when to
            stop watching, in seconds after submit.
        output_dir: Folder to save the video in, named by its task id; empty to
            skip the download.

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    prompt_request = PromptRequest(
        topic=topic,
        technique=technique,
        duration=duration,
        locale=locale,
        mode=mode,
        image_urls=image_urls or [],
        model=prompt_model,
    )
    options = VideoOptions(
        mode=mode,
        image_urls=image_urls or [],
        model_tier=model_tier,
        aspect_ratio=aspect_ratio,
        video_duration=duration,
    )
    started = time.monotonic()
    prompt = await generate_prompt(prompt_request)
    timings = StageTimings(prompt=time.monotonic() - started)
    return await make_video(
        options.with_prompt(prompt), schedule, output_dir, timings, prompt_credits=PROMPT_COST
    )


@flow(name="prompt-to-video")
async def prompt_to_video(
    prompt: PromptText,
    mode: Mode = DEFAULT_MODE,
    image_urls: list[ImageUrl] | None = None,
    model_tier: ModelTier = DEFAULT_TIER,
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO,
    video_duration: Duration = DEFAULT_DURATION,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: str | None = "videos",
) -> VideoResult:
    """Turn a ready prompt into a finished Sora 2 video: submit, wait, download.

    Args:
        prompt: The video prompt, as written by you or the prompt generator.
        mode: textToVideo, or imageToVideo to start from reference images.
        image_urls: Up to 3 public http(s) image URLs; required for imageToVideo.
        model_tier: sora2 (4/8 credits), sora2-pro-standard (60/100, 720p) or
            sora2-pro-high (120/240, 1080p), for 10/15 seconds.
        aspect_ratio: portrait or landscape.
        video_duration: Video length in seconds, 10 or 15.
        schedule: When to check the video: first check, interval, and when to
            stop watching, in seconds after submit.
        output_dir: Folder to save the video in, named by its task id; empty to
            skip the download.

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    request = VideoRequest(
        prompt=prompt,
        mode=mode,
        image_urls=image_urls or [],
        model_tier=model_tier,
        aspect_ratio=aspect_ratio,
        video_duration=video_duration,
    )
    return await make_video(request, schedule, output_dir, StageTimings())


async def make_video(
    request: VideoRequest,
    schedule: WatchSchedule,
    output_dir: str | None,
    timings: StageTimings,
    *,
    prompt_credits: int = 0,
) -> VideoResult:
    """Submit once, watch on ``schedule``, download: the part both flows share."""
    logger = get_run_logger()
    started = time.monotonic()
    status = await submit_video(request)
    submitted_at = time.monotonic()
    timings.submit = submitted_at - started

    def note_transient(error: NanoPhotoError) -> None:
        logger.warning("status check failed (%s); still watching %s", error, status.task_id)

    if status.is_running:
        status = await watch_video(
            status.task_id,
            _check,
            schedule,
            submitted_at=submitted_at,
            on_transient_error=note_transient,
        )
    timings.wait = time.monotonic() - submitted_at
    if status.is_failed or status.video_url is None:
        raise GenerationFailedError(
            f"video {status.task_id} failed: {status.error or 'no reason given'}. "
            f"NanoPhoto refunds its {request.cost} credits; a new submit is charged again.",
            code=status.error_code or GenerationFailedError.code,
        )
    result = VideoResult(
        task_id=status.task_id,
        video_url=status.video_url,
        generation_time=status.generation_time,
        prompt_credits=prompt_credits,
        video_credits=status.credits_used if status.credits_used is not None else request.cost,
        prompt=request.prompt,
        timings=timings,
    )
    if output_dir:
        started = time.monotonic()
        video = await download_video(status.task_id, status.video_url, output_dir)
        timings.download = time.monotonic() - started
        result = result.model_copy(
            update={
                "video_path": str(video.path),
                "video_size": video.size,
                "video_sha256": video.sha256,
                "timings": timings,
            }
        )
    logger.info(
        "video %s ready: %s credits, generated in %s s",
        result.task_id,
        result.credits_used,
        result.generation_time,
    )
    return result


async def _check(task_id: str) -> VideoStatus:
    return await check_video_status(task_id)
