"""``sora2``: the published sora2_generate.py commands, and what they lack.

``submit`` and ``status`` take the published tool's flags and print the same
JSON documents (``{"stage": ..., "response": ...}``, or the raw responses with
``--json-only``) with the same exit codes: 0 success, 1 failure, 2 bad
arguments. Unlike it, every argument is checked before any credit is spent,
and ``--follow`` rides out a 429, a gateway error or a dropped connection by
backing off and watching the same task, instead of leaving a paid job
unwatched. ``status --follow`` and ``resume`` pick up a task submitted earlier,
``prompt`` streams a prompt, ``video`` runs the whole Prefect flow,
``sandbox`` starts the simulator.

``submit``, ``status`` and ``prompt`` never import Prefect: they answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final, NoReturn, TypeVar

from pydantic import ValidationError

from nanophoto.client import NanoPhotoClient
from nanophoto.contract import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_DURATION,
    DEFAULT_LOCALE,
    DEFAULT_MODE,
    DEFAULT_PROMPT_MODEL,
    DEFAULT_TECHNIQUE,
    DEFAULT_TIER,
    DURATIONS,
    INITIAL_STATUS_DELAY_S,
    MAX_WAIT_S,
    PROCESSING,
    STATUS_CHECK_INTERVAL_S,
    AspectRatio,
    Locale,
    Mode,
    ModelTier,
    Technique,
)
from nanophoto.errors import NanoPhotoError
from nanophoto.models import PromptRequest, VideoRequest, VideoStatus, video_filename
from nanophoto.ratelimit import RequestLimiter
from nanophoto.settings import NanoPhotoSettings
from nanophoto.watch import WatchSchedule, watch_video

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

# Where each model field comes from on the command line, for error messages.
FLAGS: Final = {
    "prompt": "--prompt",
    "topic": "--topic",
    "mode": "--mode",
    "image_urls": "--image-url",
    "model_tier": "--model-tier",
    "aspect_ratio": "--aspect-ratio",
    "video_duration": "--video-duration",
    "duration": "--duration",
    "technique": "--technique",
    "locale": "--locale",
    "model": "--model",
    "initial_delay": "--initial-status-delay",
    "interval": "--status-check-interval",
    "max_wait": "--max-wait",
    "read_timeout": "--timeout",
    "connect_timeout": "--timeout",
    "write_timeout": "--timeout",
}


T = TypeVar("T")


class UsageError(Exception):
    """A bad argument, found before anything was sent."""


class Output:
    """Documents on stdout; on a terminal, a live progress line on stderr.

    When stderr is not a terminal, nothing but plain lines goes there: no
    carriage returns, no escape codes.
    """

    def __init__(self, json_only: bool, stdout: IO[str], stderr: IO[str]) -> None:
        self.json_only = json_only
        self.stdout = stdout
        self.stderr = stderr
        self.live = stderr.isatty()
        self._line = False
        self.task_id: str | None = None  # the task this command is about, once known
        self.submitting = False  # a submit is in flight: its outcome is not known yet

    def document(self, stage: str, response: dict[str, Any]) -> None:
        """One JSON document: the raw response, or ``{"stage", "response"}``.

        ASCII-escaped, as Python's json does by default, so no control
        character can reach a terminal or a parser through it.
        """
        self._clear()
        body = response if self.json_only else {"stage": stage, "response": response}
        try:
            print(json.dumps(body), file=self.stdout, flush=True)
        except (BrokenPipeError, ValueError):  # the reader left, or stdout is closed
            self.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the command)
            self.note("stdout is closed; carrying on (the task id is on this line)")

    def note(self, message: str) -> None:
        """A line for the person watching, on stderr, with control characters escaped."""
        self._clear()
        if self.task_id and self.task_id not in message:
            message = f"{message} [task {self.task_id}]"
        print(f"sora2: {_printable(message)}", file=self.stderr, flush=True)

    def progress(self, status: str, elapsed: float, next_check: float) -> None:
        """Redraw the live line (terminal only)."""
        if not self.live:
            return
        line = f"{status} · {_clock(elapsed)} elapsed · next check in {_clock(next_check)}"
        self.stderr.write(f"\r\x1b[K{line}")
        self.stderr.flush()
        self._line = True

    def _clear(self) -> None:
        if self._line:
            self.stderr.write("\r\x1b[K")
            self.stderr.flush()
            self._line = False


def _client(args: argparse.Namespace, settings: NanoPhotoSettings) -> NanoPhotoClient:
    """A client held to the key's request budget by an in-process limiter.

    The command line has no Prefect server to share the budget through, so
    each command keeps its own requests under the key's limit.
    """
    return NanoPhotoClient(
        args.api_key,
        settings=settings,
        limiter=RequestLimiter(settings.rate_limit, settings.rate_window),
    )


def _printable(text: str) -> str:
    """``text`` with every non-printable character shown as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _NoteHandler(logging.Handler):
    """Sends the client's retry warnings through ``Output.note``."""

    def __init__(self, out: Output) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.note(record.getMessage())


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- argument parsing -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with examples kept as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        help="NanoPhoto API key (default: NANOPHOTO_API_KEY, then ~/.openclaw/openclaw.json)",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=60.0, help="HTTP timeout in seconds (default: 60)"
    )


def _add_video_flags(parser: argparse.ArgumentParser, *, duration_flag: bool) -> None:
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=DEFAULT_MODE.value)
    parser.add_argument(
        "--model-tier", choices=[t.value for t in ModelTier], default=DEFAULT_TIER.value
    )
    parser.add_argument(
        "--aspect-ratio",
        choices=[a.value for a in AspectRatio],
        default=DEFAULT_ASPECT_RATIO.value,
    )
    if duration_flag:
        parser.add_argument(
            "--video-duration",
            choices=[str(d) for d in DURATIONS],
            default=str(DEFAULT_DURATION),
            help="seconds (default: %(default)s)",
        )
    parser.add_argument(
        "--image-url",
        action="append",
        default=[],
        metavar="URL",
        help="public http(s) image URL, up to 3 (required for imageToVideo)",
    )


def _seconds(text: str) -> float:
    """A finite number of seconds (argparse type)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not {text!r}")
    return value


def _add_timing_flags(
    parser: argparse.ArgumentParser, initial_delay: float = INITIAL_STATUS_DELAY_S
) -> None:
    parser.add_argument(
        "--initial-status-delay",
        type=_seconds,
        default=initial_delay,
        help=f"seconds before the first status check (default: {initial_delay:g})",
    )
    parser.add_argument(
        "--status-check-interval",
        type=_seconds,
        default=STATUS_CHECK_INTERVAL_S,
        help="seconds between status checks (default: 20)",
    )
    parser.add_argument(
        "--max-wait",
        type=_seconds,
        default=MAX_WAIT_S,
        help="seconds after submit to stop watching (default: 1200)",
    )


def _add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", required=True, help="what the video is about (1-500 chars)")
    parser.add_argument(
        "--technique", choices=[t.value for t in Technique], default=DEFAULT_TECHNIQUE.value
    )
    parser.add_argument(
        "--duration",
        choices=[str(d) for d in DURATIONS],
        default=str(DEFAULT_DURATION),
        help="video seconds the prompt is written for (default: %(default)s)",
    )
    parser.add_argument(
        "--locale", choices=[loc.value for loc in Locale], default=DEFAULT_LOCALE.value
    )
    parser.add_argument("--model", default=DEFAULT_PROMPT_MODEL, help="the prompt-writing model")


def build_parser() -> argparse.ArgumentParser:
    """The ``sora2`` command line."""
    parser = _Parser(
        prog="sora2",
        description="Sora 2 videos through NanoPhoto.AI: submit, watch, prompt, run the "
        "Prefect flow, or try it all on a local sandbox.",
        epilog="Example: sora2 submit --prompt 'A red fox at dawn' --follow",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="start a video (and --follow it to the end)",
        description="Start a Sora 2 video. Every argument is checked before anything is "
        "sent; with --follow, watch it until it is completed, failed or --max-wait passes.",
        epilog="Example:\n  sora2 submit --prompt 'A red fox crossing fresh snow at dawn' "
        "--aspect-ratio landscape --follow",
    )
    submit.add_argument("--prompt", required=True, help="the video prompt")
    _add_video_flags(submit, duration_flag=True)
    submit.add_argument("--follow", action="store_true", help="watch the task until it ends")
    submit.add_argument("--json-only", action="store_true", help="print raw API responses only")
    _add_timing_flags(submit)
    _add_client_flags(submit)
    submit.set_defaults(handler=_submit)

    status = commands.add_parser(
        "status",
        help="check a video task (and --follow it to the end)",
        description="Ask NanoPhoto how a video task is doing. Exit 1 if it failed. With "
        "--follow, keep checking it (from now: first check at once) until it ends.",
        epilog="Example:\n  sora2 status --task-id task_abc123\n"
        "  sora2 status --task-id task_abc123 --follow",
    )
    status.add_argument("--task-id", required=True)
    status.add_argument("--json-only", action="store_true", help="print raw responses only")
    status.add_argument("--follow", action="store_true", help="watch the task until it ends")
    _add_timing_flags(status, initial_delay=0.0)
    _add_client_flags(status)
    status.set_defaults(handler=_status)

    resume = commands.add_parser(
        "resume",
        help="finish a submitted task: watch it, download it, report it",
        description="Finish a video that was already submitted (a run that timed out or "
        "crashed, or a job started elsewhere): watch it from now, save the MP4, print the "
        "result. Submits nothing, so costs nothing.",
        epilog="Example:\n  sora2 resume --task-id task_abc123 --output-dir videos",
    )
    resume.add_argument("--task-id", required=True)
    resume.add_argument("--output-dir", default="videos", help="where to save the video")
    resume.add_argument("--json-only", action="store_true", help="print raw responses only")
    _add_timing_flags(resume, initial_delay=0.0)
    _add_client_flags(resume)
    resume.set_defaults(handler=_resume)

    prompt = commands.add_parser(
        "prompt",
        help="stream a structured video prompt for a topic",
        description="Write a video prompt for a topic, streamed as it is written. "
        "Costs 2 credits (refunded if generation fails).",
        epilog="Example:\n  sora2 prompt --topic 'A lighthouse in a storm' --technique "
        "slow-motion --locale fr",
    )
    _add_prompt_flags(prompt)
    prompt.add_argument("--mode", choices=[m.value for m in Mode], default=DEFAULT_MODE.value)
    prompt.add_argument("--image-url", action="append", default=[], metavar="URL")
    prompt.add_argument(
        "--json", action="store_true", help="print one JSON document at the end instead"
    )
    _add_client_flags(prompt)
    prompt.set_defaults(handler=_prompt)

    video = commands.add_parser(
        "video",
        help="topic to finished video, through the Prefect flow",
        description="Run the topic-to-video Prefect flow: prompt, submit, watch, download. "
        "Uses PREFECT_API_URL if set, else Prefect's embedded server.",
        epilog="Example:\n  sora2 video --topic 'A red fox at dawn' --output-dir videos",
    )
    _add_prompt_flags(video)
    _add_video_flags(video, duration_flag=False)
    _add_timing_flags(video)
    video.add_argument("--output-dir", default="videos", help="where to save the video")
    video.set_defaults(handler=_video)

    sandbox = commands.add_parser(
        "sandbox",
        help="run the local NanoPhoto simulator: no key, no credits",
        description="Start the NanoPhoto simulator, then point sora2 at it with the two "
        "variables it prints. Ctrl-C stops it.",
        epilog="Example:\n  sora2 sandbox --time-scale 0.01\n"
        "  NANOPHOTO_BASE_URL=http://127.0.0.1:8765 NANOPHOTO_API_KEY=sim-key \\\n"
        "    NANOPHOTO_TIME_SCALE=0.01 sora2 submit --prompt 'A fox' --follow",
    )
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--time-scale", type=float, default=0.01)
    sandbox.add_argument("--key", default="sim-key=1000", help="KEY=CREDITS")
    sandbox.add_argument(
        "--fault", action="append", default=[], help="NAME=PROBABILITY, e.g. gateway_error=0.1"
    )
    sandbox.set_defaults(handler=_sandbox)
    return parser


# --- validation: everything before anything is sent --------------------------------


def _validated(build: Callable[[], T]) -> T:
    """Build a model; a validation error becomes a UsageError naming the flag."""
    try:
        return build()
    except ValidationError as error:
        detail = error.errors()[0]
        field = str(detail["loc"][0]) if detail["loc"] else ""
        flag = FLAGS.get(field, field)
        message = detail["msg"].removeprefix("Value error, ")
        raise UsageError(f"{flag}: {message}") from None


def _settings(args: argparse.Namespace) -> NanoPhotoSettings:
    timeout = args.timeout
    return _validated(
        lambda: NanoPhotoSettings(
            read_timeout=timeout, connect_timeout=min(timeout, 10.0), write_timeout=timeout
        )
    )


def _schedule(args: argparse.Namespace) -> WatchSchedule:
    """The timing flags, in NanoPhoto's seconds (as a flow's schedule parameter)."""
    return _validated(
        lambda: WatchSchedule(
            initial_delay=args.initial_status_delay,
            interval=args.status_check_interval,
            max_wait=args.max_wait,
        )
    )


def _watch_schedule(args: argparse.Namespace, settings: NanoPhotoSettings) -> WatchSchedule:
    """The timing flags on our clock: ``NANOPHOTO_TIME_SCALE`` compresses them for a
    time-compressed sandbox (1 against the real API)."""
    return _schedule(args).on_clock(settings.time_scale)


def _video_request(args: argparse.Namespace, prompt: str) -> VideoRequest:
    return _validated(
        lambda: VideoRequest(
            prompt=prompt,
            mode=args.mode,
            model_tier=args.model_tier,
            aspect_ratio=args.aspect_ratio,
            video_duration=int(args.video_duration),
            image_urls=args.image_url,
        )
    )


def _prompt_request(args: argparse.Namespace) -> PromptRequest:
    return _validated(
        lambda: PromptRequest(
            topic=args.topic,
            technique=args.technique,
            duration=int(args.duration),
            locale=args.locale,
            mode=args.mode,
            image_urls=args.image_url,
            model=args.model,
        )
    )


# --- commands ----------------------------------------------------------------------


def _submit(args: argparse.Namespace, out: Output) -> int:
    request = _video_request(args, args.prompt)
    settings = _settings(args)
    schedule = _watch_schedule(args, settings)
    return asyncio.run(_submit_async(args, out, request, schedule, settings))


async def _submit_async(
    args: argparse.Namespace,
    out: Output,
    request: VideoRequest,
    schedule: WatchSchedule,
    settings: NanoPhotoSettings,
) -> int:
    async with _client(args, settings) as client:
        out.submitting = True
        try:
            submitted = await client.submit(request)
        except NanoPhotoError as error:
            out.submitting = False
            out.note(f"submit failed: {error}")
            return EXIT_FAILED
        out.submitting = False
        out.task_id = submitted.task_id
        submitted_at = time.monotonic()
        out.document("submitted", submitted.raw)
        out.note(
            f"submitted {submitted.task_id} ({request.cost} credits); "
            f"check it with: sora2 status --task-id {submitted.task_id}"
        )
        if not args.follow:
            return EXIT_FAILED if submitted.is_failed else EXIT_OK
        return await follow(client, submitted, schedule, out, submitted_at=submitted_at)


async def follow(
    client: NanoPhotoClient,
    submitted: VideoStatus,
    schedule: WatchSchedule,
    out: Output,
    *,
    submitted_at: float,
) -> int:
    """Watch ``submitted`` to its end; exit 0 only if the video completed."""
    final = await watch_to_end(client, submitted, schedule, out, submitted_at)
    return EXIT_OK if final is not None and final.is_completed else EXIT_FAILED


async def watch_to_end(
    client: NanoPhotoClient,
    submitted: VideoStatus,
    schedule: WatchSchedule,
    out: Output,
    submitted_at: float,
) -> VideoStatus | None:
    """Check on ``schedule`` until final; a transient error never abandons the task.

    Returns the final status, or None when watching ended without one (after
    telling the person why and how to pick it up again).
    """
    task_id = submitted.task_id
    state = {"status": submitted.status}

    async def check(task_id: str) -> VideoStatus:
        status = await client.check_status(task_id)
        state["status"] = status.status
        out.document("progress", status.raw)
        return status

    def transient(error: NanoPhotoError) -> None:
        out.note(f"check failed ({error.code}); still watching {task_id}")

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
            )
    except NanoPhotoError as error:
        out.note(f"{error} (watch it again with: sora2 status --task-id {task_id} --follow)")
        return None
    if final.is_failed:
        out.note(f"video {task_id} failed: [{final.error_code}] {final.error or ''}".rstrip())
    return final


def _task_id(args: argparse.Namespace) -> str:
    task_id: str = args.task_id.strip()
    if not task_id:
        raise UsageError("--task-id: must be a NanoPhoto task id, not empty")
    return task_id


def _status(args: argparse.Namespace, out: Output) -> int:
    task_id = _task_id(args)
    settings = _settings(args)
    schedule = _watch_schedule(args, settings)
    out.task_id = task_id

    async def run() -> int:
        async with _client(args, settings) as client:
            if args.follow:
                pending = VideoStatus(task_id=task_id, status=PROCESSING)
                return await follow(client, pending, schedule, out, submitted_at=time.monotonic())
            try:
                status = await client.check_status(task_id)
            except NanoPhotoError as error:
                out.note(f"status check failed: {error}")
                return EXIT_FAILED
        out.document("status", status.raw)
        return EXIT_FAILED if status.is_failed else EXIT_OK

    return asyncio.run(run())


def _resume(args: argparse.Namespace, out: Output) -> int:
    task_id = _task_id(args)
    try:
        filename = video_filename(task_id)  # it names the file: refuse "../x" before anything
    except ValueError as error:
        raise UsageError(f"--task-id: {error}") from None
    settings = _settings(args)
    schedule = _watch_schedule(args, settings)
    out.task_id = task_id

    async def run() -> int:
        async with _client(args, settings) as client:
            pending = VideoStatus(task_id=task_id, status=PROCESSING)
            final = await watch_to_end(client, pending, schedule, out, time.monotonic())
            if final is None or not final.is_completed or final.video_url is None:
                return EXIT_FAILED
            try:
                video = await client.download(final.video_url, Path(args.output_dir) / filename)
            except NanoPhotoError as error:
                out.note(f"download failed: {error}")
                return EXIT_FAILED
        out.document(
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


def _prompt(args: argparse.Namespace, out: Output) -> int:
    request = _prompt_request(args)
    settings = _settings(args)

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
            out.note(f"the stream broke after {characters} characters ({error.code}); again:")

        async with _client(args, settings) as client:
            try:
                prompt = await client.generate_prompt(request, on_text=show, on_discard=discard)
            except NanoPhotoError as error:
                out.note(f"prompt failed: {error}")
                return EXIT_FAILED
        if args.json:
            out.document("prompt", {"prompt": prompt.text, "streams": prompt.streams_charged})
        elif not live:
            out.stdout.write(prompt.text + "\n")
        elif not written[0].endswith("\n"):
            out.stdout.write("\n")  # end on a line break, once
        return EXIT_OK

    return asyncio.run(run())


def _video(args: argparse.Namespace, out: Output) -> int:
    prompt_request = _prompt_request(args)
    schedule = _schedule(args)
    _validated(  # the video options too, before the prompt is paid for
        lambda: VideoRequest(
            prompt="-",
            mode=args.mode,
            model_tier=args.model_tier,
            aspect_ratio=args.aspect_ratio,
            video_duration=int(args.duration),
            image_urls=args.image_url,
        )
    )
    from flows.video import topic_to_video  # Prefect only for this command

    async def run_flow() -> Any:
        return await topic_to_video(
            topic=prompt_request.topic,
            technique=prompt_request.technique,
            duration=prompt_request.duration,
            locale=prompt_request.locale,
            mode=prompt_request.mode,
            image_urls=list(prompt_request.image_urls),
            model_tier=ModelTier(args.model_tier),
            aspect_ratio=AspectRatio(args.aspect_ratio),
            prompt_model=prompt_request.model,
            schedule=schedule,
            output_dir=args.output_dir,
            return_state=True,
        )

    state = asyncio.run(run_flow())
    if not state.is_completed():
        out.note(f"the flow run ended {state.name}: {state.message}")
        return EXIT_FAILED
    result = state.result()
    out.document("video", result.model_dump(mode="json"))
    return EXIT_OK


def _sandbox(args: argparse.Namespace, out: Output) -> int:
    from nanophoto.simulator.__main__ import main as simulator_main

    # The simulator prints the exports that point sora2 at it (base URL, key, time scale).
    argv = ["--port", str(args.port), "--time-scale", str(args.time_scale), "--key", args.key]
    for fault in args.fault:
        argv += ["--fault", fault]
    try:
        return simulator_main(argv)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as error:  # e.g. the port is taken
        out.note(f"the sandbox could not start: {error}")
        return EXIT_FAILED


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one ``sora2`` command; returns its exit code."""
    stdout = stdout or sys.stdout or open(os.devnull, "w")  # noqa: SIM115 (closed stdout)
    stderr = stderr or sys.stderr or open(os.devnull, "w")  # noqa: SIM115
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 2 for bad arguments, 0 for --help
        return int(exit_.code or 0)
    out = Output(getattr(args, "json_only", False), stdout, stderr)
    handler: Callable[[argparse.Namespace, Output], int] = args.handler
    retries = _NoteHandler(out)
    client_logger = logging.getLogger("nanophoto")
    client_logger.addHandler(retries)
    client_logger.propagate = False
    try:
        return handler(args, out)
    except UsageError as error:
        print(f"sora2 {args.command}: error: {error}", file=stderr)
        return EXIT_USAGE
    except NanoPhotoError as error:  # e.g. no key anywhere: nothing was sent
        out.note(str(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        if out.submitting:
            out.note(
                "interrupted during the submit: it may have reached NanoPhoto. Check your "
                "account before submitting again, to avoid paying twice."
            )
        elif out.task_id:
            out.note(
                f"interrupted; {out.task_id} keeps running at NanoPhoto. Pick it up with: "
                f"sora2 resume --task-id {out.task_id}"
            )
        return 130
    finally:
        client_logger.removeHandler(retries)
        client_logger.propagate = True


def entry_point() -> NoReturn:
    """The console script."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`sora2 prompt ... | head`): stop quietly, as the
        # Python docs advise, without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_FAILED
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
