"""``sora2 status`` answered with the standard library alone, and the flags it shares.

The published ``sora2_generate.py status`` is a small script that answers at
once; ours should too. ``quick_status`` handles the plain invocation
(``--task-id`` with ``--json-only``, ``--api-key``, ``--timeout`` or
``--user-agent``) through ``nanophoto.lite``, before the full command line
and its models are imported. Any other invocation or setting, and any answer
the full client must judge, returns None: ``sora2.cli`` then runs the command
the usual way, with the same output and exit codes.

The flags are defined once, here, for both ways.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import IO, Any, NoReturn

from nanophoto.contract import TIMEOUT_S
from nanophoto.errors import NanoPhotoError
from nanophoto.lite import LiteSettings, check_status
from sora2.output import EXIT_FAILED, EXIT_OK, Output, Session


class UsageError(Exception):
    """A bad argument, found before anything was sent."""


def finite_seconds(text: str) -> float:
    """A finite number of seconds (argparse type)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not {text!r}")
    return value


def add_status_flags(parser: argparse.ArgumentParser) -> None:
    """The task to ask about, and how to print the answer."""
    parser.add_argument("--task-id", required=True)
    parser.add_argument("--json-only", action="store_true", help="print raw responses only")


def add_client_flags(parser: argparse.ArgumentParser, *, read_timeout: float | None = None) -> None:
    """The key, the HTTP time-out and the User-Agent. A flag wins only when given: else
    the ``NANOPHOTO_*`` setting, else the published tool's default."""
    default = read_timeout or TIMEOUT_S
    parser.add_argument(
        "--api-key",
        help="NanoPhoto API key (default: NANOPHOTO_API_KEY, then ~/.openclaw/openclaw.json)",
    )
    parser.add_argument(
        "--timeout",
        type=finite_seconds,
        default=None,
        help=f"HTTP timeout in seconds (default: NANOPHOTO_READ_TIMEOUT, else {default:g})",
    )
    parser.add_argument(
        "--user-agent",
        default=None,
        help="the User-Agent sent to NanoPhoto (default: NANOPHOTO_USER_AGENT, else the "
        "desktop Chrome one NanoPhoto's published tools send)",
    )
    parser.set_defaults(read_timeout_default=read_timeout)


def task_id_of(args: argparse.Namespace) -> str:
    """``--task-id``, stripped; never empty."""
    task_id: str = args.task_id.strip()
    if not task_id:
        raise UsageError("--task-id: must be a NanoPhoto task id, not empty")
    return task_id


class _Declined(Exception):
    """Not the plain invocation: the full command line parses it (and reports what is wrong)."""


class _QuietParser(argparse.ArgumentParser):
    """A parser that hands a problem back instead of printing it and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _Declined(message)


def quick_status(argv: list[str], stdout: IO[str], stderr: IO[str]) -> int | None:
    """Run ``sora2 status argv`` if it is the plain case; None to run it the full way."""
    parser = _QuietParser(prog="sora2 status", add_help=False, allow_abbrev=False)
    add_status_flags(parser)
    add_client_flags(parser)
    try:
        args, rest = parser.parse_known_args(argv)
    except _Declined:
        return None
    if rest:  # --follow, the timing flags, --help, ...
        return None
    try:
        task_id = task_id_of(args)
    except UsageError:
        return None
    settings = LiteSettings.from_environment(
        os.environ, api_key=args.api_key, timeout=args.timeout, user_agent=args.user_agent
    )
    if settings is None:
        return None
    session = Session(Output(args.json_only, stdout, stderr), task_id=task_id)
    try:
        document: dict[str, Any] | None = check_status(settings, task_id, on_retry=session.note)
    except NanoPhotoError as error:
        session.note(f"status check failed: {error}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return session.interrupted()
    if document is None:
        return None
    session.out.document("status", document)
    return EXIT_OK  # the document is the answer: a failed task is reported, not judged
