"""Following a video task from the command line: a transient error never abandons it.

``watch_to_end`` checks on NanoPhoto's schedule (``nanophoto.watch``), prints
every answer as a ``progress`` document, and on a terminal keeps a live line
with the status, the elapsed time and the next check.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nanophoto.client import NanoPhotoClient
from nanophoto.errors import NanoPhotoError
from nanophoto.models import VideoStatus
from nanophoto.settings import current_settings
from nanophoto.watch import WatchSchedule, wait_notice, watch_video
from sora2.output import EXIT_FAILED, EXIT_OK, Session


async def follow(
    client: NanoPhotoClient,
    submitted: VideoStatus,
    schedule: WatchSchedule,
    session: Session,
    *,
    submitted_at: float,
) -> int:
    """Watch ``submitted`` to its end; exit 0 only if the video completed."""
    final = await watch_to_end(client, submitted, schedule, session, submitted_at)
    return EXIT_OK if final is not None and final.is_completed else EXIT_FAILED


async def watch_to_end(
    client: NanoPhotoClient,
    submitted: VideoStatus,
    schedule: WatchSchedule,
    session: Session,
    submitted_at: float,
) -> VideoStatus | None:
    """Check on ``schedule`` until final; a transient error never abandons the task.

    Returns the final status, or None when watching ended without one (after
    telling the person why and how to pick it up again).
    """
    out = session.out
    task_id = submitted.task_id
    state = {"status": submitted.status}

    async def check(task_id: str) -> VideoStatus:
        status = await client.check_status(task_id)
        state["status"] = status.status
        out.document("progress", status.raw)
        return status

    def transient(error: NanoPhotoError) -> None:
        session.note(f"check failed ({error.code}); still watching {task_id}")

    def waiting(seconds: float, left: float) -> None:
        notice = wait_notice(task_id, seconds, left, current_settings().time_scale)
        hint = f" (sora2 resume --task-id {task_id})" if seconds >= left else ""
        session.note(notice + hint)

    async def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            out.progress(state["status"], time.monotonic() - submitted_at, left)
            await asyncio.sleep(min(1.0, left))

    final = submitted
    try:
        if submitted.is_running:
            final = await watch_video(
                task_id,
                check,
                schedule,
                submitted_at=submitted_at,
                sleep=sleep,
                on_transient_error=transient,
                on_wait=waiting,
            )
    except NanoPhotoError as error:
        session.note(f"{error} (watch it again with: sora2 status --task-id {task_id} --follow)")
        return None
    if final.is_failed:
        session.note(f"video {task_id} failed: [{final.error_code}] {final.error or ''}".rstrip())
    return final


class NoteHandler(logging.Handler):
    """Sends the client's retry warnings through ``Session.note``."""

    def __init__(self, session: Session) -> None:
        super().__init__(logging.INFO)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        self.session.note(record.getMessage())
