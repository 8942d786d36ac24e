"""What the simulator does: keys and credits, timings, limits and faults.

Every duration is in the API's own (simulated) seconds; ``time_scale``
compresses them all, so that at 0.01 a 130 s generation takes 1.3 s.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanophoto.contract import RATE_LIMIT_PER_HOUR

DEFAULT_KEY = "sim-key"


class Faults(BaseModel):
    """How often each kind of failure strikes, as probabilities per request."""

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
    stall_seconds: float = Field(90.0, ge=0, description="How long a slow stream stalls.")


class SimulatorConfig(BaseModel):
    """The simulator's settings; change ``faults`` at any time."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    keys: dict[str, int] = Field(
        default_factory=lambda: {DEFAULT_KEY: 1000},
        description="API keys and the credits each starts with.",
    )
    time_scale: float = Field(1.0, gt=0, description="Real seconds per simulated second.")
    generation_seconds: tuple[float, float] = Field(
        (120.0, 480.0), description="Range a video's generation time is drawn from."
    )
    prompt_seconds: float = Field(4.0, ge=0, description="How long a prompt streams.")
    prompt_chunks: int = Field(8, ge=1, le=200, description="Chunks a prompt comes in.")
    rate_limit: int = Field(RATE_LIMIT_PER_HOUR, ge=1, description="Requests per window.")
    rate_window_seconds: float = Field(3600.0, gt=0, description="The rate window.")
    video_url_ttl_seconds: float = Field(
        86400.0, gt=0, description="How long a video URL serves after completion."
    )
    running_statuses: tuple[str, ...] = Field(
        ("processing",), min_length=1, description="Statuses reported while running."
    )
    failed_http_status: int = Field(
        200, description="HTTP status of a failed status check (200 or 500)."
    )
    seed: int | None = Field(None, description="Seed for reproducible randomness.")
    faults: Faults = Field(default_factory=Faults)

    @model_validator(mode="after")
    def _ordered_range(self) -> SimulatorConfig:
        low, high = self.generation_seconds
        if not 0 <= low <= high:
            raise ValueError("generation_seconds must be (low, high) with 0 <= low <= high")
        return self

    def real(self, simulated_seconds: float) -> float:
        """Real seconds for a span of simulated seconds."""
        return simulated_seconds * self.time_scale
