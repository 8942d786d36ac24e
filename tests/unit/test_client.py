"""The client against the simulator, over real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nanophoto.client import NanoPhotoClient
from nanophoto.contract import Locale
from nanophoto.errors import (
    AuthenticationError,
    InsufficientCreditsError,
    SubmitOutcomeUnknownError,
    TaskNotFoundError,
)
from nanophoto.models import PromptRequest, VideoOptions
from nanophoto_simulator import DEFAULT_KEY, Simulator
from nanophoto_simulator.config import Faults
from tests.helpers import MakeSimulator, settings_for


async def test_prompt_submit_check_download(make_simulator: MakeSimulator, tmp_path: Path) -> None:
    sim = make_simulator(generation_seconds=(20, 20))
    async with NanoPhotoClient(settings=settings_for(sim)) as client:
        pieces: list[str] = []
        prompt = await client.generate_prompt(
            PromptRequest(topic="北極のキツネ", locale=Locale.JA), on_text=pieces.append
        )
        assert len(pieces) > 1
        assert "ショット" in prompt.text
        submitted = await client.submit(VideoOptions().with_prompt(prompt.text))
        assert submitted.is_running
        status = submitted
        for _ in range(100):
            status = await client.check_status(submitted.task_id)
            if not status.is_running:
                break
            await asyncio.sleep(0.02)
        assert status.is_completed
        assert status.video_url is not None
        video = await client.download(status.video_url, tmp_path / "v.mp4")
    assert Path(video.path).read_bytes()[4:8] == b"ftyp"
    assert video.size == Path(video.path).stat().st_size
    ledger = sim.snapshot()
    assert ledger["submits"] == 1
    assert ledger["credits"][DEFAULT_KEY]["charged"] == 6
    assert ledger["media"] == {"downloads": 1, "with_authorization": 0}


async def test_status_checks_ride_out_gateway_pages_and_dropped_connections(
    simulator: Simulator,
) -> None:
    async with NanoPhotoClient(settings=settings_for(simulator)) as client:
        submitted = await client.submit(VideoOptions().with_prompt("a fox"))
        simulator.queue_fault(
            "check-status", "gateway_error", "dropped_connection", "internal_error"
        )
        status = await client.check_status(submitted.task_id)
    assert status.is_running
    assert simulator.snapshot()["requests"][DEFAULT_KEY]["check-status"] == 4


async def test_a_lost_submit_answer_is_not_resent(simulator: Simulator) -> None:
    simulator.queue_fault("generate", "gateway_error_after")
    async with NanoPhotoClient(settings=settings_for(simulator)) as client:
        with pytest.raises(SubmitOutcomeUnknownError):
            await client.submit(VideoOptions().with_prompt("a fox"))
    ledger = simulator.snapshot()
    assert ledger["submits"] == 1
    assert ledger["requests"][DEFAULT_KEY]["generate"] == 1


async def test_a_submit_rate_limited_is_retried_and_charged_once(simulator: Simulator) -> None:
    simulator.queue_fault("generate", "rate_limited", "dropped_connection")
    async with NanoPhotoClient(settings=settings_for(simulator)) as client:
        with pytest.raises(SubmitOutcomeUnknownError):
            await client.submit(VideoOptions().with_prompt("a fox"))
    # 429 was retried; the drop (which may have reached the server) was not.
    ledger = simulator.snapshot()
    assert ledger["requests"][DEFAULT_KEY]["generate"] == 2
    assert ledger["credits"][DEFAULT_KEY]["charged"] == 0  # dropped at the edge


async def test_a_cut_prompt_stream_is_restarted_and_refunded(simulator: Simulator) -> None:
    simulator.queue_fault("generate-prompt", "truncated_stream")
    async with NanoPhotoClient(settings=settings_for(simulator)) as client:
        prompt = await client.generate_prompt(PromptRequest(topic="fox"))
    assert prompt.text.startswith("fox")
    assert prompt.streams_charged == 1
    credits = simulator.snapshot()["credits"][DEFAULT_KEY]
    assert (credits["charged"], credits["refunded"]) == (4, 2)


async def test_a_stalled_prompt_stream_times_out_and_is_retried(
    make_simulator: MakeSimulator,
) -> None:
    sim = make_simulator(faults=Faults(stall_seconds=100))  # 1 s real
    sim.queue_fault("generate-prompt", "slow_stream")
    async with NanoPhotoClient(settings=settings_for(sim, read_timeout=0.3)) as client:
        prompt = await client.generate_prompt(PromptRequest(topic="fox"))
    assert prompt.text.startswith("fox")
    ledger = sim.snapshot()
    assert ledger["requests"][DEFAULT_KEY]["generate-prompt"] == 2
    # We abandoned the first stream: the server may charge it, and we say so.
    assert prompt.streams_charged == 2
    assert ledger["credits"][DEFAULT_KEY]["charged"] == 4
    assert ledger["credits"][DEFAULT_KEY]["refunded"] == 0


async def test_errors_no_retry_can_fix_fail_at_once(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(keys={DEFAULT_KEY: 3})
    async with NanoPhotoClient(settings=settings_for(sim)) as client:
        with pytest.raises(InsufficientCreditsError):
            await client.submit(VideoOptions().with_prompt("a fox"))
        with pytest.raises(TaskNotFoundError):
            await client.check_status("task_unknown")
    async with NanoPhotoClient(settings=settings_for(sim, api_key="wrong")) as client:
        with pytest.raises(AuthenticationError):
            await client.check_status("task_unknown")
    assert sim.snapshot()["total_requests"] == 3
