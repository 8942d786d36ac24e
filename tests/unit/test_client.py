"""The client against the simulator, over real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
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


async def test_the_environments_proxy_is_used_as_httpx_would_and_no_proxy_bypasses_it(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proxies are read once per setting, not by httpx for each client: ``HTTP_PROXY``
    still carries the calls, a changed ``NO_PROXY`` is seen by the next client."""
    seen: list[str] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ")
        seen.append(f"{method} {target}")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        body = await reader.readexactly(
            int(headers.get("Content-Length", headers.get("content-length", "0")))
        )
        drop = {"host", "content-length", "proxy-connection", "connection"}
        async with httpx.AsyncClient(trust_env=False) as upstream:
            answer = await upstream.request(
                method,
                target,
                content=body,
                headers={k: v for k, v in headers.items() if k.lower() not in drop},
            )
        writer.write(
            f"HTTP/1.1 {answer.status_code} OK\r\nContent-Type: "
            f"{answer.headers.get('content-type', 'application/json')}\r\n"
            f"Content-Length: {len(answer.content)}\r\nConnection: close\r\n\r\n".encode()
            + answer.content
        )
        await writer.drain()
        writer.close()

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with NanoPhotoClient(settings=settings_for(simulator)) as client:
            submitted = await client.submit(VideoOptions().with_prompt("a fox"))
        assert seen == [f"POST {simulator.base_url}/api/sora-2/generate"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with NanoPhotoClient(settings=settings_for(simulator)) as client:
            await client.check_status(submitted.task_id)
        assert len(seen) == 1  # straight to the API
    finally:
        proxy.close()
        await proxy.wait_closed()
