"""The flows end to end on a Prefect server, against the simulator."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from prefect import State, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.video import prompt_to_video, resume_video, topic_to_video
from nanophoto.client import NanoPhotoClient
from nanophoto.contract import AspectRatio, ModelTier
from nanophoto.models import VideoRequest
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import DEFAULT_KEY
from nanophoto_simulator.server import Simulator
from tests.helpers import MakeSimulator, exception_text, settings_for, use_simulator

FAST = WatchSchedule()  # NanoPhoto's seconds: NANOPHOTO_TIME_SCALE compresses them


async def test_topic_becomes_a_video_on_disk(api: Simulator, tmp_path: Path) -> None:
    result = await topic_to_video(topic="A fox at dawn", schedule=FAST, output_dir=str(tmp_path))
    assert result.video_path is not None
    video = Path(result.video_path)
    assert video.name == f"{result.task_id}.mp4"
    assert video.read_bytes()[4:8] == b"ftyp"
    assert result.video_size == video.stat().st_size
    assert result.prompt.startswith("A fox at dawn")
    assert (result.prompt_credits, result.video_credits, result.credits_used) == (2, 4, 6)
    assert result.generation_time is not None
    assert 120 <= result.generation_time <= 480
    assert result.timings.wait > 0
    ledger = api.snapshot()
    assert ledger["submits"] == 1
    assert ledger["requests"][DEFAULT_KEY]["generate-prompt"] == 1
    assert ledger["credits"][DEFAULT_KEY]["charged"] == 6
    task = ledger["tasks"][0]
    assert task["task_id"] == result.task_id
    assert task["status_checks"] == ledger["requests"][DEFAULT_KEY]["check-status"]


async def test_a_ready_prompt_becomes_a_landscape_pro_video(api: Simulator, tmp_path: Path) -> None:
    result = await prompt_to_video(
        prompt="A lighthouse in a storm, slow push-in",
        model_tier=ModelTier.PRO_HIGH,
        aspect_ratio=AspectRatio.LANDSCAPE,
        duration=15,
        schedule=FAST,
        output_dir=str(tmp_path),
    )
    assert result.video_credits == 240
    assert result.prompt_credits == 0
    ledger = api.snapshot()
    assert ledger["tasks"][0]["tier"] == "sora2-pro-high"
    assert ledger["tasks"][0]["aspect_ratio"] == "landscape"
    assert "generate-prompt" not in ledger["requests"][DEFAULT_KEY]


async def test_the_default_schedule_sees_a_130_second_video_at_the_140_second_check(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """NanoPhoto's rhythm, checked at a compressed scale (SORA2_TIME_SCALE=1 for real time).

    Asserted on the simulator's clock and the schedule's arithmetic, never on how
    late a loaded machine made a check: each check comes at or after its slot
    (120 s, 140 s, ...), the video is seen at the first check after it is done,
    and no check is spent before 120 s.
    """
    scale = float(os.environ.get("SORA2_TIME_SCALE", "0.05"))
    sim = make_simulator(time_scale=scale, generation_seconds=(130, 130))
    use_simulator(sim, monkeypatch)
    result = await prompt_to_video(
        prompt="a fox", schedule=WatchSchedule(), output_dir=str(tmp_path)
    )
    ledger = sim.snapshot()
    assert ledger["submits"] == 1
    task = ledger["tasks"][0]
    checks = task["checks_at"]
    assert ledger["requests"][DEFAULT_KEY]["check-status"] == len(checks)
    assert 1 <= len(checks) <= 2  # 120 s (still running), then 140 s (done)
    for index, at in enumerate(checks):
        assert at >= 120 + 20 * index - 0.01  # never before its slot
    assert all(at < 130 for at in checks[:-1])  # every check but the last: still running
    assert checks[-1] >= 130
    assert task["reported_at"] - task["submitted_at"] == pytest.approx(checks[-1], abs=0.01)
    assert result.generation_time == 130


INVALID_TOPIC_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"topic": ""}, "topic"),
    ({"topic": "x" * 501}, "topic"),
    ({"topic": "fox", "technique": "dolly-zoom"}, "technique"),
    ({"topic": "fox", "locale": "it"}, "locale"),
    ({"topic": "fox", "duration": 12}, "duration"),
    ({"topic": "fox", "model_tier": "sora3"}, "model_tier"),
    ({"topic": "fox", "aspect_ratio": "square"}, "aspect_ratio"),
    ({"topic": "fox", "image_urls": ["https://e.com/1.png"] * 4}, "image_urls"),
    ({"topic": "fox", "image_urls": ["/home/me/cat.png"]}, "image_urls"),
    ({"topic": "fox", "image_urls": ["data:image/png;base64,AAAA"]}, "image_urls"),
    ({"topic": "fox", "mode": "imageToVideo"}, "image_urls"),
    ({"topic": "fox", "schedule": {"interval": 0}}, "interval"),
]


@pytest.mark.parametrize(("parameters", "field"), INVALID_TOPIC_INPUTS)
async def test_invalid_input_fails_naming_the_field_before_any_request(
    api: Simulator, parameters: dict[str, Any], field: str
) -> None:
    state = await topic_to_video(**parameters, return_state=True)
    assert isinstance(state, State)
    assert state.is_failed()
    assert field in str(state.message) + (await exception_text(state))
    assert api.snapshot()["total_requests"] == 0


async def test_a_failed_generation_fails_the_run_with_its_error_code(
    api: Simulator, tmp_path: Path
) -> None:
    api.queue_fault("generate", "generation_failed")
    state = await prompt_to_video(
        prompt="a fox", schedule=FAST, output_dir=str(tmp_path), return_state=True
    )
    assert state.is_failed()
    assert "GENERATION_FAILED" in (await exception_text(state))
    credits = api.snapshot()["credits"][DEFAULT_KEY]
    assert credits["charged"] == credits["refunded"] == 4
    assert list(tmp_path.iterdir()) == []


async def test_a_video_not_done_by_max_wait_fails_the_run_with_wait_timeout(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_simulator(generation_seconds=(900, 900))
    use_simulator(sim, monkeypatch)
    schedule = WatchSchedule(initial_delay=120, interval=20, max_wait=200)
    state = await prompt_to_video(prompt="a fox", schedule=schedule, return_state=True)
    assert state.is_failed()
    message = await exception_text(state)
    assert "WAIT_TIMEOUT" in message
    assert sim.snapshot()["tasks"][0]["task_id"] in message
    # At most the 5 slots 120..200 (fewer if a slow check made the watch skip
    # one; the exact rhythm is proven on a fake clock in tests/unit/test_watch.py).
    assert 1 <= sim.snapshot()["requests"][DEFAULT_KEY]["check-status"] <= 5


async def test_transient_errors_while_watching_do_not_fail_the_run(
    api: Simulator, tmp_path: Path
) -> None:
    api.queue_fault(
        "check-status",
        *["gateway_error", "dropped_connection", "internal_error", "rate_limited"] * 2,
    )
    result = await prompt_to_video(prompt="a fox", schedule=FAST, output_dir=str(tmp_path))
    assert Path(str(result.video_path)).is_file()
    assert api.snapshot()["submits"] == 1


async def test_a_submit_whose_answer_was_lost_is_not_sent_again(api: Simulator) -> None:
    api.queue_fault("generate", "dropped_connection_after")
    state = await prompt_to_video(prompt="a fox", schedule=FAST, return_state=True)
    assert state.is_failed()
    assert "SUBMIT_OUTCOME_UNKNOWN" in (await exception_text(state))
    assert api.snapshot()["requests"][DEFAULT_KEY]["generate"] == 1


async def test_resume_finishes_a_video_submitted_elsewhere_without_paying_again(
    api: Simulator, tmp_path: Path
) -> None:
    async with NanoPhotoClient(settings=settings_for(api)) as client:
        task_id = (await client.submit(VideoRequest(prompt="a fox"))).task_id
    result = await resume_video(task_id=task_id, output_dir=str(tmp_path))
    assert result.task_id == task_id
    assert Path(str(result.video_path)).name == f"{task_id}.mp4"
    assert result.video_credits == 4
    ledger = api.snapshot()
    assert ledger["submits"] == 1
    assert ledger["requests"][DEFAULT_KEY]["generate"] == 1


async def test_resume_of_an_unknown_task_fails_at_once(api: Simulator) -> None:
    state = await resume_video(task_id="task_nope", return_state=True)
    assert state.is_failed()
    assert "TASK_NOT_FOUND" in (await exception_text(state))
    assert api.snapshot()["requests"][DEFAULT_KEY]["check-status"] == 1


async def test_the_progress_bar_moves_during_the_first_wait_and_a_failure_never_shows_100(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At 0.03, the first check comes 3.6 s after submit and the bar ticks every
    # second (5 % of the expected 300 s): it must move before that check.
    sim = make_simulator(time_scale=0.03, generation_seconds=(200, 200))
    use_simulator(sim, monkeypatch)
    sim.queue_fault("generate", "generation_failed")
    seen_before_first_check: list[float] = []

    async def watch_the_bar() -> None:
        for _ in range(200):
            tasks = sim.snapshot()["tasks"]
            if tasks and tasks[0]["checks_at"]:
                return
            async with get_client() as client:
                bars = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]))
                )
            seen_before_first_check.extend(
                float(str(b.data))
                for b in bars
                if tasks and tasks[0]["task_id"] in str(b.description)
            )
            await asyncio.sleep(0.1)

    async def run() -> State[Any]:
        return await prompt_to_video(prompt="a fox", output_dir="", return_state=True)

    flow = asyncio.create_task(run())
    await watch_the_bar()
    state = await flow
    assert state.is_failed()
    assert max(seen_before_first_check, default=0.0) > 0.0  # moved with time, not at a check
    async with get_client() as client:
        [bar] = [
            a
            for a in await client.read_artifacts(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )
            if a.type == "progress"
        ]
    assert float(str(bar.data)) < 100.0
    assert "GENERATION_FAILED" in str(bar.description)
