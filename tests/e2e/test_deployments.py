"""The Prefect way, for real: setup, deployments, a process worker, UI/API triggers.

One test walks the whole path, because each step needs the one before and the
server takes tens of seconds to start:
setup (twice: idempotent) → worker → run_deployment → ``prefect deployment run
--param`` → results, artifacts and events → a 501-character topic refused by
the server → the API key found nowhere.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.deployments import arun_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings

from nanophoto.simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env

SECRET = "np-e2e-7f3a9c1d5b-SECRET"
SCHEDULE = {"initial_delay": 1.2, "interval": 0.2, "max_wait": 12.0, "expected_generation": 3.0}


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run a command to completion; its output, or a failure showing it."""
    done = subprocess.run(
        args, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


async def wait_for_events(task_id: str, names: set[str], within: float = 30) -> set[str]:
    """The nanophoto.video.* events about ``task_id`` seen within ``within`` seconds."""
    deadline = time.monotonic() + within
    seen: set[str] = set()
    async with get_client() as client:
        while time.monotonic() < deadline:
            page = await client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(prefix=["nanophoto.video."]),
                    resource=EventResourceFilter(id=[f"nanophoto.video.{task_id}"]),
                ),
                limit=50,  # the client's default (100) is over the server's maximum
            )
            seen = {event.event for event in page.events}
            if names <= seen:
                break
            await asyncio.sleep(0.5)
    return seen


@pytest.fixture
def simulator() -> Any:
    with SimulatorThread(SimulatorConfig(keys={SECRET: 1000}, time_scale=0.01, seed=3)) as sim:
        yield sim


def test_deployments_run_on_a_real_server_and_worker(
    prefect_server: PrefectServer, simulator: Simulator, tmp_path: Path
) -> None:
    env = base_env(prefect_server.home, prefect_server.api_url)
    videos = tmp_path / "videos"

    # 1. Setup, twice: the second run must change nothing and still succeed.
    setup_env = {**env, "NANOPHOTO_API_KEY": SECRET, "NANOPHOTO_BASE_URL": simulator.base_url}
    setup = [str(BIN / "python"), "-m", "deployments.setup", "--store-key"]
    first = run(setup, setup_env)
    second = run(setup, setup_env)
    assert "created work pool sora2-process" in first
    assert "already exists" in second

    # 2. A process worker with no key in its environment: the block provides it.
    worker_env = {
        **env,
        "SORA2_PROJECT_DIR": str(PROJECT_DIR),
        "NANOPHOTO_RETRY_BASE_DELAY": "0.01",
        "NANOPHOTO_RETRY_RATE_LIMIT_DELAY": "0.05",
    }
    worker_log = prefect_server.home / "worker.log"
    prefect_server.start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "sora2-process", "--type", "process"],
        worker_log,
        worker_env,
    )

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        # 3. Triggered from Python, as the UI and API do.
        flow_run = asyncio.run(
            arun_deployment(
                "topic-to-video/on-demand",
                parameters={
                    "topic": "A red fox in fresh snow",
                    "schedule": SCHEDULE,
                    "output_dir": str(videos),
                },
                timeout=180,
            )
        )
        assert flow_run.state is not None
        assert flow_run.state.is_completed(), flow_run.state.message
        assert flow_run.name == "video: A red fox in fresh snow"

        # 4. Triggered from the command line with --param / --params.
        cli = run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "prompt-to-video/on-demand",
                "--param",
                "prompt=A lighthouse in a storm, slow push-in",
                "--param",
                f"output_dir={videos}",
                "--params",
                json.dumps({"schedule": SCHEDULE, "aspect_ratio": "landscape"}),
                "--watch",
                "--watch-timeout",
                "180",
            ],
            env,
        )
        assert "Completed" in cli

        # 5. What the runs left: videos, artifacts, events.
        ledger = simulator.snapshot()
        assert ledger["submits"] == 2
        task_ids = [task["task_id"] for task in ledger["tasks"]]
        for task_id in task_ids:
            video = videos / f"{task_id}.mp4"
            assert video.read_bytes()[4:8] == b"ftyp"
        artifacts = asyncio.run(_artifacts(flow_run.id))
        # Prefect stores a link artifact as markdown: "[text](url)".
        markdown = [str(a.data) for a in artifacts if a.type == "markdown"]
        assert any("A red fox in fresh snow" in text for text in markdown)  # the prompt
        link = f"[Video {task_ids[0]}]({simulator.media_url}/sora/{task_ids[0]}.mp4)"
        assert link in markdown  # the video
        progress = next(a for a in artifacts if a.type == "progress")
        assert progress.data == 100.0
        seen = asyncio.run(
            wait_for_events(task_ids[0], {"nanophoto.video.submitted", "nanophoto.video.completed"})
        )
        assert seen >= {"nanophoto.video.submitted", "nanophoto.video.completed"}

        # 6. The server refuses a 501-character topic before any run exists.
        before = asyncio.run(_count_flow_runs())
        with pytest.raises(PrefectHTTPStatusError) as refused:
            asyncio.run(
                arun_deployment(
                    "topic-to-video/on-demand", parameters={"topic": "x" * 501}, timeout=0
                )
            )
        assert refused.value.response.status_code == 409
        assert "topic" in refused.value.response.text
        assert asyncio.run(_count_flow_runs()) == before
        assert simulator.snapshot()["total_requests"] == ledger["total_requests"]

        # 7. The key is nowhere: parameters, logs, artifacts, database, process logs.
        stored = asyncio.run(_everything_stored(flow_run.id))
    assert SECRET not in stored
    for path in prefect_server.home.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the key is in {path}"


async def _artifacts(flow_run_id: UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


async def _count_flow_runs() -> int:
    async with get_client() as client:
        return len(await client.read_flow_runs())


async def _everything_stored(flow_run_id: UUID) -> str:
    """Parameters, logs and artifacts of every run, as one string to search."""
    async with get_client() as client:
        runs = await client.read_flow_runs()
        logs = await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
        )
        artifacts = await client.read_artifacts()
        blocks = await client.read_block_documents(include_secrets=False)
    return "\n".join(
        [
            *(json.dumps(r.parameters, default=str) for r in runs),
            *(log.message for log in logs),
            *(str(a.data) + str(a.description) for a in artifacts),
            *(str(b.data) for b in blocks),
        ]
    )
