"""Typed requests and responses of the NanoPhoto Sora 2 API.

Requests validate on construction, so bad input is refused with an error that
names the field before any request is sent and before any credit is spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any
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
    FAILED,
    MAX_IMAGE_URLS,
    TOPIC_MAX_CHARS,
    AspectRatio,
    Duration,
    Locale,
    Mode,
    ModelTier,
    Technique,
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
Topic = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TOPIC_MAX_CHARS),
    schema_pattern(_NOT_BLANK),
]


ImageUrl = Annotated[
    str, AfterValidator(check_image_url), schema_pattern(r"^\s*[hH][tT][tT][pP][sS]?://")
]
ImageUrls = Annotated[list[ImageUrl], Field(max_length=MAX_IMAGE_URLS)]
PromptText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1), schema_pattern(_NOT_BLANK)
]
ModelName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1), schema_pattern(_NOT_BLANK)
]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = DEFAULT_MODE
    image_urls: list[ImageUrl] = Field(
        default_factory=list, max_length=MAX_IMAGE_URLS, validate_default=True
    )

    @field_validator("image_urls")
    @classmethod
    def _images_for_image_mode(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("mode") == Mode.IMAGE_TO_VIDEO and not urls:
            raise ValueError(
                f"imageToVideo needs 1 to {MAX_IMAGE_URLS} image URLs; none were given"
            )
        return urls


class PromptRequest(_Request):
    """What ``/generate-prompt`` takes: a topic and how to film it."""

    topic: Topic
    technique: Technique = DEFAULT_TECHNIQUE
    duration: Duration = DEFAULT_DURATION
    locale: Locale = DEFAULT_LOCALE
    model: ModelName = DEFAULT_PROMPT_MODEL

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: ``duration`` is a number on this endpoint."""
        body: dict[str, Any] = {
            "topic": self.topic,
            "mode": self.mode.value,
            "technique": self.technique.value,
            "duration": self.duration,
            "model": self.model,
            "locale": self.locale.value,
        }
        if self.image_urls:
            body["imageUrls"] = list(self.image_urls)
        return body


class VideoOptions(_Request):
    """How to render a video, validated before any prompt is paid for."""

    model_tier: ModelTier = DEFAULT_TIER
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO
    video_duration: Duration = DEFAULT_DURATION

    @property
    def cost(self) -> int:
        """Credits this video costs at submit (refunded if it fails)."""
        return video_cost(self.model_tier, self.video_duration)

    def with_prompt(self, prompt: str) -> VideoRequest:
        """A submit request for this prompt with these options."""
        return VideoRequest(prompt=prompt, **self.model_dump())


class VideoRequest(VideoOptions):
    """What ``/generate`` takes: a ready prompt and the rendering options."""

    prompt: PromptText

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: ``videoDuration`` is a string on this endpoint."""
        body: dict[str, Any] = {
            "prompt": self.prompt,
            "mode": self.mode.value,
            "modelTier": self.model_tier.value,
            "aspectRatio": self.aspect_ratio.value,
            "videoDuration": str(self.video_duration),
        }
        if self.image_urls:
            body["imageUrls"] = list(self.image_urls)
        return body


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
