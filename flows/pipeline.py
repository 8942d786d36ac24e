"""The single-video pipeline every flow shares: exactly once, watched, downloaded, reported.

``finish_earlier_attempt`` looks up what an idempotency key already did, and
may finish that video here (watch it, download it) instead of paying again.
``submit_and_finish`` submits a video once and finishes it. ``finish_video``
watches a submitted video to its end and downloads it. The flows in
``flows/video.py`` and the batch in ``flows/batch.py`` are these steps in
order; the submission records (``tasks/submissions.py``) are what makes them
exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect import get_run_logger

from nanophoto.contract import PROCESSING
from nanophoto.errors import GenerationFailedError, NanoPhotoError, SubmitOutcomeUnknownError
from nanophoto.models import StageTimings, VideoRequest, VideoResult, VideoStatus
from nanophoto.settings import NanoPhotoSettings
from nanophoto.storage import VideoStore
from nanophoto.watch import CheckPlan, CheckStatus, WatchSchedule, watch_video
from tasks.credentials import open_client
from tasks.observe import WaitProgress, emit_video_event, publish_video
from tasks.submissions import SubmissionRecord, SubmissionStore
from tasks.video import check_video_status, download_video, submit_video

# (task id, submitted at) -> when to make each check of that video
PlanFactory = Callable[[str, float], CheckPlan]


def on_our_clock(schedule: WatchSchedule) -> WatchSchedule:
    """The run form's schedule (NanoPhoto's seconds) on this worker's clock.

    ``NANOPHOTO_TIME_SCALE`` is 1 against the real API; against a
    time-compressed simulator (``make sim``: 0.01) the same form values run
    100 times faster, so the UI's defaults work against the sandbox too.
    """
    return schedule.on_clock(NanoPhotoSettings().time_scale)


@dataclass(frozen=True)
class Watching:
    """How the pipeline watches, saves and reports a video: one field per decision."""

    schedule: WatchSchedule  # on our clock (``on_our_clock``)
    output_dir: str  # a folder or fsspec URL; empty: no download
    plan: PlanFactory | None = None  # a batch's budget-aware check times, else the schedule
    artifacts: bool = True  # a progress bar and a link per video (a batch has one table)
    checks_as_tasks: bool = True  # each check a task run; a batch makes plain client calls


@dataclass(frozen=True)
class SubmittedVideo:
    """A video NanoPhoto is making, as the watch starts on it."""

    status: VideoStatus  # its latest status: the task id, maybe already final
    submitted_at: float  # on our clock; checks are timed from it
    prompt: str = ""
    cost: int | None = None  # credits it cost at submit, if known
    paid_here: bool = False  # this run paid for it (not an earlier run, not elsewhere)
    prompt_credits: int = 0
    timings: StageTimings = field(default_factory=StageTimings)

    @property
    def task_id(self) -> str:
        """The NanoPhoto task id."""
        return self.status.task_id


@dataclass(frozen=True)
class EarlierAttempt:
    """What an earlier run with the key left: its finished video, or the attempt now due."""

    result: VideoResult | None  # delivered (now, or before): nothing to submit
    attempt: int  # the number of the next paid attempt, when ``result`` is None


async def finish_earlier_attempt(key: str, fingerprint: str, how: Watching) -> EarlierAttempt:
    """Look up what an earlier run with this idempotency key did, and finish its video.

    A delivered video is returned (downloaded again only if the file is gone);
    a submitted one is watched and downloaded here, with a fresh watch window,
    never paid for again. Otherwise a submit is due: nothing was submitted
    yet, it was refused for sure, or the last attempt's generation failed
    (refunded), which entitles the key to one new paid attempt. Raises
    ``SubmitOutcomeUnknownError`` when an earlier submit may have started.
    """
    store = await SubmissionStore.default()
    record = await store.read(key)
    if record is None:
        return EarlierAttempt(None, 1)
    if record.fingerprint != fingerprint:
        raise ValueError(
            f"idempotency_key: {key!r} was already used for another video (other prompt, "
            "topic or options); use a new key for a new video"
        )
    if record.state == "refused":
        return EarlierAttempt(None, record.attempts)
    if record.state == "failed":
        return EarlierAttempt(None, record.attempts + 1)
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
    if delivered and (not how.output_dir or await _saved(how.output_dir, record.task_id)):
        logger.info("idempotency key %s already delivered video %s", key, record.task_id)
        return EarlierAttempt(record.result, record.attempts)
    logger.info(
        "idempotency key %s already submitted video %s: resuming it, not paying again",
        key,
        record.task_id,
    )
    video = SubmittedVideo(
        status=VideoStatus(task_id=record.task_id, status=PROCESSING),
        submitted_at=time.monotonic(),
        prompt=record.prompt,
        cost=record.cost,
    )
    # A fresh watch window from now: the first run's may be spent already.
    fresh = Watching(
        schedule=how.schedule.model_copy(update={"initial_delay": 0.0}),
        output_dir=how.output_dir,
        plan=how.plan,
        artifacts=how.artifacts,
        checks_as_tasks=how.checks_as_tasks,
    )
    return EarlierAttempt(await finish_and_record(store, record, video, fresh), record.attempts)


async def _saved(output: str, task_id: str) -> bool:
    """Whether ``output`` already holds the whole video of ``task_id``."""
    return await asyncio.to_thread(VideoStore(output).existing, task_id) is not None


async def submit_and_finish(
    request: VideoRequest,
    key: str,
    fingerprint: str,
    attempt: int,
    how: Watching,
    *,
    prompt_seconds: float = 0.0,
    prompt_credits: int = 0,
    on_submitted: Callable[[str], None] | None = None,
) -> VideoResult:
    """Submit once, then finish the video: the part every submitting flow shares.

    ``on_submitted`` hears the task id the moment the video is paid for.
    """
    store = await SubmissionStore.default()
    record = store.new(key, "sending", fingerprint, prompt=request.prompt, cost=request.cost)
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
        duration=request.duration,
        aspect_ratio=request.aspect_ratio.value,
        cost=request.cost,
    )
    video = SubmittedVideo(
        status=submitted,
        submitted_at=submitted_at,
        prompt=request.prompt,
        cost=request.cost,
        paid_here=True,
        prompt_credits=prompt_credits,
        timings=StageTimings(prompt=prompt_seconds, submit=submitted_at - started),
    )
    return await finish_and_record(store, record, video, how)


async def finish_and_record(
    store: SubmissionStore, record: SubmissionRecord, video: SubmittedVideo, how: Watching
) -> VideoResult:
    """``finish_video``, then record how the key's video ended (completed or failed)."""
    try:
        result = await finish_video(video, how)
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


async def finish_video(video: SubmittedVideo, how: Watching) -> VideoResult:
    """Watch a submitted video until it is final, then download it, and report it."""
    logger = get_run_logger()
    task_id, submitted_at = video.task_id, video.submitted_at
    schedule = how.schedule
    progress = WaitProgress(task_id, schedule.expected_generation) if how.artifacts else None
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

    status = video.status
    try:
        if status.is_running:
            async with contextlib.AsyncExitStack() as stack:
                watch_check: CheckStatus = check
                if not how.checks_as_tasks:
                    # Plain calls on one client, not task runs: at hundreds of videos,
                    # a task run per check is most of the CPU.
                    watch_check = (await stack.enter_async_context(open_client())).check_status
                status = await watch_video(
                    task_id,
                    watch_check,
                    schedule,
                    submitted_at=submitted_at,
                    sleep=sleep,
                    on_transient_error=note_transient,
                    plan=None if how.plan is None else how.plan(task_id, submitted_at),
                )
        wait_seconds = time.monotonic() - submitted_at
        if status.is_failed or status.video_url is None:
            refund = f"its {video.cost} credits" if video.cost is not None else "its credits"
            raise GenerationFailedError(
                f"video {task_id} failed: {status.error or 'no reason given'}. "
                f"NanoPhoto refunds {refund}; a new submit is charged again.",
                code=status.error_code or GenerationFailedError.code,
            )
        download_seconds, saved = 0.0, None
        if how.output_dir:
            started = time.monotonic()
            saved = await download_video(task_id, status.video_url, how.output_dir)
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
    credits = status.credits_used if status.credits_used is not None else video.cost
    result = VideoResult(
        task_id=task_id,
        video_url=status.video_url,
        video_path=str(saved.path) if saved else None,
        video_size=saved.size if saved else None,
        video_sha256=saved.sha256 if saved else None,
        generation_time=status.generation_time,
        prompt_credits=video.prompt_credits,
        video_credits=int(credits or 0),
        prompt=video.prompt,
        timings=video.timings.model_copy(
            update={"wait": wait_seconds, "download": download_seconds}
        ),
    )
    if how.artifacts:
        await publish_video(result, paid_here=video.paid_here)
    emit_video_event(
        "completed",
        task_id,
        video_url=result.video_url,
        video_path=result.video_path,
        credits_used=result.credits_used,
        generation_time=result.generation_time,
    )
    if video.paid_here:
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
