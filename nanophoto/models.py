"""Typed requests and responses of the NanoPhoto Sora 2 API.

Requests validate on construction, so bad input is refused with an error that
names the field before any request is sent and before any credit is spent.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from nanophoto.contract import (
    COMPLETED,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_DURATION,
    DEFAULT_LOCALE,
    DEFAULT_MODE,
    DEFAULT_PROMPT_MODEL,
    DEFAULT_TECHNIQUE,
    DEFAULT_TIER,
    DURATIONS,
    FAILED,
    MAX_IMAGE_URLS,
    PROMPT_COST,
    TOPIC_MAX_CHARS,
    AspectRatio,
    Duration,
    Locale,
    Mode,
    ModelTier,
    Technique,
    tier_prices,
    video_cost,
)


def check_image_url(url: str) -> str:
    """Accept only a public ``http(s)`` URL: no file paths, ``data:`` or base64."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ValueError(
            f"must be a public http(s) URL, not {shown!r} "
            "(local paths, data: URLs and base64 are refused by the API)"
        )
    return url.strip()


def schema_pattern(pattern: str) -> Any:
    """A pattern for the JSON schema only (so a Prefect server refuses a bad value
    before a run exists); our validators check the same rule with a clearer message."""
    return Field(json_schema_extra={"pattern": pattern})


_NOT_BLANK = r"\S"
# Invisible characters that some servers' trimming removes and Python's does not.
_INVISIBLE = "\ufeff\u200b"


def trimmed(value: Any) -> Any:
    """Trim as the service may: every whitespace Python knows (the ASCII separators
    \\x1c-\\x1f included, which pydantic's own trimming keeps), and the invisible ones."""
    return value.strip().strip(_INVISIBLE).strip() if isinstance(value, str) else value


def _text(max_length: int | None = None) -> list[Any]:
    """A text field that is not blank once trimmed (and at most ``max_length`` long)."""
    return [
        BeforeValidator(trimmed),
        StringConstraints(min_length=1, max_length=max_length),
        schema_pattern(_NOT_BLANK),
    ]


Topic = Annotated[str, *_text(TOPIC_MAX_CHARS)]


ImageUrl = Annotated[
    str, AfterValidator(check_image_url), schema_pattern(r"^\s*[hH][tT][tT][pP][sS]?://")
]
ImageUrls = Annotated[list[ImageUrl], Field(max_length=MAX_IMAGE_URLS)]
PromptText = Annotated[str, *_text()]
ModelName = Annotated[str, *_text()]


def _choices(enum: type[StrEnum]) -> str:
    names = [member.value for member in enum]
    return ", ".join(names[:-1]) + " or " + names[-1]


class _Options(BaseModel):
    """Options shared by every entry point: each field is declared here, once.

    The flows' run forms, the batch items, the command line's flags and the
    requests' bodies all come from these fields (their type, default, title
    and description).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def pick(cls, values: Mapping[str, Any], **more: Any) -> Self:
        """This model from those of ``values`` that are its fields (a flow's parameters)."""
        return cls.model_validate(
            {**{name: values[name] for name in cls.model_fields if name in values}, **more}
        )


class PromptOptions(_Options):
    """How a topic's prompt is written."""

    technique: Technique = Field(
        DEFAULT_TECHNIQUE,
        title="Technique",
        description="The cinematic technique the prompt builds the shots around: "
        f"{_choices(Technique)}.",
    )
    locale: Locale = Field(
        DEFAULT_LOCALE,
        title="Locale",
        description=f"The language the prompt is written in: {_choices(Locale)}.",
    )
    prompt_model: ModelName = Field(
        DEFAULT_PROMPT_MODEL,
        title="Prompt model",
        description="The model that writes the prompt (any model name NanoPhoto offers).",
    )


class VideoOptions(_Options):
    """How a video is rendered, validated before any prompt or video is paid for."""

    mode: Mode = Field(
        DEFAULT_MODE,
        title="Mode",
        description=f"{Mode.TEXT_TO_VIDEO.value}, or {Mode.IMAGE_TO_VIDEO.value} to start "
        "from reference images.",
    )
    image_urls: ImageUrls = Field(
        default_factory=list,
        validate_default=True,
        title="Image URLs",
        description=f"Up to {MAX_IMAGE_URLS} public image addresses starting with http:// "
        f"or https:// (no file paths, data: URLs or base64); required for "
        f"{Mode.IMAGE_TO_VIDEO.value}.",
    )
    model_tier: ModelTier = Field(
        DEFAULT_TIER, title="Model tier", description=f"The Sora 2 tier: {tier_prices()}."
    )
    aspect_ratio: AspectRatio = Field(
        DEFAULT_ASPECT_RATIO, title="Aspect ratio", description=f"{_choices(AspectRatio)}."
    )
    duration: Duration = Field(
        DEFAULT_DURATION,
        title="Duration",
        description=f"Video length in seconds: {' or '.join(map(str, DURATIONS))}.",
    )

    @field_validator("image_urls")
    @classmethod
    def _images_for_image_mode(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("mode") == Mode.IMAGE_TO_VIDEO and not urls:
            raise ValueError(
                f"{Mode.IMAGE_TO_VIDEO.value} needs 1 to {MAX_IMAGE_URLS} image URLs; "
                "none were given"
            )
        return urls

    @property
    def cost(self) -> int:
        """Credits this video costs at submit (refunded if it fails)."""
        return video_cost(self.model_tier, self.duration)

    @property
    def video(self) -> VideoOptions:
        """Only the video's options (a request carries more)."""
        return VideoOptions.pick(self.model_dump())

    def with_prompt(self, prompt: str) -> VideoRequest:
        """A submit request for this prompt with these options."""
        return VideoRequest.pick(self.model_dump(), prompt=prompt)


class PromptRequest(VideoOptions, PromptOptions):
    """What ``/generate-prompt`` takes: a topic, how to write it, and the video it is for.

    A topic job: its prompt is written first (``PROMPT_COST`` credits), then the
    video is made with its ``VideoOptions``.
    """

    topic: Topic = Field(
        title="Topic",
        description=f"What the video is about: 1 to {TOPIC_MAX_CHARS} characters, not only spaces.",
    )

    @property
    def price(self) -> int:
        """Credits the whole job costs: the prompt and the video."""
        return PROMPT_COST + self.cost

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: ``duration`` is a number on this endpoint."""
        body: dict[str, Any] = {
            "topic": self.topic,
            "mode": self.mode.value,
            "technique": self.technique.value,
            "duration": self.duration,
            "model": self.prompt_model,
            "locale": self.locale.value,
        }
        if self.image_urls:
            body["imageUrls"] = list(self.image_urls)
        return body


class VideoRequest(VideoOptions):
    """What ``/generate`` takes: a ready prompt and the rendering options."""

    prompt: PromptText = Field(
        title="Prompt",
        description="A ready video prompt, as written by you or the prompt generator; not "
        "only spaces.",
    )

    @property
    def price(self) -> int:
        """Credits the job costs: the video."""
        return self.cost

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: ``videoDuration`` is a string on this endpoint."""
        body: dict[str, Any] = {
            "prompt": self.prompt,
            "mode": self.mode.value,
            "modelTier": self.model_tier.value,
            "aspectRatio": self.aspect_ratio.value,
            "videoDuration": str(self.duration),
        }
        if self.image_urls:
            body["imageUrls"] = list(self.image_urls)
        return body


# One video to make: a topic (its prompt is written first) or a ready prompt.
VideoJob = PromptRequest | VideoRequest


def fingerprint(job: VideoJob) -> str:
    """A hash of what is paid for: the video's options and where its prompt comes from
    (the ready prompt, or the topic and how its prompt is written), so an idempotency
    key reused for another video is noticed.

    Its layout is frozen (the names are those records were first written with), so a
    record written by an earlier version still matches the same job.
    """
    options = {
        "mode": job.mode.value,
        "image_urls": list(job.image_urls),
        "model_tier": job.model_tier.value,
        "aspect_ratio": job.aspect_ratio.value,
        "video_duration": job.duration,
    }
    if isinstance(job, PromptRequest):
        source: dict[str, Any] = {
            "topic": {
                "topic": job.topic,
                "technique": job.technique.value,
                "duration": job.duration,
                "locale": job.locale.value,
                "model": job.prompt_model,
            }
        }
    else:
        source = {"prompt": job.prompt}
    blob = json.dumps({"options": options, "source": source}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _number_or_none(value: Any) -> float | None:
    """Cosmetic numbers never block a finished video: unparsable becomes None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


LenientNumber = Annotated[float | None, BeforeValidator(_number_or_none)]
TaskId = Annotated[str, BeforeValidator(lambda value: str(value) if value is not None else value)]
_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def video_filename(task_id: str) -> str:
    """``<task_id>.mp4``, refusing ids that could escape a folder (``/``, ``..``)."""
    if not _SAFE_TASK_ID.fullmatch(task_id) or ".." in task_id:
        raise ValueError(f"task_id: {task_id!r} is not a NanoPhoto task id")
    return f"{task_id}.mp4"


def _check_task_id(task_id: str) -> str:
    video_filename(task_id)  # the same rule that names its file
    return task_id


TaskIdText = Annotated[
    str,
    StringConstraints(strip_whitespace=True),
    AfterValidator(_check_task_id),
    schema_pattern(r"^\s*[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\s*$"),
]


@dataclass(frozen=True)
class GeneratedPrompt:
    """A prompt's text, and how many prompt streams may have been charged for it."""

    text: str
    streams_charged: int = 1
    streams_at_risk: int = 0  # attempts that failed in a way NanoPhoto may have charged


class _Response(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class VideoStatus(_Response):
    """A video task's state, from a submit or a status check.

    Any status other than ``completed`` or ``failed`` counts as still running:
    the contract documents ``processing``, sibling APIs also use ``pending``
    and ``generating``.
    """

    task_id: TaskId = Field(alias="taskId", min_length=1)
    status: str
    video_url: str | None = Field(default=None, alias="videoUrl")
    generation_time: LenientNumber = Field(default=None, alias="generationTime")
    credits_used: LenientNumber = Field(default=None, alias="creditsUsed")
    message: str | None = None
    error: str | None = None
    error_code: str | None = Field(default=None, alias="errorCode")
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_answer(cls, document: dict[str, Any]) -> VideoStatus:
        """Parse an API answer, keeping the document exactly as received."""
        status = cls.model_validate(document)
        status._raw = dict(document)
        return status

    @property
    def raw(self) -> dict[str, Any]:
        """The API's JSON document as received (empty if built by hand)."""
        return self._raw

    @property
    def is_completed(self) -> bool:
        """The video is ready at ``video_url``."""
        return self.status == COMPLETED and bool(self.video_url)

    @property
    def is_failed(self) -> bool:
        """The generation failed; final."""
        return self.status == FAILED

    @property
    def is_running(self) -> bool:
        """Neither completed nor failed: keep watching."""
        return not (self.is_completed or self.is_failed)


class StageTimings(BaseModel):
    """How long each stage of making a video took, in seconds."""

    prompt: float = 0.0
    submit: float = 0.0
    wait: float = 0.0
    download: float = 0.0


class VideoResult(BaseModel):
    """A finished video: where it is, what it cost, how long each stage took."""

    task_id: str
    video_url: str
    video_path: str | None = None
    video_size: int | None = None
    video_sha256: str | None = None
    generation_time: float | None = None
    prompt_credits: int = 0
    video_credits: int = 0
    prompt: str
    timings: StageTimings = Field(default_factory=StageTimings)

    @property
    def credits_used(self) -> int:
        """Credits the prompt and the video cost together."""
        return self.prompt_credits + self.video_credits
