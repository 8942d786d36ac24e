"""The ``sora2`` commands: submit, status, resume, prompt, video, sandbox.

Each takes its parsed arguments and the command's ``Session``, checks every
argument before anything is sent, and returns the exit code: 0 success, 1
failure, 2 bad arguments (from ``UsageError``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from nanophoto.client import NanoPhotoClient
from nanophoto.contract import PROCESSING
from nanophoto.errors import NanoPhotoError
from nanophoto.models import VideoRequest, VideoStatus, video_filename
from nanophoto.ratelimit import RequestLimiter
from nanophoto.settings import PROMPT_SKILL, VIDEO_SKILL, NanoPhotoSettings
from nanophoto.watch import WatchSchedule
from sora2.arguments import (
    prompt_request_from,
    schedule_from,
    settings_from,
    video_request_from,
    watch_schedule_from,
)
from sora2.output import EXIT_FAILED, EXIT_OK, Session
from sora2.quick import UsageError, task_id_of
from sora2.watching import follow, watch_to_end


def _client(
    args: argparse.Namespace,
    settings: NanoPhotoSettings,
    skills: tuple[str, ...] = (VIDEO_SKILL, PROMPT_SKILL),
) -> NanoPhotoClient:
    """A client held to the key's request budget by an in-process limiter.

    The command line has no Prefect server to share the budget through, so
    each command keeps its own requests under the key's limit. ``skills`` is
    the order the OpenClaw file's entries are read in: each command reads
    first where its published counterpart does.
    """
    return NanoPhotoClient(
        args.api_key,
        settings=settings,
        limiter=RequestLimiter(settings.rate_limit, settings.rate_window),
        skills=skills,
    )


def submit(args: argparse.Namespace, session: Session) -> int:
    """Start a video, and with ``--follow`` watch it to its end."""
    request = video_request_from(args, args.prompt)
    settings = settings_from(args)
    schedule = watch_schedule_from(args, settings)
    return asyncio.run(_submit(args, session, request, schedule, settings))


async def _submit(
    args: argparse.Namespace,
    session: Session,
    request: VideoRequest,
    schedule: WatchSchedule,
    settings: NanoPhotoSettings,
) -> int:
    async with _client(args, settings) as client:
        session.submitting = True
        try:
            submitted = await client.submit(request)
        except NanoPhotoError as error:
            session.submitting = False
            session.note(f"submit failed: {error}")
            return EXIT_FAILED
        session.submitting = False
        session.task_id = submitted.task_id
        submitted_at = time.monotonic()
        session.out.document("submitted", submitted.raw)
        session.note(
            f"submitted {submitted.task_id} ({request.cost} credits); "
            f"check it with: sora2 status --task-id {submitted.task_id}"
        )
        if not args.follow:
            return EXIT_FAILED if submitted.is_failed else EXIT_OK
        return await follow(client, submitted, schedule, session, submitted_at=submitted_at)


def status(args: argparse.Namespace, session: Session) -> int:
    """Print a task's status, and with ``--follow`` watch it to its end."""
    task_id = task_id_of(args)
    settings = settings_from(args)
    schedule = watch_schedule_from(args, settings)
    session.task_id = task_id

    async def run() -> int:
        async with _client(args, settings) as client:
            if args.follow:
                pending = VideoStatus(task_id=task_id, status=PROCESSING)
                return await follow(
                    client, pending, schedule, session, submitted_at=time.monotonic()
                )
            try:
                answer = await client.check_status(task_id)
            except NanoPhotoError as error:
                session.note(f"status check failed: {error}")
                return EXIT_FAILED
        session.out.document("status", answer.raw)
        return EXIT_OK  # the document is the answer: a failed task is reported, not judged

    return asyncio.run(run())


def resume(args: argparse.Namespace, session: Session) -> int:
    """Watch a submitted task from now, download it, and print the result."""
    task_id = task_id_of(args)
    try:
        filename = video_filename(task_id)  # it names the file: refuse "../x" before anything
    except ValueError as error:
        raise UsageError(f"--task-id: {error}") from None
    settings = settings_from(args)
    schedule = watch_schedule_from(args, settings)
    session.task_id = task_id

    async def run() -> int:
        async with _client(args, settings) as client:
            pending = VideoStatus(task_id=task_id, status=PROCESSING)
            final = await watch_to_end(client, pending, schedule, session, time.monotonic())
            if final is None or not final.is_completed or final.video_url is None:
                return EXIT_FAILED
            try:
                video = await client.download_finished(
                    task_id, final.video_url, Path(args.output_dir) / filename
                )
            except NanoPhotoError as error:
                session.note(f"download failed: {error}")
                return EXIT_FAILED
        session.out.document(
            "video",
            {
                "taskId": task_id,
                "videoUrl": final.video_url,
                "videoPath": str(video.path),
                "size": video.size,
                "sha256": video.sha256,
                "generationTime": final.generation_time,
                "creditsUsed": final.credits_used,
            },
        )
        return EXIT_OK

    return asyncio.run(run())


def prompt(args: argparse.Namespace, session: Session) -> int:
    """Stream a prompt to a terminal; write it whole to a file or pipe."""
    request = prompt_request_from(args)
    settings = settings_from(args)
    out = session.out

    async def run() -> int:
        written = [""]
        # Streamed to a terminal; to a file or pipe only once whole, so a
        # restarted stream never leaves half a prompt in it.
        live = out.stdout.isatty() and not args.json

        def show(text: str) -> None:
            if live:
                out.stdout.write(text)
                out.stdout.flush()
                written[0] = text

        def discard(error: NanoPhotoError, characters: int) -> None:
            if live:
                out.stdout.write("\n")
            session.note(f"the stream broke after {characters} characters ({error.code}); again:")

        async with _client(args, settings, skills=(PROMPT_SKILL, VIDEO_SKILL)) as client:
            try:
                text = await client.generate_prompt(request, on_text=show, on_discard=discard)
            except NanoPhotoError as error:
                session.note(f"prompt failed: {error}")
                return EXIT_FAILED
        if args.json:
            out.document("prompt", {"prompt": text.text, "streams": text.streams_charged})
        elif not live:
            out.stdout.write(text.text + "\n")
        elif not written[0].endswith("\n"):
            out.stdout.write("\n")  # end on a line break, once
        return EXIT_OK

    return asyncio.run(run())


def output_folder_for_flow(output_dir: str) -> str:
    """``--output-dir`` as a flow parameter: on the command line, the user's folder is the root.

    A flow confines its downloads to the worker's output folder; here the
    process is the worker, and the folder the user named is that folder.
    """
    from fsspec.core import split_protocol  # only for the flow commands, which need it anyway

    from nanophoto.storage import LOCAL_PROTOCOLS, OUTPUT_ROOT_VARIABLE

    if not output_dir.strip():
        return ""  # no download
    protocol, path = split_protocol(output_dir)
    if protocol is not None and protocol not in LOCAL_PROTOCOLS:
        return output_dir  # a remote store: the flow checks its scheme
    folder = Path(path).expanduser().resolve()
    os.environ[OUTPUT_ROOT_VARIABLE] = str(folder)
    return str(folder)


def video(args: argparse.Namespace, session: Session) -> int:
    """Run the topic-to-video Prefect flow and print its result."""
    job = prompt_request_from(args)  # the video's options too, before the prompt is paid for
    schedule = schedule_from(args)
    from flows.video import topic_to_video  # Prefect only for this command

    async def run_flow() -> Any:
        return await topic_to_video(
            **job.model_dump(),
            schedule=schedule,
            output_dir=output_folder_for_flow(args.output_dir),
            return_state=True,
        )

    state = asyncio.run(run_flow())
    if not state.is_completed():
        session.note(f"the flow run ended {state.name}: {state.message}")
        return EXIT_FAILED
    result = state.result()
    session.out.document("video", result.model_dump(mode="json"))
    return EXIT_OK


def submissions(args: argparse.Namespace, session: Session) -> int:
    """List the submissions ledger, or resolve or release one key (the Prefect flow)."""
    if args.action == "resolve" and not args.task_id:
        raise UsageError("--task-id: resolve needs the task id from your NanoPhoto account")
    if args.action != "list" and not args.key:
        raise UsageError(f"--key: {args.action} needs the idempotency key")
    from flows.submissions import submissions as ledger_flow  # Prefect only for this command

    parameters: dict[str, Any] = {
        "action": args.action,
        "output_dir": output_folder_for_flow(args.output_dir),
    }
    if args.key:
        parameters["idempotency_key"] = args.key
    if args.task_id:
        parameters["task_id"] = args.task_id
    if args.action == "resolve":
        parameters["schedule"] = schedule_from(args).model_dump()

    async def run_flow() -> Any:
        return await ledger_flow(**parameters, return_state=True)

    state = asyncio.run(run_flow())
    if not state.is_completed():
        session.note(f"submissions {args.action} ended {state.name}: {state.message}")
        return EXIT_FAILED
    report = state.result()
    for record in report.records:
        if args.action == "list" or record.key == args.key:
            document = record.model_dump(mode="json", exclude={"result"})
            document["what_to_do"] = record.what_to_do()
            session.out.document("submission", document)
    if report.unknown:
        session.note(
            f"{report.unknown} key(s) with an unknown outcome: resolve each with the task id "
            "from your NanoPhoto account, or release it (see what_to_do)"
        )
    return EXIT_OK


def sandbox(args: argparse.Namespace, session: Session) -> int:
    """Run the simulator until Ctrl-C; it prints the exports that point sora2 at it."""
    from nanophoto_simulator.cli import main as simulator_main

    argv = ["--port", str(args.port), "--time-scale", str(args.time_scale), "--key", args.key]
    argv.append("--edge" if args.edge else "--no-edge")
    for fault in args.fault:
        argv += ["--fault", fault]
    try:
        return simulator_main(argv)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as error:  # e.g. the port is taken
        session.note(f"the sandbox could not start: {error}")
        return EXIT_FAILED
