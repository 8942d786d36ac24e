"""Generation times one batch has seen, shared by its parts through Prefect Variables.

A batch in parts runs on several workers; each part's ``BudgetPlanner`` times
its checks by the generation times it knows. So that every part knows what
the whole batch has seen, each part keeps its own observations in a Variable
``sora2_times_<batch>_<part>`` and, every ``SHARE_EVERY_S``, reads its
siblings' (parts of later rounds read those of earlier ones too). The batch's
run removes them when it ends. Sharing is best effort: a part that cannot
reach the Variables plans by what it has seen itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Final

from prefect import get_client
from prefect.exceptions import ObjectNotFound
from prefect.variables import Variable

from nanophoto.planner import GenerationTimes

PREFIX: Final = "sora2_times_"
SHARE_EVERY_S: Final = 10.0
# A Variable holds at most 5,000 characters: each part shares its first times of each
# kind, plenty for its siblings' quantiles (the planner trusts a kind from 30 on).
MAX_SHARED_PER_KIND: Final = 100
_PAGE: Final = 200  # the most one request returns (PREFECT_SERVER_API_DEFAULT_LIMIT)
_logger = logging.getLogger(__name__)


def _group(batch: str) -> str:
    return f"{PREFIX}{batch.replace('-', '')}_"


class SharedTimes(GenerationTimes):
    """``GenerationTimes`` that also learns from the other parts of its batch."""

    def __init__(self, batch: str, part: str) -> None:
        super().__init__()
        self.group = _group(batch)
        self.name = f"{self.group}{part}"
        self.mine: dict[str, list[float]] = {}  # "tier:duration" -> seconds, as shared
        self._dirty = False
        self._taken: dict[tuple[str, str], int] = {}  # (sibling, kind) -> entries observed

    def observe(self, tier: str, duration: int, seconds: float) -> None:
        """This part's own observation: learned here and shared at the next ``share``."""
        super().observe(tier, duration, seconds)
        kept = self.mine.setdefault(f"{tier}:{int(duration)}", [])
        if len(kept) < MAX_SHARED_PER_KIND:
            kept.append(round(float(seconds), 1))
            self._dirty = True

    async def share(self) -> int:
        """Publish this part's times, learn the siblings' new ones; how many were new."""
        if self._dirty:
            try:
                await Variable.aset(self.name, json.dumps(self.mine), overwrite=True)
                self._dirty = False
            except Exception as error:  # still learn from the others; try again next time
                _logger.warning("could not share generation times: %r", error)
        learned = 0
        for name, value in (await _variables(self.group)).items():
            if name == self.name:
                continue
            for kind, seconds in _parsed(value).items():
                tier, _, duration = kind.rpartition(":")
                start = self._taken.get((name, kind), 0)
                for value_s in seconds[start:]:
                    super().observe(tier, int(duration), value_s)
                    learned += 1
                self._taken[(name, kind)] = len(seconds)
        return learned


async def _variables(group: str) -> dict[str, Any]:
    """The Variables whose name starts with ``group``, by name (every page of them)."""
    found: dict[str, Any] = {}
    async with get_client() as client:
        while True:
            response = await client.request(
                "POST",
                "/variables/filter",
                json={
                    "variables": {"name": {"like_": f"{group}%"}},
                    "limit": _PAGE,
                    "offset": len(found),
                    "sort": "NAME_ASC",
                },
            )
            page = response.json()
            found.update({v["name"]: v["value"] for v in page})
            if len(page) < _PAGE:
                break
    return {name: value for name, value in found.items() if name.startswith(group)}


def _parsed(value: Any) -> dict[str, list[float]]:
    """A sibling's times; anything malformed is ignored, never trusted."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        document = json.loads(value) if isinstance(value, str) else value
        return {
            str(kind): [float(s) for s in seconds if float(s) > 0]
            for kind, seconds in document.items()
            if isinstance(seconds, list) and ":" in str(kind)
        }
    return {}


async def forget(batch: str) -> None:
    """Remove every part's Variable of ``batch`` (the batch is done)."""
    group = _group(batch)
    async with get_client() as client:
        for name in await _variables(group):
            with contextlib.suppress(ObjectNotFound):
                await client.delete_variable_by_name(name)
