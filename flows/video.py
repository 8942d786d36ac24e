"""The flows users run: topic → video, ready prompt → video, and resume by task id.

Each reads like the product: prompt, submit, wait, download. Every input is
validated before the first call, so bad input costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from nanophoto.contract import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_DURATION,
    DEFAULT_LOCALE,
    DEFAULT_MODE,
    DEFAULT_PROMPT_MODEL,
    DEFAULT_TECHNIQUE,
    DEFAULT_TIER,
    PROCESSING,
    PROMPT_COST,
    AspectRatio,
    Duration,
    Locale,
    Mode,
    ModelTier,
    Technique,
)
from nanophoto.errors import GenerationFailedError, NanoPhotoError, SubmitOutcomeUnknownError
from nanophoto.models import (
    ImageUrls,
    ModelName,
    PromptRequest,
    PromptText,
    StageTimings,
    TaskIdText,
    Topic,
    VideoOptions,
    VideoRequest,
    VideoResult,
    VideoStatus,
)
from nanophoto.settings import NanoPhotoSettings
from nanophoto.storage import VideoStore
from nanophoto.watch import CheckPlan, ResumeSchedule, WatchSchedule, watch_video
from tasks.credentials import open_client
from tasks.observe import WaitProgress, emit_video_event, publish_prompt, publish_video
from tasks.submissions import (
    IdempotencyKey,
    SubmissionRecord,
    SubmissionStore,
    fingerprint,
    resolve_idempotency_key,
)
from tasks.video import check_video_status, download_video, generate_prompt, submit_video

# (task id, submitted at) -> when to make each check of that video
PlanFactory = Callable[[str, float], CheckPlan]
# Each run's result is kept in result storage (it holds no secret): readable from the
# API after the run (run_deployment, the UI), and still there when a retried state
# change makes the server answer with its own copy of the state. Prefect's default
# serializer: its JSON one hands a pydantic result back as a plain dict.
RESULTS: Final[dict[str, Any]] = {"persist_result": True}


def on_our_clock(schedule: WatchSchedule) -> WatchSchedule:
    """The run form's schedule (NanoPhoto's seconds) on this worker's clock.

    ``NANOPHOTO_TIME_SCALE`` is 1 against the real API; against a
    time-compressed simulator (``make sim``: 0.01) the same form values run
    100 times faster, so the UI's defaults work against the sandbox too.
    """
    return schedule.on_clock(NanoPhotoSettings().time_scale)


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


@flow(name="topic-to-video", flow_run_name=_topic_run_name, **RESULTS)
async def topic_to_video(
    topic: Topic,
    technique: Technique = DEFAULT_TECHNIQUE,
    duration: Duration = DEFAULT_DURATION,
    locale: Locale = DEFAULT_LOCALE,
    mode: Mode = DEFAULT_MODE,
    image_urls: ImageUrls = [],  # noqa: B006 (never mutated; a list renders as a list field)
    model_tier: ModelTier = DEFAULT_TIER,
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO,
    prompt_model: ModelName = DEFAULT_PROMPT_MODEL,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: str = "videos",
    idempotency_key: IdempotencyKey | None = None,
) -> VideoResult:
    """Turn a topic into a finished Sora 2 video: prompt, submit, wait, download.

    Args:
        topic: What the video is about: 1 to 500 characters, not only spaces.
        technique: The cinematic technique the shots are built around.
        duration: Video length in seconds, 10 or 15.
        locale: Language the prompt is written in: en, zh, zh-TW, ja, ko, es, fr, de, pt,
            ru or ar.
        mode: textToVideo, or imageToVideo to start from reference images.
        image_urls: Up to 3 public image addresses starting with http:// or https://
            (no file paths, data: URLs or base64); required for imageToVideo.
        model_tier: sora2 (4/8 credits), sora2-pro-standard (60/100, 720p) or
            sora2-pro-high (120/240, 1080p), for 10/15 seconds.
        aspect_ratio: portrait or landscape.
        prompt_model: The model that writes the prompt.
        schedule: When to check the video: first check, interval, and when to
            stop watching, in seconds after submit.
        output_dir: Folder on the worker, or an fsspec URL (s3://bucket/videos), to
            save the video in, named by its task id; empty to skip the download.
        idempotency_key: Runs with the same key make one video, paid once: a
            rerun resumes the video already submitted instead of paying again.
            1 to 200 letters, digits and the characters _ . : - (no spaces).
            Empty: this flow run's id (so a retry of this run resumes it).

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    prompt_request = PromptRequest(
        topic=topic,
        technique=technique,
        duration=duration,
        locale=locale,
        mode=mode,
        image_urls=image_urls,
        model=prompt_model,
    )
    options = VideoOptions(
        mode=mode,
        image_urls=image_urls,
        model_tier=model_tier,
        aspect_ratio=aspect_ratio,
        video_duration=duration,
    )
    schedule = on_our_clock(schedule)
    key = resolve_idempotency_key(idempotency_key)
    source = prompt_request.model_dump(mode="json", exclude={"mode", "image_urls"})
    print_ = fingerprint(options, {"topic": source})
    earlier, attempt = await earlier_attempt(key, print_, schedule, output_dir)
    if earlier is not None:
        return earlier
    started = time.monotonic()
    prompt = await generate_prompt(prompt_request)
    request = options.with_prompt(prompt.text)
    await publish_prompt(request, topic=prompt_request.topic)
    return await make_video(
        request,
        key,
        print_,
        attempt,
        schedule,
        output_dir,
        prompt_seconds=time.monotonic() - started,
        prompt_credits=PROMPT_COST * prompt.streams_charged,
    )


@flow(name="prompt-to-video", flow_run_name=_prompt_run_name, **RESULTS)
async def prompt_to_video(
    prompt: PromptText,
    mode: Mode = DEFAULT_MODE,
    image_urls: ImageUrls = [],  # noqa: B006 (never mutated; a list renders as a list field)
    model_tier: ModelTier = DEFAULT_TIER,
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO,
    video_duration: Duration = DEFAULT_DURATION,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: str = "videos",
    idempotency_key: IdempotencyKey | None = None,
) -> VideoResult:
    """Turn a ready prompt into a finished Sora 2 video: submit, wait, download.

    Args:
        prompt: The video prompt, as written by you or the prompt generator; not
            only spaces.
        mode: textToVideo, or imageToVideo to start from reference images.
        image_urls: Up to 3 public image addresses starting with http:// or https://
            (no file paths, data: URLs or base64); required for imageToVideo.
        model_tier: sora2 (4/8 credits), sora2-pro-standard (60/100, 720p) or
            sora2-pro-high (120/240, 1080p), for 10/15 seconds.
        aspect_ratio: portrait or landscape.
        video_duration: Video length in seconds, 10 or 15.
        schedule: When to check the video: first check, interval, and when to
            stop watching, in seconds after submit.
        output_dir: Folder on the worker, or an fsspec URL (s3://bucket/videos), to
            save the video in, named by its task id; empty to skip the download.
        idempotency_key: Runs with the same key make one video, paid once: a
            rerun resumes the video already submitted instead of paying again.
            1 to 200 letters, digits and the characters _ . : - (no spaces).
            Empty: this flow run's id (so a retry of this run resumes it).

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    request = VideoRequest(
        prompt=prompt,
        mode=mode,
        image_urls=image_urls,
        model_tier=model_tier,
        aspect_ratio=aspect_ratio,
        video_duration=video_duration,
    )
    schedule = on_our_clock(schedule)
    key = resolve_idempotency_key(idempotency_key)
    print_ = fingerprint(request, {"prompt": request.prompt})
    earlier, attempt = await earlier_attempt(key, print_, schedule, output_dir)
    if earlier is not None:
        return earlier
    await publish_prompt(request)
    return await make_video(request, key, print_, attempt, schedule, output_dir)


@flow(name="resume-video", flow_run_name=_resume_run_name, **RESULTS)
async def resume_video(
    task_id: TaskIdText,
    schedule: ResumeSchedule = ResumeSchedule(),
    output_dir: str = "videos",
) -> VideoResult:
    """Finish a video that was already submitted: watch it, download it, report it.

    For a run that timed out or crashed, or a job started elsewhere. Nothing
    is submitted, so nothing is charged.

    Args:
        task_id: The NanoPhoto task id of the submitted video (as task_abc123:
            letters, digits and the characters _ . -).
        schedule: When to check, in seconds from now: first check (0: at once),
            interval, and when to stop watching.
        output_dir: Folder on the worker, or an fsspec URL (s3://bucket/videos), to
            save the video in, named by its task id; empty to skip the download.

    Returns:
        The task id, video URL and file, credits used and stage timings.
    """
    return await finish_video(
        VideoStatus(task_id=task_id, status=PROCESSING),
        on_our_clock(schedule),
        output_dir,
        submitted_at=time.monotonic(),
    )


async def earlier_attempt(
    key: str,
    print_: str,
    schedule: WatchSchedule,
    output_dir: str,
    *,
    plan: PlanFactory | None = None,
    quiet: bool = False,
) -> tuple[VideoResult | None, int]:
    """What an earlier run with this idempotency key left behind.

    Returns the finished video (returned, or resumed and finished here) and
    the attempt number, or (None, attempt) when a submit is due: nothing was
    submitted yet, it was refused for sure, or the last attempt's generation
    failed (refunded), which entitles the key to one new paid attempt.
    Raises ``SubmitOutcomeUnknownError`` when an earlier submit may have started.
    """
    store = await SubmissionStore.default()
    record = await store.read(key)
    if record is None:
        return None, 1
    if record.fingerprint != print_:
        raise ValueError(
            f"idempotency_key: {key!r} was already used for another video (other prompt, "
            "topic or options); use a new key for a new video"
        )
    if record.state == "refused":
        return None, record.attempts
    if record.state == "failed":
        return None, record.attempts + 1
    if record.state == "sending" or record.task_id is None:
        raise SubmitOutcomeUnknownError(
            f"an earlier submit with idempotency key {key!r} (flow run {record.flow_run_id}) "
            "may have reached NanoPhoto and its outcome is unknown: that run may still be "
            "sending it, or stopped before it knew. It is not sent again, to avoid paying "
            "twice. Check your NanoPhoto account: resume the video by its task id "
            "(resume-video, sora2 resume), or run again with a new idempotency key."
        )
    logger = get_run_logger()
    delivered = record.state == "completed" and record.result is not None
    if delivered and (not output_dir or await _saved(output_dir, record.task_id)):
        logger.info("idempotency key %s already delivered video %s", key, record.task_id)
        return record.result, record.attempts
    logger.info(
        "idempotency key %s already submitted video %s: resuming it, not paying again",
        key,
        record.task_id,
    )
    # A fresh watch window from now: the first run's may be spent already.
    return (
        await finish_and_record(
            store,
            record,
            VideoStatus(task_id=record.task_id, status=PROCESSING),
            schedule.model_copy(update={"initial_delay": 0.0}),
            output_dir,
            submitted_at=time.monotonic(),
            prompt=record.prompt,
            expected_cost=record.cost,
            plan=plan,
            quiet=quiet,
        ),
        record.attempts,
    )


async def _saved(output: str, task_id: str) -> bool:
    """Whether ``output`` already holds the whole video of ``task_id``."""
    return await asyncio.to_thread(VideoStore(output).existing, task_id) is not None


async def make_video(
    request: VideoRequest,
    key: str,
    print_: str,
    attempt: int,
    schedule: WatchSchedule,
    output_dir: str,
    *,
    prompt_seconds: float = 0.0,
    prompt_credits: int = 0,
    plan: PlanFactory | None = None,
    quiet: bool = False,
    on_submitted: Callable[[str], None] | None = None,
) -> VideoResult:
    """Submit once, then finish the video: the part every submitting flow shares.

    ``on_submitted`` hears the task id the moment the video is paid for.
    """
    store = await SubmissionStore.default()
    record = store.new(key, "sending", print_, prompt=request.prompt, cost=request.cost)
    record = record.model_copy(update={"attempts": attempt})
    started = time.monotonic()
    submitted = await submit_video(record, request)
    submitted_at = time.monotonic()
    if on_submitted is not None:
        on_submitted(submitted.task_id)
    record = record.model_copy(update={"state": "submitted", "task_id": submitted.task_id})
    emit_video_event(
        "submitted",
        submitted.task_id,
        model_tier=request.model_tier.value,
        video_duration=request.video_duration,
        aspect_ratio=request.aspect_ratio.value,
        cost=request.cost,
    )
    return await finish_and_record(
        store,
        record,
        submitted,
        schedule,
        output_dir,
        submitted_at=submitted_at,
        prompt=request.prompt,
        expected_cost=request.cost,
        timings=StageTimings(prompt=prompt_seconds, submit=submitted_at - started),
        prompt_credits=prompt_credits,
        plan=plan,
        quiet=quiet,
        paid_here=True,
    )


async def finish_and_record(
    store: SubmissionStore,
    record: SubmissionRecord,
    submitted: VideoStatus,
    schedule: WatchSchedule,
    output_dir: str,
    **details: Any,
) -> VideoResult:
    """``finish_video``, then record how the key's video ended (completed or failed)."""
    try:
        result = await finish_video(submitted, schedule, output_dir, **details)
    except GenerationFailedError:
        await _record(store, record.model_copy(update={"state": "failed"}))
        raise
    await _record(store, record.model_copy(update={"state": "completed", "result": result}))
    return result


async def _record(store: SubmissionStore, record: SubmissionRecord) -> None:
    """Best-effort: the video's fate is decided; a rerun just resumes it if this fails."""
    try:
        await store.write(record)
    except NanoPhotoError as error:
        get_run_logger().warning("%s", error)


async def finish_video(
    submitted: VideoStatus,
    schedule: WatchSchedule,
    output_dir: str,
    *,
    submitted_at: float,
    prompt: str = "",
    expected_cost: int | None = None,
    timings: StageTimings | None = None,
    prompt_credits: int = 0,
    plan: PlanFactory | None = None,
    quiet: bool = False,
    paid_here: bool = False,
) -> VideoResult:
    """Watch a submitted video until it is final, then download it.

    ``paid_here`` says whether this run paid for the video (else it was paid
    at an earlier submit, and this run's report says it cost nothing here).

    Checks follow ``schedule``, or ``plan`` when a batch times them by its
    budget. ``quiet`` leaves out the per-video progress and link artifacts,
    and makes checks plain client calls rather than task runs (a batch
    reports its videos in one table instead).
    """
    logger = get_run_logger()
    task_id = submitted.task_id
    progress = None if quiet else WaitProgress(task_id, schedule.expected_generation)
    if progress is not None:
        await progress.start()

    async def check(task_id: str) -> VideoStatus:
        status = await check_video_status(task_id)
        if progress is not None:
            await progress.update(time.monotonic() - submitted_at, status.status)
        return status

    async def sleep(seconds: float) -> None:
        """Wait for the next check, moving the progress bar as time passes."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(left if progress is None else min(left, progress.tick_seconds))
            if progress is not None and end - time.monotonic() > 0:
                await progress.update(time.monotonic() - submitted_at)

    def note_transient(error: NanoPhotoError) -> None:
        logger.warning("status check failed (%s); still watching %s", error, task_id)

    status = submitted
    try:
        if status.is_running:
            async with contextlib.AsyncExitStack() as stack:
                watch_check = check
                if quiet:
                    # A batch's checks are plain calls on one client, not task runs:
                    # at hundreds of videos, a task run per check is most of the CPU.
                    watch_check = (await stack.enter_async_context(open_client())).check_status
                status = await watch_video(
                    task_id,
                    watch_check,
                    schedule,
                    submitted_at=submitted_at,
                    sleep=sleep,
                    on_transient_error=note_transient,
                    plan=None if plan is None else plan(task_id, submitted_at),
                )
        wait_seconds = time.monotonic() - submitted_at
        if status.is_failed or status.video_url is None:
            refund = f"its {expected_cost} credits" if expected_cost is not None else "its credits"
            raise GenerationFailedError(
                f"video {task_id} failed: {status.error or 'no reason given'}. "
                f"NanoPhoto refunds {refund}; a new submit is charged again.",
                code=status.error_code or GenerationFailedError.code,
            )
        download_seconds, video = 0.0, None
        if output_dir:
            started = time.monotonic()
            video = await download_video(task_id, status.video_url, output_dir)
            download_seconds = time.monotonic() - started
    except Exception as error:
        # Every way a watched video can end badly is a "failed" event, so an
        # automation on it never misses one (a cancelled run is not a failure).
        code = error.code if isinstance(error, NanoPhotoError) else type(error).__name__
        emit_video_event("failed", task_id, error_code=code, error=str(error)[:1000])
        if progress is not None:
            await progress.finish(f"{status.status}: {code}", completed=False)
        raise
    if progress is not None:
        await progress.finish(status.status, completed=True)
    credits = status.credits_used if status.credits_used is not None else expected_cost
    result = VideoResult(
        task_id=task_id,
        video_url=status.video_url,
        video_path=str(video.path) if video else None,
        video_size=video.size if video else None,
        video_sha256=video.sha256 if video else None,
        generation_time=status.generation_time,
        prompt_credits=prompt_credits,
        video_credits=int(credits or 0),
        prompt=prompt,
        timings=(timings or StageTimings()).model_copy(
            update={"wait": wait_seconds, "download": download_seconds}
        ),
    )
    if not quiet:
        await publish_video(result, paid_here=paid_here)
    emit_video_event(
        "completed",
        task_id,
        video_url=result.video_url,
        video_path=result.video_path,
        credits_used=result.credits_used,
        generation_time=result.generation_time,
    )
    if paid_here:
        logger.info(
            "video %s ready: %s credits, generated in %s s",
            task_id,
            result.credits_used,
            result.generation_time,
        )
    else:
        logger.info(
            "video %s ready, generated in %s s: no credits spent by this run "
            "(NanoPhoto charged %s at its submit)",
            task_id,
            result.generation_time,
            result.video_credits,
        )
    return result
