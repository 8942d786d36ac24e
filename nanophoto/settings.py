"""Settings from the environment (prefix ``NANOPHOTO_``) and API key resolution.

The key is resolved as NanoPhoto's published tools do: an explicit value, then
``NANOPHOTO_API_KEY``, then ``~/.openclaw/openclaw.json``. It is held as a
``SecretStr`` everywhere, so it never shows in a repr, a log or an exception.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nanophoto.contract import (
    DEFAULT_BASE_URL,
    DEFAULT_USER_AGENT,
    RATE_LIMIT_PER_HOUR,
    RATE_WINDOW_S,
    TIMEOUT_S,
)
from nanophoto.errors import ConfigurationError, MissingAPIKeyError
from nanophoto.lite import CONNECT_TIMEOUT_S, check_base_url, is_header_text, is_key_text

VIDEO_SKILL: Final = "sora-2-generate"
PROMPT_SKILL: Final = "video-prompt-generator"
OPENCLAW_FILE: Final = Path("~/.openclaw/openclaw.json")


class NanoPhotoSettings(BaseSettings):
    """Client settings, read from ``NANOPHOTO_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="NANOPHOTO_", extra="ignore")

    api_key: SecretStr | None = Field(default=None, description="The NanoPhoto API key.")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="The API's base URL.")
    user_agent: str = Field(
        default=DEFAULT_USER_AGENT,
        min_length=1,
        max_length=512,
        description="The User-Agent sent to NanoPhoto; by default the desktop Chrome one "
        "its published tools send (its edge may refuse other clients).",
    )
    connect_timeout: float = Field(
        default=CONNECT_TIMEOUT_S, gt=0, description="Seconds to connect."
    )
    read_timeout: float = Field(
        default=TIMEOUT_S, gt=0, description="Seconds to wait for each read of an answer."
    )
    write_timeout: float = Field(default=30.0, gt=0, description="Seconds to send.")
    max_retries: int = Field(
        default=3, ge=0, le=10, description="Retries of a call that is safe to retry."
    )
    retry_base_delay: float = Field(
        default=0.5, gt=0, description="First back-off in seconds; doubles each retry."
    )
    retry_max_delay: float = Field(default=8.0, gt=0, description="Longest back-off.")
    retry_rate_limit_delay: float = Field(
        default=15.0, gt=0, description="First back-off after a 429 without Retry-After."
    )
    retry_after_max: float = Field(
        default=60.0, gt=0, description="Longest wait a Retry-After header can ask for."
    )
    call_timeout: float = Field(
        default=300.0, gt=0, description="Most seconds one attempt of a call may take."
    )
    rate_limit: int = Field(
        default=RATE_LIMIT_PER_HOUR,
        ge=1,
        description="API requests the key allows per rate window (100 unless NanoPhoto "
        "raised it); every process of ours stays under it.",
    )
    rate_window: float = Field(
        default=RATE_WINDOW_S,
        gt=0,
        description="The rate window in seconds of our clock: an hour, times "
        "time_scale unless set.",
    )
    time_scale: float = Field(
        default=1.0,
        gt=0,
        description="Our seconds per second of the API's clock: 1, except against a "
        "time-compressed simulator (0.01 for `make sim`). Watch schedules and the rate "
        "window are in the API's seconds and run this much faster.",
    )
    openclaw_file: Path = Field(
        default=OPENCLAW_FILE, description="The OpenClaw config holding skill keys."
    )

    @field_validator("base_url")
    @classmethod
    def _https_unless_local(cls, url: str) -> str:
        return check_base_url(url)

    @field_validator("user_agent")
    @classmethod
    def _one_header_line(cls, value: str) -> str:
        if not is_header_text(value):
            raise ValueError("must be printable ASCII on one line (it is sent as a header)")
        return value.strip()

    @model_validator(mode="after")
    def _window_on_our_clock(self) -> Self:
        """A compressed simulator's hour is compressed too, unless the window was set."""
        if "rate_window" not in self.model_fields_set:
            self.rate_window = RATE_WINDOW_S * self.time_scale
        return self


def current_settings() -> NanoPhotoSettings:
    """The settings the environment gives now, built once per distinct ``NANOPHOTO_*`` set.

    Building them is a pass of pydantic-settings over every field and variable,
    and a batch asks before every call. The result is shared: read it, never
    change it (build a ``NanoPhotoSettings`` of your own for that).
    """
    snapshot = _our_variables()
    settings = _CURRENT.get(snapshot)
    if settings is None:
        if len(_CURRENT) >= 64:  # environments come and go in tests: keep a few
            _CURRENT.clear()
        settings = _CURRENT[snapshot] = NanoPhotoSettings()
    return settings


def _our_variables() -> tuple[tuple[object, object], ...]:
    """The ``NANOPHOTO_*`` variables, read from the bytes behind ``os.environ`` where
    there are some: ``os.environ.items()`` decodes every variable of the process, about a
    tenth of a batch process's CPU when asked before every call."""
    raw: object = getattr(os.environ, "_data", None)  # CPython on POSIX: bytes -> bytes
    if os.supports_bytes_environ and isinstance(raw, dict):
        # A copy first (C speed): another thread may change the environment meanwhile.
        found = [(k, v) for k, v in list(raw.items()) if k[:10].upper() == b"NANOPHOTO_"]
    else:
        found = [(k, v) for k, v in os.environ.items() if k.upper().startswith("NANOPHOTO_")]
    return tuple(sorted(found))


_CURRENT: dict[tuple[tuple[object, object], ...], NanoPhotoSettings] = {}


def _present(value: str | SecretStr | None) -> SecretStr | None:
    """An empty or blank value counts as missing, as in the published tools."""
    if value is None:
        return None
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return SecretStr(raw.strip()) if raw and raw.strip() else None


def _check_key_characters(key: SecretStr, place: str) -> None:
    """Refuse a key that cannot be sent in a header, without ever echoing it."""
    raw = key.get_secret_value()
    if not is_key_text(raw):
        raise ConfigurationError(
            f"the API key from {place} contains spaces, line breaks or non-ASCII "
            "characters; copy it again from https://nanophoto.ai/settings/apikeys"
        )


def key_from_openclaw(path: Path, skill: str = VIDEO_SKILL) -> SecretStr | None:
    """The key under ``skills.entries.<skill>.env.NANOPHOTO_API_KEY``, if any."""
    try:
        document = json.loads(path.expanduser().read_text(encoding="utf-8"))
        value = document["skills"]["entries"][skill]["env"]["NANOPHOTO_API_KEY"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return _present(value) if isinstance(value, str) else None


def resolve_api_key(
    explicit: str | SecretStr | None = None,
    *,
    settings: NanoPhotoSettings | None = None,
    skills: tuple[str, ...] = (VIDEO_SKILL, PROMPT_SKILL),
    extra_sources: tuple[tuple[str, SecretStr | None], ...] = (),
) -> SecretStr:
    """The API key from the first place that has one.

    Order: ``explicit``, ``NANOPHOTO_API_KEY``, then each of ``extra_sources``
    (for example a Prefect block), then the OpenClaw file's entry for each of
    ``skills``. Raises ``MissingAPIKeyError`` naming every place looked at.
    """
    settings = settings or current_settings()
    candidates: list[tuple[str, str | SecretStr | None]] = [
        ("the explicit key", explicit),
        ("NANOPHOTO_API_KEY", settings.api_key),
        *extra_sources,
    ]
    for skill in skills:
        candidates.append(
            (
                f"{settings.openclaw_file} ({skill})",
                key_from_openclaw(settings.openclaw_file, skill),
            )
        )
    for place, candidate in candidates:
        key = _present(candidate)
        if key is not None:
            _check_key_characters(key, place)
            return key
    places = [
        "an explicit key (--api-key)",
        "the environment variable NANOPHOTO_API_KEY",
        *(name for name, _ in extra_sources),
        *(
            f"{settings.openclaw_file} at skills.entries.{skill}.env.NANOPHOTO_API_KEY"
            for skill in skills
        ),
    ]
    raise MissingAPIKeyError(
        "no NanoPhoto API key found; looked in: "
        + "; ".join(places)
        + ". Create a key at https://nanophoto.ai/settings/apikeys."
    )
