"""What the simulator saw and did: requests, credits, video tasks and faults.

Tests and benchmarks read it to prove what a client did: how many requests
per key and endpoint, how many submits, what was charged and refunded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nanophoto.contract import PROCESSING


@dataclass
class VideoTask:
    """One submitted video, from submit to its final state."""

    task_id: str
    key: str
    tier: str
    duration: int
    aspect_ratio: str
    cost: int
    submitted_at: float
    generation_seconds: float
    ready_at: float
    will_fail: bool
    prompt_head: str = ""
    final_status: str | None = None
    reported_at: float | None = None
    status_checks: int = 0
    checked_at: list[float] = field(default_factory=list)

    def as_dict(self, origin: float, time_scale: float) -> dict[str, Any]:
        """A JSON-ready record; times in simulated seconds since ``origin``."""

        def simulated(t: float | None) -> float | None:
            return None if t is None else round((t - origin) / time_scale, 3)

        delay = (
            None
            if self.reported_at is None
            else round((self.reported_at - self.ready_at) / time_scale, 3)
        )
        return {
            "task_id": self.task_id,
            "key": self.key,
            "tier": self.tier,
            "duration": self.duration,
            "aspect_ratio": self.aspect_ratio,
            "cost": self.cost,
            "prompt_head": self.prompt_head,
            "status": self.final_status or PROCESSING,
            "generation_seconds": round(self.generation_seconds, 3),
            "submitted_at": simulated(self.submitted_at),
            "ready_at": simulated(self.ready_at),
            "reported_at": simulated(self.reported_at),
            "detection_delay": delay,
            "status_checks": self.status_checks,
            # When each answered check came, in simulated seconds after the submit.
            "checks_at": [round((t - self.submitted_at) / time_scale, 3) for t in self.checked_at],
        }


@dataclass
class Ledger:
    """Counters the simulator keeps; read a consistent copy with ``snapshot``."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    rate_limited: Counter[str] = field(default_factory=Counter)
    charged: Counter[str] = field(default_factory=Counter)
    refunded: Counter[str] = field(default_factory=Counter)
    prompts: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    tasks: dict[str, VideoTask] = field(default_factory=dict)
    # Per prompt (its first 80 characters): every submit request that reached us, whatever
    # became of it; per topic: the prompt credits kept (charged minus refunded).
    submit_requests: Counter[str] = field(default_factory=Counter)
    prompt_charges: Counter[str] = field(default_factory=Counter)
    # The headers each API request came with (User-Agent, Origin, Referer, Accept), and
    # how many the edge refused.
    headers: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    edge_refused: int = 0
    replayed_answers: int = 0  # answers queued with queue_answer, given instead of the service's
    media_downloads: int = 0
    media_requests_with_authorization: int = 0

    def snapshot(
        self, balances: dict[str, int], starting: dict[str, int], origin: float, time_scale: float
    ) -> dict[str, Any]:
        """A JSON-ready copy of everything, for tests, benchmarks and people."""
        by_key: dict[str, dict[str, int]] = {}
        for (key, endpoint), count in sorted(self.requests.items()):
            by_key.setdefault(key, {})[endpoint] = count
        return {
            "total_requests": sum(self.requests.values()),
            "requests": by_key,
            "rate_limited": dict(self.rate_limited),
            "submits": len(self.tasks),
            "prompts": dict(self.prompts),
            "credits": {
                key: {
                    "start": starting.get(key, 0),
                    "charged": self.charged[key],
                    "refunded": self.refunded[key],
                    "balance": balance,
                }
                for key, balance in balances.items()
            },
            "faults": dict(self.faults),
            "submit_requests": dict(self.submit_requests),
            "prompt_charges": dict(self.prompt_charges),
            "headers": [
                {"user_agent": ua, "origin": o, "referer": r, "accept": a, "count": n}
                for (ua, o, r, a), n in sorted(self.headers.items())
            ],
            "edge_refused": self.edge_refused,
            "replayed_answers": self.replayed_answers,
            "tasks": [task.as_dict(origin, time_scale) for task in self.tasks.values()],
            "media": {
                "downloads": self.media_downloads,
                "with_authorization": self.media_requests_with_authorization,
            },
        }
