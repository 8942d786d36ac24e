"""What the simulator does: keys and credits, timings, limits and faults.

Every duration is in the API's own (simulated) seconds; ``time_scale``
compresses them all, so that at 0.01 a 130 s generation takes 1.3 s. Every
default that is a fact of the service comes from ``nanophoto.contract``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanophoto.contract import (
    COMPLETED,
    FAILED,
    GENERATION_RANGE_S,
    PROCESSING,
    RATE_LIMIT_PER_HOUR,
    RATE_WINDOW_S,
)

DEFAULT_KEY: Final = "sim-key"
DEFAULT_CREDITS: Final = 1000
# `make sim` and `sora2 sandbox`: 100 times faster than the real service.
SANDBOX_PORT: Final = 8765
SANDBOX_TIME_SCALE: Final = 0.01


class Fault(StrEnum):
    """Every way the simulator can misbehave, named once."""

    INTERNAL_ERROR = "internal_error"  # a 500 INTERNAL_ERROR document; nothing was done
    GATEWAY_ERROR = "gateway_error"  # an HTML 502/503/504/524 page from the edge
    DROPPED_CONNECTION = "dropped_connection"  # closed at the edge, no answer
    RATE_LIMITED = "rate_limited"  # a 429 although the budget has room
    # The origin did the work (a submit started and was charged); the answer was lost.
    GATEWAY_ERROR_AFTER = "gateway_error_after"
    DROPPED_CONNECTION_AFTER = "dropped_connection_after"
    SLOW_ANSWER = "slow_answer"  # the origin does the work, then answers stall_seconds late
    SLOW_STREAM = "slow_stream"  # a prompt stream stalls halfway
    TRUNCATED_STREAM = "truncated_stream"  # a prompt stream is cut halfway (refunded)
    GENERATION_FAILED = "generation_failed"  # the video fails (refunded)


# The faults any call can meet, and those only one endpoint can.
ANY_CALL_FAULTS: Final = (
    Fault.INTERNAL_ERROR,
    Fault.GATEWAY_ERROR,
    Fault.DROPPED_CONNECTION,
    Fault.RATE_LIMITED,
    Fault.GATEWAY_ERROR_AFTER,
    Fault.DROPPED_CONNECTION_AFTER,
    Fault.SLOW_ANSWER,
)
STREAM_FAULTS: Final = (Fault.SLOW_STREAM, Fault.TRUNCATED_STREAM)
LOST_ANSWER_FAULTS: Final = (Fault.GATEWAY_ERROR_AFTER, Fault.DROPPED_CONNECTION_AFTER)


class Faults(BaseModel):
    """How often each kind of failure strikes, as probabilities per request.

    The field names are ``Fault`` values; gateway errors and drops strike
    after the origin did the work with the ``after_processing`` share.
    """

    model_config = ConfigDict(extra="forbid")

    internal_error: float = Field(0.0, ge=0, le=1, description="500 INTERNAL_ERROR.")
    gateway_error: float = Field(0.0, ge=0, le=1, description="HTML 502/503/504/524.")
    dropped_connection: float = Field(0.0, ge=0, le=1, description="Close, no answer.")
    rate_limited: float = Field(0.0, ge=0, le=1, description="A 429 within the budget.")
    after_processing: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of gateway errors and drops that strike after the "
        "server did the work (a submit then starts and is charged).",
    )
    slow_stream: float = Field(0.0, ge=0, le=1, description="Prompt stream stalls.")
    truncated_stream: float = Field(0.0, ge=0, le=1, description="Prompt stream cut.")
    generation_failed: float = Field(0.0, ge=0, le=1, description="Video fails.")
    stall_seconds: float = Field(
        90.0, ge=0, description="How long a slow stream or a slow answer stalls."
    )

    def chance(self, fault: Fault) -> float:
        """The probability per request of ``fault`` (its own field)."""
        return float(getattr(self, fault.value))


class SimulatorConfig(BaseModel):
    """The simulator's settings; change ``faults`` at any time."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    keys: dict[str, int] = Field(
        default_factory=lambda: {DEFAULT_KEY: DEFAULT_CREDITS},
        description="API keys and the credits each starts with.",
    )
    time_scale: float = Field(1.0, gt=0, description="Real seconds per simulated second.")
    generation_seconds: tuple[float, float] = Field(
        GENERATION_RANGE_S, description="Range a video's generation time is drawn from."
    )
    prompt_seconds: float = Field(4.0, ge=0, description="How long a prompt streams.")
    prompt_chunks: int = Field(8, ge=1, le=200, description="Chunks a prompt comes in.")
    rate_limit: int = Field(RATE_LIMIT_PER_HOUR, ge=1, description="Requests per window.")
    rate_window_seconds: float = Field(RATE_WINDOW_S, gt=0, description="The rate window.")
    video_url_ttl_seconds: float = Field(
        86400.0, gt=0, description="How long a video URL serves after completion."
    )
    running_statuses: tuple[str, ...] = Field(
        (PROCESSING,), min_length=1, description="Statuses reported while running."
    )
    failed_http_status: int = Field(
        200, description="HTTP status of a failed status check (the contract allows 200 or 500)."
    )
    edge: bool = Field(
        False,
        description="Act as NanoPhoto's CDN edge may: refuse a request without a browser-like "
        "User-Agent or without an Origin header with a 403 HTML challenge page.",
    )
    video_url_delay_seconds: float = Field(
        0.0,
        ge=0,
        description="How long a finished video's URL answers 404 (a CDN not caught up yet).",
    )
    seed: int | None = Field(None, description="Seed for reproducible randomness.")
    faults: Faults = Field(default_factory=Faults)

    @model_validator(mode="after")
    def _ordered_range(self) -> SimulatorConfig:
        if self.failed_http_status not in (200, 500):
            raise ValueError("failed_http_status: the contract allows 200 or 500")
        low, high = self.generation_seconds
        if not 0 <= low <= high:
            raise ValueError("generation_seconds must be (low, high) with 0 <= low <= high")
        if set(self.running_statuses) & {COMPLETED, FAILED}:
            raise ValueError("running_statuses: completed and failed are final, not running")
        return self

    def real(self, simulated_seconds: float) -> float:
        """Real seconds for a span of simulated seconds."""
        return simulated_seconds * self.time_scale
