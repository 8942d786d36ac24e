"""Prefect tasks, one per NanoPhoto call.

The API key is loaded inside each task (``tasks.credentials.open_client``),
never passed as a parameter or argument, so it never lands in a run's stored
parameters.

Retry policy, chosen per call (the client's ``_call`` carries it out, with
capped exponential back-off and ``Retry-After``; no Prefect-level retries on
top, which would multiply the attempts and cannot honour ``Retry-After``):

* ``generate_prompt``: retried on transient errors. A failed prompt is
  refunded, so a second attempt never costs twice.
* ``submit_video``: never sent again once it may have reached the server
  (a second submit is a second charge); retried only when it surely did not
  start (no connection, or a 429).
* ``check_video_status``: retried on transient errors; it costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import AfterValidator, Field

from nanophoto.client import DownloadedVideo
from nanophoto.errors import NanoPhotoError
from nanophoto.models import GeneratedPrompt, PromptRequest, VideoRequest, VideoStatus
from nanophoto.storage import OUTPUT_ROOT_VARIABLE, VideoStore, confined, output_root
from tasks.credentials import open_client
from tasks.submissions import ClaimLostError, SubmissionRecord, SubmissionStore, claim_ttl


def confine_output(location: str) -> str:
    """``location`` made safe to write: inside the output folder, or a remote URL."""
    try:
        return confined(location, output_root())
    except ValueError as error:
        raise ValueError(f"{error} (the worker's {OUTPUT_ROOT_VARIABLE})") from None


# A flow parameter: checked by Prefect's parameter validation, before any request;
# the default too, so "." names the output folder, not the worker's directory.
OutputDir = Annotated[str, Field(validate_default=True), AfterValidator(confine_output)]


class _LineLogger:
    """Logs streamed text a whole line at a time, as it arrives; or, not ``live``, all of
    it in one record at the end (a batch: one log record per prompt instead of a dozen,
    each stored by the Prefect server)."""

    def __init__(self, *, live: bool = True) -> None:
        self._logger = get_run_logger()
        self._pending = ""
        self._live = live

    def feed(self, text: str) -> None:
        self._pending += text
        if not self._live:
            return
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._logger.info("prompt | %s", line)

    def discard(self, error: NanoPhotoError, characters: int) -> None:
        self._pending = ""
        self._logger.warning(
            "prompt stream broke after %d characters (%s); discarding them", characters, error.code
        )

    def flush(self) -> None:
        if self._pending:
            text = self._pending.rstrip("\n").replace("\n", "\nprompt | ")
            self._logger.info("prompt | %s", text)
            self._pending = ""


@dataclass(frozen=True)
class CheckFailed:
    """A status check that failed for now; the next scheduled check tries again."""

    error: NanoPhotoError


@task(name="generate-prompt", cache_policy=NO_CACHE, retries=0)
async def generate_prompt(request: PromptRequest, live: bool = True) -> GeneratedPrompt:
    """Stream a structured video prompt for a topic, logging it as it is written.

    Args:
        request: The topic and how to film it.
        live: Log each line as it arrives; False: the whole prompt in one record.

    Returns:
        The whole prompt text, and how many prompt streams may have been charged.
    """
    lines = _LineLogger(live=live)
    async with open_client() as client:
        prompt = await client.generate_prompt(request, on_text=lines.feed, on_discard=lines.discard)
    lines.flush()
    return prompt


@task(name="submit-video", cache_policy=NO_CACHE, retries=0)
async def submit_video(record: SubmissionRecord, request: VideoRequest) -> VideoStatus:
    """Start a paid video generation and return its task (never sent twice).

    The caller has claimed the key (``record``: ``queued``, with its claim).
    Here the record becomes ``sending`` only once the request budget granted
    the submit its slot, the moment before the bytes leave, and only if the
    claim is still this run's (else nothing is sent); ``queued`` again after
    an attempt that surely did not start; then ``submitted`` with the task id
    the moment it returns, or ``refused`` when NanoPhoto surely did not start
    it. When the outcome is unknown it stays ``sending``, and the submissions
    ledger lists it. Never retried by Prefect: a second send is a second charge.

    Args:
        record: The idempotency key's claimed record for this attempt (no secrets).
        request: The prompt and rendering options.

    Returns:
        The task's first status; ``task_id`` is what to watch.
    """
    logger = get_run_logger()
    store = await SubmissionStore.default()
    key, claim = record.key, record.claim

    def ours(*states: str) -> Callable[[SubmissionRecord], bool]:
        return lambda r: r.state in states and r.claim == claim and r.attempts == record.attempts

    async def sending() -> None:
        if await store.update(key, ours("queued", "sending"), {"state": "sending"}) is None:
            raise ClaimLostError(
                f"idempotency key {key!r} was taken over by another run while this one waited "
                "to send; nothing was sent"
            )

    async def unsent(error: NanoPhotoError) -> None:
        renewed = datetime.now(UTC) + timedelta(seconds=claim_ttl())
        await store.update(key, ours("sending"), {"state": "queued", "claimed_until": renewed})

    try:
        async with open_client() as client:
            status = await client.submit(request, before_send=sending, after_unsent=unsent)
    except ClaimLostError:
        raise
    except NanoPhotoError as error:
        if not error.may_have_started:  # refused for sure: nothing was charged
            await store.update(
                key, ours("queued", "sending"), {"state": "refused", "note": error.code}
            )
        else:
            # The claim ends now: a run waiting for this answer learns at once that it is
            # unknown (the record stays ``sending``: the ledger lists it).
            with contextlib.suppress(NanoPhotoError):
                await store.update(key, ours("sending"), {"claimed_until": datetime.now(UTC)})
            logger.error(
                "the submit of idempotency key %s may have reached NanoPhoto (%s): it is "
                "listed as an unknown outcome in the submissions ledger (sora2 submissions "
                "list); resolve it with the task id from your NanoPhoto account, or release it",
                key,
                error.code,
            )
        raise
    # Named in the log before anything else can fail, so a paid task is never lost.
    logger.info(
        "submitted %s (%s, %s s, %s): %s credits",
        status.task_id,
        request.model_tier.value,
        request.duration,
        request.aspect_ratio.value,
        request.cost,
    )
    change = {"state": "submitted", "task_id": status.task_id}
    for attempt in range(3):  # a paid task id must land in the record if it can
        try:
            await store.update(key, ours("sending"), change)
            break
        except NanoPhotoError as error:
            if attempt == 2:  # paid: watch it anyway; the log names the task
                logger.error("%s; watching %s anyway", error, status.task_id)
            else:
                await asyncio.sleep(0.5 * 2**attempt)
    return status


@task(name="check-video-status", cache_policy=NO_CACHE, retries=0)
async def check_video_status(task_id: str) -> VideoStatus | CheckFailed:
    """Ask NanoPhoto how a video task is doing.

    A check that failed in a way the next check may not (a 429, a gateway page,
    a dropped connection, after the client's retries) is returned, not raised:
    the watch rides it out, and the run's page shows a warning, not a failed
    task run. An error no retry can fix (401, 404) fails the task.

    Args:
        task_id: The NanoPhoto task id returned by the submit.

    Returns:
        Its status: running, completed (with the video URL) or failed; or the
        transient failure of this check.
    """
    try:
        async with open_client() as client:
            status = await client.check_status(task_id)
    except NanoPhotoError as error:
        if not error.retryable:
            raise
        return CheckFailed(error)
    get_run_logger().info("video %s: %s", task_id, status.status)
    return status


@task(name="download-video", cache_policy=NO_CACHE, retries=0)
async def download_video(task_id: str, video_url: str, output_dir: str) -> DownloadedVideo:
    """Save a finished video, named by its task id, before its URL expires; once only.

    Args:
        task_id: The NanoPhoto task id; it names the file.
        video_url: Where NanoPhoto serves the finished video.
        output_dir: A folder inside the worker's output folder, or a remote fsspec URL
            (``s3://bucket/videos``).

    Returns:
        The saved file's path or URL, size and SHA-256.
    """
    logger = get_run_logger()
    store = VideoStore(confine_output(output_dir))  # also when called from elsewhere
    kept = await asyncio.to_thread(store.existing, task_id)
    if kept is not None:  # only whole files ever get the final name
        logger.info("already saved %s (%d bytes): not downloaded again", kept.path, kept.size)
        return DownloadedVideo(kept.path, kept.size, kept.sha256)
    async with open_client() as client:
        video = await client.download_finished(task_id, video_url, store)
    logger.info("saved %s (%d bytes, sha256 %s)", video.path, video.size, video.sha256)
    return video
