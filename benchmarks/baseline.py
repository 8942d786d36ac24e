"""The benchmark's baseline arm: the API driven the way NanoPhoto's published tool drives it.

It makes one video at a time, topic after topic: write a prompt, submit it, wait
the advised 120 s, then check every 20 s until the video completes, fails or
1200 s pass. Like ``sora2_generate.py`` it never retries and never resumes: the
first HTTP error, 429, dropped connection or timeout ends that video as failed
(the tool exits 1), and the loop goes on with the next topic, as a user would.

It imitates an independent, naive tool, so it speaks raw ``httpx`` and reads
only the contract's constants: no Prefect, no ``nanophoto.client``.

Run ``python -m benchmarks.baseline`` for a 30-second run against the simulator.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from nanophoto.contract import (
    INITIAL_STATUS_DELAY_S,
    MAX_WAIT_S,
    PROMPT_PATH,
    STATUS_CHECK_INTERVAL_S,
    STATUS_PATH,
    SUBMIT_PATH,
)

# The published tool's ``--timeout 60`` (seconds per HTTP request), in API seconds.
REQUEST_TIMEOUT_S = 60.0

PROMPT_OPTIONS: dict[str, object] = {
    "technique": "montage",
    "duration": 10,
    "locale": "en",
    "mode": "textToVideo",
    "imageUrls": [],
    "model": "google/gemini-3-flash-preview",
}
VIDEO_OPTIONS: dict[str, object] = {
    "mode": "textToVideo",
    "modelTier": "sora2",
    "aspectRatio": "portrait",
    "videoDuration": "10",
    "imageUrls": [],
}


class _VideoFailed(Exception):
    """Ends the current video, as any error ends the published tool's process."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Tally:
    """What the run did so far; kept outside the loop so a horizon cut loses nothing."""

    videos_started: int = 0
    videos_completed: int = 0
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    failed_by_stage: Counter[str] = field(default_factory=Counter)
    requests_sent: Counter[str] = field(default_factory=Counter)
    http_429: int = 0
    completed_task_ids: list[str] = field(default_factory=list)
    # Submitted (so paid for) but given up on before a final status was seen.
    unwatched_task_ids: list[str] = field(default_factory=list)
    stage: str = "idle"  # prompt, submit or status while a video is in flight
    task_id: str | None = None
    # The video in flight when the horizon came: counted as started, not failed.
    abandoned_at_horizon: str | None = None
    abandoned_task_id: str | None = None


async def run_baseline(
    base_url: str,
    api_key: str,
    topics: list[str],
    *,
    time_scale: float,
    horizon_s: float,
    pause_after_failure_s: float = 0.0,
) -> dict[str, object]:
    """Make videos one at a time, like the published tool, for ``horizon_s`` real seconds.

    Args:
        base_url: The API's base URL, e.g. the simulator's.
        api_key: The key sent as ``Authorization: Bearer``.
        topics: Topics to make videos of, in turn, starting again at the end.
        time_scale: Real seconds per API second: scales the tool's waits and timeout.
        horizon_s: Real seconds to run; the video in flight at the end is abandoned.
        pause_after_failure_s: API seconds (scaled) the user takes to start again after
            the tool failed. With 0 it restarts at once: once the hourly budget is
            spent, every restart is a 429 at the prompt, by the thousand.

    Returns:
        Counts of videos completed and failed (by reason and stage), requests sent
        per endpoint, 429s, the completed and unwatched task ids, and ``elapsed_s``.
    """
    if not topics:
        raise ValueError("topics must not be empty")
    tally = _Tally()
    started = time.monotonic()
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S * time_scale)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:
        horizon = asyncio.timeout(horizon_s)
        try:
            async with horizon:
                for topic in itertools.cycle(topics):
                    if time.monotonic() - started >= horizon_s:
                        break
                    if not await _make_video(client, topic, tally, time_scale):
                        await asyncio.sleep(pause_after_failure_s * time_scale)
        except TimeoutError:
            if not horizon.expired():
                raise
            tally.abandoned_at_horizon = tally.stage
            tally.abandoned_task_id = tally.task_id
    elapsed = time.monotonic() - started
    return {
        "videos_started": tally.videos_started,
        "videos_completed": tally.videos_completed,
        "videos_failed": sum(tally.failed_by_reason.values()),
        "failed_by_reason": dict(tally.failed_by_reason),
        "failed_by_stage": dict(tally.failed_by_stage),
        "requests_sent": dict(tally.requests_sent),
        "requests_total": sum(tally.requests_sent.values()),
        "http_429": tally.http_429,
        "completed_task_ids": tally.completed_task_ids,
        "unwatched_task_ids": tally.unwatched_task_ids,
        "abandoned_at_horizon": tally.abandoned_at_horizon,
        "abandoned_task_id": tally.abandoned_task_id,
        "elapsed_s": round(elapsed, 3),
    }


async def _make_video(
    client: httpx.AsyncClient, topic: str, tally: _Tally, time_scale: float
) -> bool:
    """One run of the tool: prompt, submit, wait; any error fails the video, no retry."""
    tally.videos_started += 1
    tally.task_id = None
    try:
        tally.stage = "prompt"
        prompt = await _write_prompt(client, topic, tally)
        tally.stage = "submit"
        document = await _submit_video(client, prompt, tally)
        tally.task_id = str(document["taskId"])
        tally.stage = "status"
        if document.get("status") != "completed":
            await _wait_for_video(client, tally.task_id, tally, time_scale)
    except _VideoFailed as failure:
        tally.failed_by_reason[failure.reason] += 1
        tally.failed_by_stage[tally.stage] += 1
        if tally.task_id is not None and failure.reason != "GENERATION_FAILED":
            tally.unwatched_task_ids.append(tally.task_id)
        tally.stage = "idle"
        return False
    tally.videos_completed += 1
    tally.completed_task_ids.append(str(tally.task_id))
    tally.stage = "idle"
    return True


async def _write_prompt(client: httpx.AsyncClient, topic: str, tally: _Tally) -> str:
    """The streamed prompt, read to the end as text."""
    response = await _post(client, PROMPT_PATH, {"topic": topic, **PROMPT_OPTIONS}, tally)
    if response.status_code != 200:
        raise _VideoFailed(_error_code(response))
    return response.text


async def _submit_video(client: httpx.AsyncClient, prompt: str, tally: _Tally) -> dict[str, Any]:
    """The submit's answer, which must carry a task id."""
    response = await _post(client, SUBMIT_PATH, {"prompt": prompt, **VIDEO_OPTIONS}, tally)
    document = _json_document(response)
    if response.status_code != 200 or document.get("success") is False:
        raise _VideoFailed(_error_code(response))
    if document.get("status") == "failed":
        raise _VideoFailed(str(document.get("errorCode") or "GENERATION_FAILED"))
    if not isinstance(document.get("taskId"), str):
        raise _VideoFailed("NO_TASK_ID")
    return document


async def _wait_for_video(
    client: httpx.AsyncClient, task_id: str, tally: _Tally, time_scale: float
) -> None:
    """Wait 120 s, then check every 20 s (a fixed sleep) until final or 1200 s pass."""
    submitted = time.monotonic()
    await asyncio.sleep(INITIAL_STATUS_DELAY_S * time_scale)
    while True:
        response = await _post(client, STATUS_PATH, {"taskId": task_id}, tally)
        document = _json_document(response)
        status = document.get("status")
        # A failed video may come with HTTP 200 or 500: the contract accepts both.
        if status == "failed":
            raise _VideoFailed(str(document.get("errorCode") or "GENERATION_FAILED"))
        if response.status_code != 200 or document.get("success") is False:
            raise _VideoFailed(_error_code(response))
        if status == "completed":
            return
        if time.monotonic() - submitted >= MAX_WAIT_S * time_scale:
            raise _VideoFailed("MAX_WAIT_EXCEEDED")
        await asyncio.sleep(STATUS_CHECK_INTERVAL_S * time_scale)


async def _post(
    client: httpx.AsyncClient, path: str, body: dict[str, object], tally: _Tally
) -> httpx.Response:
    """Send one POST, counted whatever happens; a transport error fails the video."""
    tally.requests_sent[path.rsplit("/", 1)[-1]] += 1
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as error:  # dropped connection, timeout, cut stream
        raise _VideoFailed(type(error).__name__) from error
    if response.status_code == 429:
        tally.http_429 += 1
    return response


def _json_document(response: httpx.Response) -> dict[str, Any]:
    """The body as a JSON object, or ``{}`` when it is not one (a gateway page)."""
    try:
        document = response.json()
    except ValueError:
        if response.status_code == 200:
            raise _VideoFailed("INVALID_JSON") from None
        return {}
    return document if isinstance(document, dict) else {}


def _error_code(response: httpx.Response) -> str:
    """The answer's ``errorCode``, or ``HTTP <status>`` when it has none."""
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("errorCode"), str):
        return str(document["errorCode"])
    return f"HTTP {response.status_code}"


def main() -> None:
    """Run the baseline for 30 real seconds against a simulator at 1/100 time."""
    # Imported here: the baseline itself needs only the contract and httpx.
    from nanophoto_simulator import DEFAULT_KEY, SimulatorConfig, SimulatorThread

    time_scale = 0.01
    topics = [
        "A red fox crossing fresh snow at dawn",
        "A lighthouse in a storm at night",
        "Tokyo street food stalls in the rain",
        "A hummingbird feeding in slow motion",
        "Sunrise over terraced rice fields",
    ]
    with SimulatorThread(SimulatorConfig(time_scale=time_scale, seed=1)) as sim:
        result = asyncio.run(
            run_baseline(sim.base_url, DEFAULT_KEY, topics, time_scale=time_scale, horizon_s=30.0)
        )
        snapshot = sim.snapshot()
    totals = {name: value for name, value in snapshot.items() if name != "tasks"}
    totals["task_statuses"] = dict(Counter(task["status"] for task in snapshot["tasks"]))
    print("baseline:", json.dumps(result, indent=2))
    print("simulator:", json.dumps(totals, indent=2))


if __name__ == "__main__":
    main()
