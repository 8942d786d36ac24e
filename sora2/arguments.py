"""The ``sora2`` flags, derived from the options' own fields, and their validation.

Each video or prompt option is a field of ``nanophoto.models`` (its type,
default and description); its flag is named as in NanoPhoto's published
tools. Every argument is checked before anything is sent: a bad one is a
``UsageError`` naming the flag, and the command exits 2.
"""

from __future__ import annotations

import argparse
import enum
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from nanophoto.lite import CONNECT_TIMEOUT_S
from nanophoto.models import PromptOptions, PromptRequest, VideoOptions, VideoRequest
from nanophoto.settings import NanoPhotoSettings
from nanophoto.watch import ResumeSchedule, WatchSchedule
from sora2.quick import UsageError, finite_seconds

T = TypeVar("T")

# The published tools' names, where a flag is not the field's own name.
_RENAMED: Final = {"image_urls": "--image-url", "prompt_model": "--model"}
# sora2_generate.py calls the video's length --video-duration; the prompt tool --duration.
_SUBMIT_RENAMED: Final = {**_RENAMED, "duration": "--video-duration"}
_TIMING_FLAGS: Final = {
    "initial_delay": "--initial-status-delay",
    "interval": "--status-check-interval",
    "max_wait": "--max-wait",
}
_CLIENT_FLAGS: Final = {
    "read_timeout": "--timeout",
    "connect_timeout": "--timeout",
    "write_timeout": "--timeout",
    "user_agent": "--user-agent",
}

# The flags come from the option models: a new option field is a new flag of every
# command that takes it, with no edit here.
VIDEO_FIELDS: Final = tuple(VideoOptions.model_fields)
PROMPT_FIELDS: Final = ("topic", *PromptOptions.model_fields)
# The video options the prompt endpoint takes too (PromptRequest.to_wire).
PROMPT_VIDEO_FIELDS: Final = ("mode", "duration", "image_urls")


def flag_of(field: str, command: str) -> str:
    """The flag that sets ``field`` on ``command``."""
    renamed = _SUBMIT_RENAMED if command == "submit" else _RENAMED
    return (
        renamed.get(field)
        or _TIMING_FLAGS.get(field)
        or _CLIENT_FLAGS.get(field)
        or "--" + field.replace("_", "-")
    )


def add_option_flags(parser: argparse.ArgumentParser, command: str, fields: Iterable[str]) -> None:
    """One flag per option field: choices, default and help from the field itself."""
    every = {**VideoRequest.model_fields, **PromptRequest.model_fields}
    for name in fields:
        _add_field_flag(parser, flag_of(name, command), name, every[name])


def _add_field_flag(parser: argparse.ArgumentParser, flag: str, name: str, info: FieldInfo) -> None:
    annotation = info.annotation
    help_text = (info.description or "").replace("%", "%%")
    options: dict[str, Any] = {"dest": name}
    if typing.get_origin(annotation) is list:  # image URLs: one flag per URL
        options.update(action="append", default=[], metavar="URL")
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        options.update(choices=[m.value for m in annotation], default=info.default.value)
        help_text += " (default: %(default)s)"
    elif typing.get_origin(annotation) is typing.Literal:  # the durations
        options.update(type=int, choices=list(typing.get_args(annotation)), default=info.default)
        help_text += " (default: %(default)s)"
    elif info.is_required():
        options.update(required=True)
    else:
        options.update(default=info.default)
        help_text += " (default: %(default)s)"
    parser.add_argument(flag, help=help_text, **options)


def add_timing_flags(parser: argparse.ArgumentParser, *, from_now: bool = False) -> None:
    """The watch schedule's flags, in NanoPhoto's seconds, defaults from ``WatchSchedule``."""
    model = ResumeSchedule if from_now else WatchSchedule
    for name, info in model.model_fields.items():
        if name not in _TIMING_FLAGS:
            continue
        described = " ".join((info.description or "").split()).replace("%", "%%")
        parser.add_argument(
            _TIMING_FLAGS[name],
            dest=name,
            type=finite_seconds,
            default=info.default,
            metavar="SECONDS",
            help=f"{described} (default: %(default)g)",
        )


def validated(command: str, build: Callable[[], T]) -> T:
    """Build a model; a validation error becomes a ``UsageError`` naming the flag."""
    try:
        return build()
    except ValidationError as error:
        detail = error.errors()[0]
        field = str(detail["loc"][0]) if detail["loc"] else ""
        message = detail["msg"].removeprefix("Value error, ")
        raise UsageError(f"{flag_of(field, command) if field else command}: {message}") from None


def pick(model: type[BaseModel], args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    """The parsed flags that are fields of ``model``."""
    values: Mapping[str, Any] = vars(args)
    return {**{n: values[n] for n in model.model_fields if n in values}, **more}


def settings_from(args: argparse.Namespace) -> NanoPhotoSettings:
    """Client settings from the environment, with the flags that were given on top."""
    given: dict[str, Any] = {}
    timeout = getattr(args, "timeout", None)
    if timeout is not None:
        given.update(
            read_timeout=timeout,
            connect_timeout=min(timeout, CONNECT_TIMEOUT_S),
            write_timeout=timeout,
        )
    elif getattr(args, "read_timeout_default", None) and "NANOPHOTO_READ_TIMEOUT" not in os.environ:
        given["read_timeout"] = args.read_timeout_default
    if getattr(args, "user_agent", None) is not None:
        given["user_agent"] = args.user_agent
    return validated(args.command, lambda: NanoPhotoSettings(**given))


def schedule_from(args: argparse.Namespace) -> WatchSchedule:
    """The timing flags, in NanoPhoto's seconds (as a flow's schedule parameter)."""
    return validated(args.command, lambda: WatchSchedule(**pick(WatchSchedule, args)))


def watch_schedule_from(args: argparse.Namespace, settings: NanoPhotoSettings) -> WatchSchedule:
    """The timing flags on our clock: ``NANOPHOTO_TIME_SCALE`` compresses them for a
    time-compressed sandbox (1 against the real API)."""
    return schedule_from(args).on_clock(settings.time_scale)


def video_request_from(args: argparse.Namespace, prompt: str) -> VideoRequest:
    """The submit request the flags describe."""
    return validated(args.command, lambda: VideoRequest(**pick(VideoRequest, args, prompt=prompt)))


def prompt_request_from(args: argparse.Namespace) -> PromptRequest:
    """The prompt request (and the video it is for) the flags describe."""
    return validated(args.command, lambda: PromptRequest(**pick(PromptRequest, args)))
