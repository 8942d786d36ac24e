"""The single-video pipeline every flow shares: exactly once, watched, downloaded, reported.

``make_video_once`` looks up what an idempotency key already did (and
returns that video, or finishes it here: watch it, download it, instead of
paying again), or claims the key, writes the prompt, submits the video once
and finishes it. ``earlier_outcome`` only reads a key's record (a batch's
rerun, before it reserves any budget). ``finish_video`` watches a submitted
video to its end and downloads it; ``finish_and_record`` records how it ended. The flows in
``flows/video.py`` and the batch in ``flows/batch.py`` are these steps in
order; the submission records (``tasks/submissions.py``) are what makes them
exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from prefect import get_run_logger
from prefect.runtime import flow_run

from nanophoto.contract import PROCESSING, PROMPT_COST
from nanophoto.errors import (
    CompletedWithoutUrlError,
    GenerationFailedError,
    NanoPhotoError,
    SubmitOutcomeUnknownError,
    VideoUnavailableError,
    WaitTimeoutError,
)
from nanophoto.models import (
    PromptRequest,
    StageTimings,
    VideoJob,
    VideoRequest,
    VideoResult,
    VideoStatus,
    fingerprint,
)
from nanophoto.settings import current_settings
from nanophoto.storage import VideoStore
from nanophoto.watch import CheckPlan, CheckStatus, WatchSchedule, wait_notice, watch_video
from tasks.credentials import open_client
from tasks.observe import (
    WaitProgress,
    emit_unknown_outcome,
    emit_video_event,
    publish_prompt,
    publish_video,
)
from tasks.submissions import (
    ClaimLostError,
    SubmissionRecord,
    SubmissionStore,
    claim_ttl,
    current_flow_run,
    key_in_use,
    key_wait,
    new_claim_token,
)
from tasks.video import (
    CheckFailed,
    check_video_status,
    download_video,
    generate_prompt,
    submit_video,
)

# (task id, submitted at) -> when to make each check of that video
PlanFactory = Callable[[str, float], CheckPlan]
# A flow run is started again by the UI's Retry button and by the retry-crashed-video-runs
# automation (deployments/automations.yaml); one started more often than this keeps
# crashing for a reason a retry does not fix.
MAX_RUN_COUNT: Final = 4


def refuse_crash_loop() -> None:
    """Stop, at a run's first line, a flow run that was started more than MAX_RUN_COUNT
    times: its attempts keep crashing, and scheduling it again would loop for ever."""
    count = int(flow_run.run_count or 0)
    if count > MAX_RUN_COUNT:
        raise RuntimeError(
            f"this flow run was started {count} times (its earlier attempts crashed or were "
            f"retried); it stops here, after {MAX_RUN_COUNT}, sending nothing. See why in the "
            "worker's log, then start a new run: the same idempotency_key (or batch_key) "
            "resumes what was already paid for"
        )


def on_our_clock(schedule: WatchSchedule) -> WatchSchedule:
    """The run form's schedule (NanoPhoto's seconds) on this worker's clock.

    ``NANOPHOTO_TIME_SCALE`` is 1 against the real API; against a
    time-compressed simulator (``make sim``: 0.01) the same form values run
    100 times faster, so the UI's defaults work against the sandbox too.
    """
    return schedule.on_clock(current_settings().time_scale)


@dataclass(frozen=True)
class Watching:
    """How the pipeline watches, saves and reports a video: one field per decision."""

    schedule: WatchSchedule  # on our clock (``on_our_clock``)
    output_dir: str  # a folder or fsspec URL; empty: no download
    plan: PlanFactory | None = None  # a batch's budget-aware check times, else the schedule
    artifacts: bool = True  # a progress bar and a link per video (a batch has one table)
    # Each step (prompt, submit, check, download) a task run. A batch makes plain calls:
    # a task run per step was most of Prefect's work per item (its state events, its log
    # lines, the server storing them), and what keeps a submit exactly-once is the
    # submission record, not the task run. Its table, events and logs show each item.
    steps_as_tasks: bool = True
    live_prompt: bool = True  # the prompt logged line by line; a batch logs it in one record


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


@dataclass
class Spend:
    """What one job cost in this run, as NanoPhoto's ledger shows it (a batch adds these up).

    Credits whose charge is unknown (a submit or a prompt stream that may
    have reached NanoPhoto before its answer was lost) are at risk, never
    counted as spent.
    """

    prompt_credits: int = 0  # prompt streams surely charged
    video_credits: int = 0  # the video, submitted by this run (0 once refunded)
    at_risk: int = 0  # maybe charged: an unknown submit, a prompt attempt cut before text
    task_id: str | None = None  # the task this run submitted or watched
    earlier: bool = False  # an earlier run paid for the video
    possibly_charged_twice: bool = False  # an unknown outcome sent again by policy

    @property
    def credits(self) -> int:
        """Credits surely spent by this run on this job."""
        return self.prompt_credits + self.video_credits


async def earlier_outcome(key: str) -> SubmissionRecord | None:
    """What an earlier run did with this key, read without taking its lock (a batch
    reads it before reserving budget: a video already paid for costs nothing)."""
    return await (await SubmissionStore.default()).read(key)


async def make_video_once(
    job: VideoJob,
    key: str,
    how: Watching,
    *,
    spend: Spend | None = None,
    resubmit_unknown_up_to: int = 0,
    on_submitted: Callable[[str], None] | None = None,
) -> VideoResult:
    """The video of ``job``, paid for once under ``key``, whatever other runs do or did.

    A delivered video is returned (downloaded again only if the file is gone);
    a submitted one is resumed. While another run's claim on the key is alive,
    this run waits for it (``key_wait``), then looks again. Otherwise it claims
    the key (``queued``, a lease it renews), writes the prompt (or reuses the
    one a stopped run paid for) and submits once; the watch and the download
    come after. Each look and each change is one short hold of the key's lock.

    An earlier submit whose outcome is unknown is never sent again, unless its
    price is at most ``resubmit_unknown_up_to`` credits: then it is, and the
    video is reported as possibly charged twice. A video this very flow run saw
    fail stays failed when the run is retried after a crash (as it would have
    ended without one); a new run with the key submits it again.
    """
    refuse_crash_loop()
    spend = spend if spend is not None else Spend()
    store = await SubmissionStore.default()
    print_ = fingerprint(job)
    token = new_claim_token()
    wait = key_wait()
    deadline = time.monotonic() + wait
    while True:
        async with store.holding(key):
            record = await store.read(key)
            _check_fingerprint(record, print_, key)
            step = await _next_step(record, how, token)
            if step == "unknown" and record and 0 < record.cost <= resubmit_unknown_up_to:
                record = await _released_by_policy(store, record)
                step = "claim"
            if step == "claim":
                claimed = await store.write(_claim(key, print_, job, record, token))
        if step == "delivered" and record is not None and record.result is not None:
            get_run_logger().info(
                "idempotency key %s already delivered video %s", key, record.result.task_id
            )
            _count_earlier_attempt(spend, record)
            spend.task_id = record.result.task_id
            return record.result
        if step == "resume" and record is not None:
            video = _resumed(record)
            break
        if step == "unknown" and record is not None:
            raise _unknown_outcome(record)
        if step == "failed" and record is not None:
            _count_earlier_attempt(spend, record)
            spend.video_credits, spend.task_id = 0, record.task_id  # refunded by NanoPhoto
            raise GenerationFailedError(
                f"video {record.task_id} failed in this run before it was retried (NanoPhoto "
                "refunded it); a new run with the same key submits it again, a new paid attempt"
            )
        if step == "claim":
            spend.possibly_charged_twice = claimed.possibly_charged_twice
            async with _kept_alive(store, key, token):
                video, record = await _prompt_and_submit(store, claimed, job, how, spend)
            break
        if time.monotonic() >= deadline:  # another run's claim is alive: wait, look again
            raise key_in_use(key, record, wait)
        await asyncio.sleep(0.2)
    if video.paid_here and on_submitted is not None:
        on_submitted(video.task_id)
    if not video.paid_here:
        get_run_logger().info(
            "idempotency key %s already submitted video %s: resuming it, not paying again",
            key,
            video.task_id,
        )
        assert record is not None
        _count_earlier_attempt(spend, record)
        how = _fresh_window(how)
    spend.task_id = video.task_id
    assert record is not None
    try:
        return await finish_and_record(store, record, video, how)
    except GenerationFailedError:
        spend.video_credits = 0  # refunded by NanoPhoto
        raise


async def _next_step(record: SubmissionRecord | None, how: Watching, token: str) -> str:
    """What this run does with the key now: delivered, resume, failed, wait, unknown or
    claim."""
    if record is None:
        return "claim"
    delivered = record.result if record.state == "completed" else None
    if delivered is not None and (
        not how.output_dir or await _saved(how.output_dir, delivered.task_id)
    ):
        return "delivered"
    if record.task_id and record.state in ("submitted", "completed"):
        return "resume"
    if record.state == "failed" and _this_run_s(record):
        return "failed"  # seen failing by this very run before it crashed and was retried
    if record.claimed_by_another(token):
        return "wait"
    if record.state == "sending":
        return "unknown"
    return "claim"  # no live claim: a stopped run's queued, failed, refused, released


def _check_fingerprint(record: SubmissionRecord | None, print_: str, key: str) -> None:
    if record is not None and record.fingerprint != print_:
        raise ValueError(
            f"idempotency_key: {key!r} was already used for another video (other prompt, "
            "topic or options); use a new key for a new video"
        )


def _claim(
    key: str, print_: str, job: VideoJob, record: SubmissionRecord | None, token: str
) -> SubmissionRecord:
    """The key claimed by this run: ``queued``, with a lease, the next attempt's number,
    and the prompt a stopped run already paid for."""
    claimed = SubmissionStore.new(key, "queued", print_, job)
    if record is not None:
        again = record.state in ("failed", "released")  # a new paid attempt
        claimed = claimed.model_copy(
            update={
                "attempts": record.attempts + (1 if again else 0),
                "prompt": record.prompt or claimed.prompt,
                "prompt_credits": record.prompt_credits,
                "possibly_charged_twice": record.possibly_charged_twice
                or record.state == "released",
                "created_at": record.created_at or claimed.created_at,
            }
        )
    lease = datetime.now(UTC) + timedelta(seconds=claim_ttl())
    return claimed.model_copy(update={"claim": token, "claimed_until": lease})


async def _released_by_policy(store: SubmissionStore, record: SubmissionRecord) -> SubmissionRecord:
    """``resubmit_unknown_up_to_credits`` allows it: release the unknown, and say so."""
    get_run_logger().warning(
        "idempotency key %s: an earlier submit's outcome is unknown; sending it again as "
        "resubmit_unknown_up_to_credits allows: possibly charged twice (%d credits)",
        record.key,
        record.cost,
    )
    emit_unknown_outcome(record.key, record.cost, resubmitted=True)
    return await store.write(
        record.model_copy(
            update={
                "state": "released",
                "possibly_charged_twice": True,
                "note": "released by resubmit_unknown_up_to_credits: possibly charged twice",
            }
        )
    )


@asynccontextmanager
async def _kept_alive(store: SubmissionStore, key: str, token: str) -> AsyncIterator[None]:
    """Renew this run's claim on ``key`` while it prepares and sends the submit.

    Through ``sending`` too: another run with the key then waits for this one's
    answer instead of reporting an unknown outcome that is not (yet) unknown.
    """
    ttl = claim_ttl()

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl / 4)
            lease = datetime.now(UTC) + timedelta(seconds=ttl)
            try:
                renewed = await store.update(
                    key,
                    lambda r: r.state in ("queued", "sending") and r.claim == token,
                    {"claimed_until": lease},
                )
            except NanoPhotoError as error:  # the next renewal tries again
                get_run_logger().warning("could not renew the claim on %s: %s", key, error)
                continue
            if renewed is None:
                return  # submitted, refused, or taken over: nothing left to renew

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)


def _count_earlier_attempt(spend: Spend, record: SubmissionRecord) -> None:
    """A video found already paid for: by another run (it costs this one nothing), or by
    this very flow run before it crashed and was retried, whose spend is still its own
    (a batch's summary and budget count it once, where it was paid)."""
    if _this_run_s(record):
        spend.video_credits = record.cost
        spend.prompt_credits = record.prompt_credits
    else:
        spend.earlier = True


def _this_run_s(record: SubmissionRecord) -> bool:
    """Whether the record's attempt is this very flow run's (before a crash and a retry)."""
    return record.flow_run_id is not None and record.flow_run_id == current_flow_run()


def _resumed(record: SubmissionRecord) -> SubmittedVideo:
    assert record.task_id is not None
    return SubmittedVideo(
        status=VideoStatus(task_id=record.task_id, status=PROCESSING),
        submitted_at=time.monotonic(),
        prompt=record.prompt,
        cost=record.cost,
    )


def _fresh_window(how: Watching) -> Watching:
    """A resumed video gets a watch window from now: the first run's may be spent."""
    return replace(how, schedule=how.schedule.model_copy(update={"initial_delay": 0.0}))


def _unknown_outcome(record: SubmissionRecord) -> SubmitOutcomeUnknownError:
    return SubmitOutcomeUnknownError(
        f"an earlier submit with idempotency key {record.key!r} (flow run "
        f"{record.flow_run_id}, {record.updated_at:%Y-%m-%d %H:%M:%S} UTC, {record.cost} "
        "credits) may have reached NanoPhoto, and its outcome is unknown. It is not sent "
        f"again, to avoid paying twice. To do: {record.what_to_do()}."
    )


async def _prompt_and_submit(
    store: SubmissionStore,
    claimed: SubmissionRecord,
    job: VideoJob,
    how: Watching,
    spend: Spend,
) -> tuple[SubmittedVideo, SubmissionRecord]:
    """Write the prompt (unless the claim carries one) and submit once, under our claim."""
    logger = get_run_logger()
    key, token = claimed.key, claimed.claim
    started = time.monotonic()
    if isinstance(job, PromptRequest) and not claimed.prompt:
        try:
            write = generate_prompt if how.steps_as_tasks else generate_prompt.fn
            generated = await write(job, live=how.live_prompt)
        except NanoPhotoError as error:
            spend.prompt_credits += PROMPT_COST * error.prompt_streams_charged
            spend.at_risk += PROMPT_COST * error.prompt_streams_at_risk
            raise
        spend.prompt_credits += PROMPT_COST * generated.streams_charged
        spend.at_risk += PROMPT_COST * generated.streams_at_risk
        updated = await store.update(
            key,
            lambda r: r.state == "queued" and r.claim == token,
            {"prompt": generated.text, "prompt_credits": spend.prompt_credits},
        )
        if updated is None:
            raise ClaimLostError(
                f"idempotency key {key!r} was taken over by another run while this one wrote "
                "its prompt; nothing was submitted"
            )
        claimed = updated
    elif isinstance(job, PromptRequest):
        logger.info("idempotency key %s: reusing the prompt an earlier run paid for", key)
    prompt_seconds = time.monotonic() - started
    request = job if isinstance(job, VideoRequest) else job.with_prompt(claimed.prompt)
    if how.artifacts:
        await publish_prompt(request, topic=getattr(job, "topic", None))
    try:
        send = submit_video if how.steps_as_tasks else submit_video.fn
        submitted = await send(claimed, request)
    except NanoPhotoError as error:
        if error.may_have_started:
            spend.at_risk += request.cost
            emit_unknown_outcome(key, request.cost, resubmitted=False)
        raise
    submitted_at = time.monotonic()
    spend.video_credits = request.cost
    emit_video_event(
        "submitted",
        submitted.task_id,
        model_tier=request.model_tier.value,
        duration=request.duration,
        aspect_ratio=request.aspect_ratio.value,
        cost=request.cost,
        idempotency_key=key,
    )
    video = SubmittedVideo(
        status=submitted,
        submitted_at=submitted_at,
        prompt=request.prompt,
        cost=request.cost,
        paid_here=True,
        prompt_credits=spend.prompt_credits,
        timings=StageTimings(prompt=prompt_seconds, submit=submitted_at - started - prompt_seconds),
    )
    record = claimed.model_copy(update={"state": "submitted", "task_id": submitted.task_id})
    return video, record


async def _saved(output: str, task_id: str) -> bool:
    """Whether ``output`` already holds the whole video of ``task_id``."""
    return await asyncio.to_thread(VideoStore(output).existing, task_id) is not None


async def finish_and_record(
    store: SubmissionStore, record: SubmissionRecord, video: SubmittedVideo, how: Watching
) -> VideoResult:
    """``finish_video``, then record how the key's video ended (completed or failed).

    Recorded only if the key's record is still this video's attempt: a run
    that watched a video late never overwrites a newer attempt.
    """
    try:
        result = await finish_video(video, how)
    except GenerationFailedError:
        await _record(store, record, video.task_id, {"state": "failed"})
        raise
    await _record(store, record, video.task_id, {"state": "completed", "result": result})
    return result


async def _record(
    store: SubmissionStore, record: SubmissionRecord, task_id: str, change: dict[str, object]
) -> None:
    """Best-effort: the video's fate is decided; a rerun just resumes it if this fails."""

    def same_attempt(stored: SubmissionRecord) -> bool:
        return stored.attempts == record.attempts and stored.task_id in (None, task_id)

    try:
        written = await store.update(record.key, same_attempt, {"task_id": task_id, **change})
    except NanoPhotoError as error:
        get_run_logger().warning("%s", error)
        return
    if written is None:
        get_run_logger().info(
            "idempotency key %s moved on to a newer attempt: video %s not recorded over it",
            record.key,
            task_id,
        )


def _may_still_finish(error: NanoPhotoError) -> bool:
    """The watch ended on an error of ours or of the key (401, 403, 402...): the video
    itself may still finish at NanoPhoto."""
    return not isinstance(
        error,
        GenerationFailedError | WaitTimeoutError | CompletedWithoutUrlError | VideoUnavailableError,
    ) and error.code not in ("TASK_NOT_FOUND",)


def _with_resume_hint(error: NanoPhotoError, task_id: str) -> NanoPhotoError:
    """The same error, saying which video is still at stake and how to pick it up."""
    hinted = copy.copy(error)
    hinted.message = (
        f"{error.message}. Watching video {task_id} stopped; it may still finish at "
        f"NanoPhoto: once this is fixed, resume it without paying again (resume-video with "
        f"task_id={task_id}, or sora2 resume --task-id {task_id})"
    )
    hinted.args = (hinted.message,)
    return hinted


async def finish_video(video: SubmittedVideo, how: Watching) -> VideoResult:
    """Watch a submitted video until it is final, then download it, and report it."""
    logger = get_run_logger()
    task_id, submitted_at = video.task_id, video.submitted_at
    schedule = how.schedule
    progress = (
        WaitProgress(task_id, schedule.expected_generation, current_settings().time_scale)
        if how.artifacts
        else None
    )
    if progress is not None:
        await progress.start()

    async def check(task_id: str) -> VideoStatus:
        status = await check_video_status(task_id)
        if isinstance(status, CheckFailed):  # a warning on the run, not a failed task run
            raise status.error
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

    def note_wait(seconds: float, left: float) -> None:
        notice = wait_notice(task_id, seconds, left, current_settings().time_scale)
        hint = f" (resume-video, task_id={task_id})" if seconds >= left else ""
        logger.warning("%s%s", notice, hint)

    status = video.status
    try:
        if status.is_running:
            async with contextlib.AsyncExitStack() as stack:
                watch_check: CheckStatus = check
                if not how.steps_as_tasks:
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
                    on_wait=note_wait,
                    plan=None if how.plan is None else how.plan(task_id, submitted_at),
                )
        wait_seconds = time.monotonic() - submitted_at
        if status.is_failed:
            refund = f"its {video.cost} credits" if video.cost is not None else "its credits"
            raise GenerationFailedError(
                f"video {task_id} failed: {status.error or 'no reason given'}. "
                f"NanoPhoto refunds {refund}; a new submit is charged again.",
                code=status.error_code or GenerationFailedError.code,
            )
        if status.video_url is None:  # done and paid for, without a URL: never a refund
            raise CompletedWithoutUrlError(
                f"NanoPhoto says video {task_id} is completed (and charged) but gave no video "
                f"URL; it was not refunded. Resume it later to download it without paying "
                f"again (resume-video with task_id={task_id}, sora2 resume --task-id {task_id})"
            )
        download_seconds, saved = 0.0, None
        if how.output_dir:
            started = time.monotonic()
            save = download_video if how.steps_as_tasks else download_video.fn
            saved = await save(task_id, status.video_url, how.output_dir)
            download_seconds = time.monotonic() - started
    except Exception as error:
        # Every way a watched video can end badly is a "failed" event, so an
        # automation on it never misses one (a cancelled run is not a failure).
        code = error.code if isinstance(error, NanoPhotoError) else type(error).__name__
        emit_video_event("failed", task_id, error_code=code, error=str(error)[:1000])
        if progress is not None:
            await progress.finish(f"{status.status}: {code}", completed=False)
        if isinstance(error, NanoPhotoError) and _may_still_finish(error):
            raise _with_resume_hint(error, task_id) from error
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
