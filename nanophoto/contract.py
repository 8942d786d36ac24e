"""The NanoPhoto Sora 2 API contract: one source of truth for its facts.

Everything here comes from ``shared/nanophoto-api.md``. The client, the
simulator, the Prefect flows and the command line all read these values, so a
change to the contract is a change in exactly one place.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal, NamedTuple

DEFAULT_BASE_URL: Final = "https://nanophoto.ai"
TOP_UP_URL: Final = "https://nanophoto.ai/settings"

# What NanoPhoto's published tools send on every call; its edge (a CDN) may refuse
# clients that do not look like that, with an HTML page that never reached the API.
DEFAULT_USER_AGENT: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/133.0.0.0 Safari/537.36"
)
ACCEPT: Final = "application/json, text/plain, */*"
ORIGIN: Final = "https://nanophoto.ai"
REFERER: Final = "https://nanophoto.ai/"
# HTTP statuses with which an edge refuses a client before the API sees the request.
EDGE_REFUSALS: Final = frozenset({401, 403, 406})
# The published tools' --timeout: the video tool's, and the prompt tool's.
TIMEOUT_S: Final = 60.0
PROMPT_TIMEOUT_S: Final = 120.0

PROMPT_PATH: Final = "/api/sora-2/generate-prompt"
SUBMIT_PATH: Final = "/api/sora-2/generate"
STATUS_PATH: Final = "/api/sora-2/check-status"


class Mode(StrEnum):
    """Whether the video is made from text alone or from reference images."""

    TEXT_TO_VIDEO = "textToVideo"
    IMAGE_TO_VIDEO = "imageToVideo"


class Technique(StrEnum):
    """The cinematic technique the prompt writer builds the shots around."""

    MONTAGE = "montage"
    LONG_TAKE = "long-take"
    TIME_LAPSE = "time-lapse"
    SLOW_MOTION = "slow-motion"
    TRACKING_SHOT = "tracking-shot"
    AERIAL_VIEW = "aerial-view"
    POV = "pov"
    SPLIT_SCREEN = "split-screen"
    MATCH_CUT = "match-cut"
    FADE_TRANSITION = "fade-transition"


class Locale(StrEnum):
    """The language the prompt is written in."""

    EN = "en"
    ZH = "zh"
    ZH_TW = "zh-TW"
    JA = "ja"
    KO = "ko"
    ES = "es"
    FR = "fr"
    DE = "de"
    PT = "pt"
    RU = "ru"
    AR = "ar"


class ModelTier(StrEnum):
    """The Sora 2 model tier: price, speed and resolution."""

    SORA2 = "sora2"
    PRO_STANDARD = "sora2-pro-standard"
    PRO_HIGH = "sora2-pro-high"


# What each tier is, in the contract's words.
TIER_NOTES: Final[dict[ModelTier, str]] = {
    ModelTier.SORA2: "cheapest, fastest",
    ModelTier.PRO_STANDARD: "720p",
    ModelTier.PRO_HIGH: "1080p",
}


class AspectRatio(StrEnum):
    """The video's orientation."""

    PORTRAIT = "portrait"
    LANDSCAPE = "landscape"


# The prompt endpoint takes the duration as a number, the video endpoint as a
# string ("10"); we keep one typed value and convert at the wire.
Duration = Literal[10, 15]
DURATIONS: Final[tuple[int, ...]] = (10, 15)

DEFAULT_MODE: Final = Mode.TEXT_TO_VIDEO
DEFAULT_TECHNIQUE: Final = Technique.MONTAGE
DEFAULT_LOCALE: Final = Locale.EN
DEFAULT_TIER: Final = ModelTier.SORA2
DEFAULT_ASPECT_RATIO: Final = AspectRatio.PORTRAIT
DEFAULT_DURATION: Final[Duration] = 10
DEFAULT_PROMPT_MODEL: Final = "google/gemini-3-flash-preview"

TOPIC_MAX_CHARS: Final = 500
MAX_IMAGE_URLS: Final = 3

PROMPT_COST: Final = 2
VIDEO_COST: Final[dict[tuple[ModelTier, int], int]] = {
    (ModelTier.SORA2, 10): 4,
    (ModelTier.SORA2, 15): 8,
    (ModelTier.PRO_STANDARD, 10): 60,
    (ModelTier.PRO_STANDARD, 15): 100,
    (ModelTier.PRO_HIGH, 10): 120,
    (ModelTier.PRO_HIGH, 15): 240,
}


def video_cost(tier: ModelTier | str, duration: int) -> int:
    """Credits a video of this tier and duration costs, taken at submit."""
    return VIDEO_COST[(ModelTier(tier), int(duration))]


def tier_prices() -> str:
    """The cost table in words, for help texts and run forms: ``sora2 (4/8 credits, ...)``."""
    per = "/".join(str(d) for d in DURATIONS)
    tiers = [
        f"{tier.value} ({'/'.join(str(video_cost(tier, d)) for d in DURATIONS)} credits, "
        f"{TIER_NOTES[tier]})"
        for tier in ModelTier
    ]
    return f"{', '.join(tiers[:-1])} or {tiers[-1]}, for {per} seconds"


RATE_LIMIT_PER_HOUR: Final = 100
RATE_WINDOW_S: Final = 3600.0  # the limit counts requests over a sliding hour

# NanoPhoto's timing advice: wait 120 s, then check every 20 s, up to 1200 s; and
# "poll every 5-10 seconds" at the most: no faster than 5 s.
INITIAL_STATUS_DELAY_S: Final = 120.0
STATUS_CHECK_INTERVAL_S: Final = 20.0
MIN_STATUS_CHECK_INTERVAL_S: Final = 5.0
MAX_WAIT_S: Final = 1200.0
# "Roughly 120-480 s depending on queue, tier and prompt": the middle, for progress bars.
GENERATION_RANGE_S: Final = (120.0, 480.0)
EXPECTED_GENERATION_S: Final = 300.0

COMPLETED: Final = "completed"
FAILED: Final = "failed"
PROCESSING: Final = "processing"
GATEWAY_STATUSES: Final = frozenset({502, 503, 504, 524})


class ErrorSpec(NamedTuple):
    """One row of the contract's error table."""

    code: str
    http_status: int
    meaning: str
    retryable: bool


ERROR_SPECS: Final[dict[str, ErrorSpec]] = {
    spec.code: spec
    for spec in (
        ErrorSpec("INVALID_INPUT", 400, "topic missing, empty or too long", False),
        ErrorSpec("PROMPT_REQUIRED", 400, "no prompt", False),
        ErrorSpec("IMAGE_REQUIRED", 400, "image-to-video without images", False),
        ErrorSpec("IMAGE_URLS_REQUIRED", 400, "images must be public URLs", False),
        ErrorSpec("TASK_ID_REQUIRED", 400, "no taskId", False),
        ErrorSpec("LOGIN_REQUIRED", 401, "key missing or invalid", False),
        ErrorSpec("INSUFFICIENT_CREDITS", 402, "not enough credits", False),
        ErrorSpec("TASK_NOT_FOUND", 404, "unknown task, or another key's task", False),
        ErrorSpec("API_KEY_RATE_LIMIT_EXCEEDED", 429, "over the key's rate limit", True),
        # Final for a status check; a new submit would be charged again.
        ErrorSpec("GENERATION_FAILED", 500, "the generation failed server-side", False),
        # Retryable for a status check; for a submit only if it surely did not start.
        ErrorSpec("INTERNAL_ERROR", 500, "server error", True),
    )
}
