"""The Prefect way, for real: setup, deployments, process workers, UI/API triggers.

One test walks the whole path, because each step needs the one before and the
server takes tens of seconds to start: setup twice (idempotent, keeping a
schedule someone turned on) → a worker whose key comes from the block →
arun_deployment → a worker whose key comes from its environment →
``prefect deployment run --param`` → results, artifacts and events for both →
a 501-character topic, an undeclared api_key and a 1e-6 s interval refused
by the server, an output folder outside the worker's refused at the run's
first line, all with 0 requests → the key found nowhere, after the server has
stopped and flushed everything.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings

from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env, files_holding, stop

SECRET = "np-e2e-7f3a9c1d5b-SECRET"
# NanoPhoto's seconds, as a person fills the form; the workers' NANOPHOTO_TIME_SCALE
# (the simulator's) runs them 100 times faster.
SCHEDULE = {"initial_delay": 120, "interval": 20, "max_wait": 1200, "expected_generation": 300}
VIDEO_EVENTS = {"nanophoto.video.submitted", "nanophoto.video.completed"}
WORKER = [str(BIN / "prefect"), "worker", "start", "--pool", "sora2-process", "--type", "process"]


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run a command to completion; its output, or a failure showing it."""
    done = subprocess.run(
        args, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture
def simulator() -> Any:
    # The edge on: the workers' requests must pass as NanoPhoto's own tools' do.
    config = SimulatorConfig(keys={SECRET: 1000}, time_scale=0.01, seed=3, edge=True)
    with SimulatorThread(config) as sim:
        yield sim


@pytest.mark.timeout(600)
def test_deployments_run_on_a_real_server_and_worker(
    prefect_server: PrefectServer, simulator: Simulator, tmp_path: Path
) -> None:
    env = base_env(prefect_server.home, prefect_server.api_url)
    videos = tmp_path / "videos"
    setup_env = {**env, "NANOPHOTO_API_KEY": SECRET, "NANOPHOTO_BASE_URL": simulator.base_url}
    setup = [str(BIN / "python"), "-m", "deployments.setup", "--store-key"]
    worker_tmp = tmp_path / "worker-tmp"  # the workers' and their flow runs' temporary folder
    worker_tmp.mkdir()
    worker_env = {
        **env,
        "TMPDIR": str(worker_tmp),
        "NANOPHOTO_RETRY_BASE_DELAY": "0.01",
        "NANOPHOTO_TIME_SCALE": "0.01",
    }

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        # 1. Setup twice: the second run adds nothing and keeps a schedule turned on.
        assert "created work pool sora2-process" in run(setup, setup_env)
        first = asyncio.run(server_state())
        # One request budget for every run: 100 per hour, a window of leased slots.
        assert first["rate_limits"] == [("nanophoto-api", 100, 0.0)]
        assert first["active"]["weekly-batch/monday-shorts"] is False
        asyncio.run(turn_on_schedule("topic-to-video/weekday-city", "weekday-evenings"))
        # A person edits a scheduled video's topic in the UI, as the README says to.
        edited = asyncio.run(
            edit_parameters(
                "topic-to-video/morning-nature",
                topic="Neon rain on a night market, edited in the UI",
            )
        )
        redeployed = run(setup, setup_env)
        assert "kept schedule" in redeployed
        assert "kept the parameters of morning-nature" in redeployed
        assert asyncio.run(parameters_of("topic-to-video/morning-nature")) == edited
        second = asyncio.run(server_state())
        assert second["active"] == {**first["active"], "weekday-city/weekday-evenings": True}
        assert {k: v for k, v in second.items() if k != "active"} == {
            k: v for k, v in first.items() if k != "active"
        }

        # 2. A worker with no key in its environment: the block provides it.
        block_worker = prefect_server.start(
            WORKER, prefect_server.home / "worker-block.log", worker_env
        )
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
        assert flow_run.state.is_completed(), worker_log_tail(prefect_server, "worker-block")
        assert flow_run.name == "video: A red fox in fresh snow"
        stop(block_worker)  # SIGTERM, then SIGKILL if a loaded machine makes it slow

        # 3. A worker with the key in its environment, and a run from the CLI.
        prefect_server.start(
            WORKER,
            prefect_server.home / "worker-env.log",
            {**worker_env, "NANOPHOTO_API_KEY": SECRET, "NANOPHOTO_BASE_URL": simulator.base_url},
        )
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
        cli_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", cli).group(1))  # type: ignore[union-attr]
        cli_run = asyncio.run(read_flow_run(cli_run_id))
        assert cli_run.state is not None
        assert cli_run.state.is_completed(), worker_log_tail(prefect_server, "worker-env")
        assert cli_run.name == "prompt video: A lighthouse in a storm, slow push-in"

        # 4. What both runs left: one submit each, videos, artifacts, events.
        ledger = simulator.snapshot()
        assert ledger["submits"] == 2
        fox, lighthouse = ledger["tasks"]
        assert (fox["aspect_ratio"], lighthouse["aspect_ratio"]) == ("portrait", "landscape")
        for run_id, task in ((flow_run.id, fox), (cli_run_id, lighthouse)):
            task_id = task["task_id"]
            assert (videos / f"{task_id}.mp4").read_bytes()[4:8] == b"ftyp"
            artifacts = asyncio.run(read_artifacts(run_id))
            markdown = [str(a.data) for a in artifacts if a.type == "markdown"]
            # Prefect stores a link artifact as markdown: "[text](url)".
            assert f"[Video {task_id}]({simulator.media_url}/sora/{task_id}.mp4)" in markdown
            assert any("# Video prompt" in text for text in markdown)
            assert [a.data for a in artifacts if a.type == "progress"] == [100.0]
            assert asyncio.run(wait_for_events(task_id, VIDEO_EVENTS)) >= VIDEO_EVENTS
        assert any(
            "A red fox in fresh snow" in str(a.data)
            for a in asyncio.run(read_artifacts(flow_run.id))
        )

        # 5. The server refuses a 501-character topic before any run exists.
        before = asyncio.run(count_flow_runs())
        with pytest.raises(PrefectHTTPStatusError) as refused:
            asyncio.run(
                arun_deployment(
                    "topic-to-video/on-demand", parameters={"topic": "x" * 501}, timeout=0
                )
            )
        assert refused.value.response.status_code == 409
        assert "topic" in refused.value.response.text
        assert asyncio.run(count_flow_runs()) == before
        assert simulator.snapshot()["total_requests"] == ledger["total_requests"]

        # 6. Harmful inputs, as a new user sends them through the API: refused, 0 requests.
        for parameters, named in (
            ({"api_key": SECRET}, "api_key"),  # undeclared: the sealed schema refuses it
            ({"schedule": {**SCHEDULE, "interval": 1e-6}}, "interval"),  # 41 checks a video
        ):
            with pytest.raises(PrefectHTTPStatusError) as refused:
                asyncio.run(
                    arun_deployment(
                        "prompt-to-video/on-demand",
                        parameters={"prompt": "A fox", **parameters},
                        timeout=0,
                    )
                )
            assert refused.value.response.status_code == 409, named
            assert named in refused.value.response.text
        assert asyncio.run(count_flow_runs()) == before
        # The output folder is the worker's: the run exists, and fails at its first line.
        for outside in ("../../etc", "/etc", "file:///var/tmp"):
            escaped = asyncio.run(
                arun_deployment(
                    "prompt-to-video/on-demand",
                    parameters={"prompt": "A fox", "output_dir": outside},
                    timeout=120,
                )
            )
            assert escaped.state is not None
            assert escaped.state.is_failed(), outside
            message = escaped.state.message or ""
            assert "output_dir" in message, message
            assert "outside the output folder" in message, message
        assert simulator.snapshot()["total_requests"] == ledger["total_requests"]
        assert not list(Path("/etc").glob("task_*.mp4"))

        # 7. The key is in nothing the server hands back...
        stored = asyncio.run(everything_stored())
    assert SECRET not in stored
    # ...nor, once everything has stopped and flushed, in any file it wrote.
    prefect_server.stop_all()
    files = [path for path in prefect_server.home.rglob("*") if path.is_file()]
    assert any(path.name.startswith("prefect.db") for path in files)
    # Result storage, where the submission records live, is part of the search.
    assert any("sora2-submissions" in path.parts for path in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), f"the key is in {path}"
    # ...nor in the temporary folder of the worker that held it in its environment.
    assert files_holding(SECRET, worker_tmp) == []


def worker_log_tail(server: PrefectServer, name: str) -> str:
    return (server.home / f"{name}.log").read_text(errors="replace")[-3000:]


async def server_state() -> dict[str, Any]:
    """What setup creates, counted, plus which named schedules are on."""
    async with get_client() as client:
        deployments = await client.read_deployments()
        return {
            "pools": sorted(p.name for p in await client.read_work_pools()),
            "deployments": sorted(d.name + "@" + str(d.flow_id) for d in deployments),
            "automations": sorted(a.name for a in await client.read_automations()),
            "blocks": sorted(str(b.name) for b in await client.read_block_documents()),
            "variables": sorted(v.name for v in await client.read_variables()),
            "active": {f"{d.name}/{s.slug}": s.active for d in deployments for s in d.schedules},
            "rate_limits": sorted(
                (g.name, g.limit, g.slot_decay_per_second)
                for g in await client.read_global_concurrency_limits()
                if not g.name.startswith("deployment:")  # per-deployment limits
            ),
        }


async def turn_on_schedule(deployment: str, slug: str) -> None:
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        schedule = next(s for s in found.schedules if s.slug == slug)
        await client.update_deployment_schedule(found.id, schedule.id, active=True)


async def edit_parameters(deployment: str, **changed: Any) -> dict[str, Any]:
    """Change some of a deployment's parameters, as the UI's edit form does."""
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        parameters = {**found.parameters, **changed}
        await client.update_deployment(found.id, DeploymentUpdate(parameters=parameters))
        return parameters


async def parameters_of(deployment: str) -> dict[str, Any]:
    async with get_client() as client:
        return dict((await client.read_deployment_by_name(deployment)).parameters)


async def read_flow_run(flow_run_id: UUID) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def read_artifacts(flow_run_id: UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


async def count_flow_runs() -> int:
    async with get_client() as client:
        return len(await client.read_flow_runs())


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


async def everything_stored() -> str:
    """Parameters, logs, artifacts, blocks and events, as one string to search."""
    async with get_client() as client:
        runs = await client.read_flow_runs()
        logs = await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
        )
        artifacts = await client.read_artifacts()
        blocks = await client.read_block_documents(include_secrets=False)
        events = await client.read_events(limit=50)
    return "\n".join(
        [
            *(json.dumps(r.parameters, default=str) for r in runs),
            *(log.message for log in logs),
            *(str(a.data) + str(a.description) for a in artifacts),
            *(str(b.data) for b in blocks),
            *(e.model_dump_json() for e in events.events),
        ]
    )
