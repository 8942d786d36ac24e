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

This module builds the parser and runs one command; the flags are in
``sora2.arguments``, the commands in ``sora2.commands``. ``submit``,
``status`` and ``prompt`` never import Prefect: they answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from nanophoto.contract import PROMPT_COST, PROMPT_TIMEOUT_S
from nanophoto.errors import NanoPhotoError
from sora2.output import EXIT_FAILED, EXIT_USAGE, Output, Session
from sora2.quick import UsageError, add_client_flags, add_status_flags, quick_status

_EXITS = "Exit codes: 0 success, 1 failure, 2 bad arguments (refused before any request)."


class _Parser(argparse.ArgumentParser):
    """argparse with examples kept as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``sora2`` command line (imports every command's models: about 0.2 s)."""
    from nanophoto_simulator.config import (
        DEFAULT_CREDITS,
        DEFAULT_KEY,
        SANDBOX_PORT,
        SANDBOX_TIME_SCALE,
    )
    from sora2 import commands
    from sora2.arguments import (
        PROMPT_FIELDS,
        PROMPT_VIDEO_FIELDS,
        VIDEO_FIELDS,
        add_option_flags,
        add_timing_flags,
    )

    parser = _Parser(
        prog="sora2",
        description="Sora 2 videos through NanoPhoto.AI: submit, watch, prompt, run the "
        "Prefect flow, or try it all on a local sandbox.",
        epilog="Example: sora2 submit --prompt 'A red fox at dawn' --follow\n" + _EXITS,
    )
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[..., int], *, help: str, description: str, epilog: str
    ) -> argparse.ArgumentParser:
        sub = commands_.add_parser(
            name, help=help, description=description, epilog=f"{epilog}\n{_EXITS}"
        )
        sub.set_defaults(handler=handler)
        return sub

    submit = command(
        "submit",
        commands.submit,
        help="start a video (and --follow it to the end)",
        description="Start a Sora 2 video. Every argument is checked before anything is "
        "sent; with --follow, watch it until it is completed, failed or --max-wait passes.",
        epilog="Example:\n  sora2 submit --prompt 'A red fox crossing fresh snow at dawn' "
        "--aspect-ratio landscape --follow",
    )
    add_option_flags(submit, "submit", ("prompt", *VIDEO_FIELDS))
    submit.add_argument("--follow", action="store_true", help="watch the task until it ends")
    submit.add_argument("--json-only", action="store_true", help="print raw API responses only")
    add_timing_flags(submit)
    add_client_flags(submit)

    status = command(
        "status",
        commands.status,
        help="check a video task (and --follow it to the end)",
        description="Ask NanoPhoto how a video task is doing, and print its document: exit "
        "0 whatever the task's state (as the published tool: it reports, it does not "
        "judge). With --follow, keep checking it (from now: first check at once) until it "
        "ends: then exit 1 if it failed.",
        epilog="Example:\n  sora2 status --task-id task_abc123\n"
        "  sora2 status --task-id task_abc123 --follow",
    )
    add_status_flags(status)
    status.add_argument("--follow", action="store_true", help="watch the task until it ends")
    add_timing_flags(status, from_now=True)
    add_client_flags(status)

    resume = command(
        "resume",
        commands.resume,
        help="finish a submitted task: watch it, download it, report it",
        description="Finish a video that was already submitted (a run that timed out or "
        "crashed, or a job started elsewhere): watch it from now, save the MP4, print the "
        "result. Submits nothing, so costs nothing.",
        epilog="Example:\n  sora2 resume --task-id task_abc123 --output-dir videos",
    )
    resume.add_argument("--task-id", required=True)
    resume.add_argument("--output-dir", default="videos", help="where to save the video")
    resume.add_argument("--json-only", action="store_true", help="print raw responses only")
    add_timing_flags(resume, from_now=True)
    add_client_flags(resume)

    prompt = command(
        "prompt",
        commands.prompt,
        help="stream a structured video prompt for a topic",
        description="Write a video prompt for a topic, streamed as it is written. "
        f"Costs {PROMPT_COST} credits (refunded if generation fails).",
        epilog="Example:\n  sora2 prompt --topic 'A lighthouse in a storm' --technique "
        "slow-motion --locale fr",
    )
    add_option_flags(prompt, "prompt", (*PROMPT_FIELDS, *PROMPT_VIDEO_FIELDS))
    prompt.add_argument(
        "--json", action="store_true", help="print one JSON document at the end instead"
    )
    add_client_flags(prompt, read_timeout=PROMPT_TIMEOUT_S)

    video = command(
        "video",
        commands.video,
        help="topic to finished video, through the Prefect flow",
        description="Run the topic-to-video Prefect flow: prompt, submit, watch, download. "
        "Uses PREFECT_API_URL if set, else Prefect's embedded server.",
        epilog="Example:\n  sora2 video --topic 'A red fox at dawn' --output-dir videos",
    )
    add_option_flags(video, "video", (*PROMPT_FIELDS, *VIDEO_FIELDS))
    add_timing_flags(video)
    video.add_argument("--output-dir", default="videos", help="where to save the video")

    ledger = command(
        "submissions",
        commands.submissions,
        help="the submissions ledger: list it, resolve or release an unknown outcome",
        description="Every idempotency key's video, paid or maybe paid (through the Prefect "
        "flow 'submissions'). For a submit whose outcome is unknown: resolve it with the task "
        "id from your NanoPhoto account (watched and downloaded, nothing submitted), or "
        "release it (the next run with that key may submit, and may pay twice).",
        epilog="Example:\n  sora2 submissions list\n"
        "  sora2 submissions resolve --key batch-7:3f2a --task-id task_abc123\n"
        "  sora2 submissions release --key batch-7:3f2a",
    )
    ledger.add_argument("action", choices=["list", "resolve", "release"])
    ledger.add_argument("--key", help="the idempotency key to resolve or release")
    ledger.add_argument("--task-id", help="for resolve: the task id from your NanoPhoto account")
    ledger.add_argument("--output-dir", default="videos", help="for resolve: where to save it")
    add_timing_flags(ledger, from_now=True)

    sandbox = command(
        "sandbox",
        commands.sandbox,
        help="run the local NanoPhoto simulator: no key, no credits",
        description="Start the NanoPhoto simulator, then point sora2 at it with the "
        "variables it prints. Ctrl-C stops it.",
        epilog=f"Example:\n  sora2 sandbox --time-scale {SANDBOX_TIME_SCALE:g}\n"
        f"  NANOPHOTO_BASE_URL=http://127.0.0.1:{SANDBOX_PORT} NANOPHOTO_API_KEY={DEFAULT_KEY} "
        f"\\\n    NANOPHOTO_TIME_SCALE={SANDBOX_TIME_SCALE:g} "
        "sora2 submit --prompt 'A fox' --follow",
    )
    sandbox.add_argument("--port", type=int, default=SANDBOX_PORT, help="default: %(default)s")
    sandbox.add_argument(
        "--time-scale",
        type=float,
        default=SANDBOX_TIME_SCALE,
        help="real seconds per simulated second (default: %(default)g)",
    )
    sandbox.add_argument(
        "--key",
        default=f"{DEFAULT_KEY}={DEFAULT_CREDITS}",
        help="KEY=CREDITS (default: %(default)s)",
    )
    sandbox.add_argument(
        "--fault", action="append", default=[], help="NAME=PROBABILITY, e.g. gateway_error=0.1"
    )
    sandbox.add_argument(
        "--edge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse requests without a browser-like User-Agent or an Origin, as NanoPhoto's "
        "edge may (default: on)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one ``sora2`` command; returns its exit code."""
    stdout = stdout or sys.stdout or open(os.devnull, "w")  # noqa: SIM115 (closed stdout)
    stderr = stderr or sys.stderr or open(os.devnull, "w")  # noqa: SIM115
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:  # the plain status check answers before the rest is imported
        code = quick_status(argv[1:], stdout, stderr)
        if code is not None:
            return code
    import logging

    from sora2.watching import NoteHandler

    parser = build_parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 2 for bad arguments, 0 for --help
        return int(exit_.code or 0)
    session = Session(Output(getattr(args, "json_only", False), stdout, stderr))
    handler: Callable[[argparse.Namespace, Session], int] = args.handler
    retries = NoteHandler(session)
    client_logger = logging.getLogger("nanophoto")
    client_logger.addHandler(retries)
    client_logger.propagate = False
    try:
        return handler(args, session)
    except UsageError as error:
        print(f"sora2 {args.command}: error: {error}", file=stderr)
        return EXIT_USAGE
    except NanoPhotoError as error:  # e.g. no key anywhere: nothing was sent
        session.note(str(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return session.interrupted()
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
