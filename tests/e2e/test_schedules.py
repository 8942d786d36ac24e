"""A schedule that exists is not a schedule that runs: Prefect's scheduler must create the run.

On a real ``prefect server start`` (as ``make server`` starts it), the
project's ``prefect.yaml`` is deployed with one change: the
``morning-nature`` deployment's schedule fires every few seconds instead of
at 09:00. It is turned on the way Prefect's V2 UI does it (a PATCH of
``{"active": true}`` alone, after which the server stores the schedule's own
parameters as ``{}``); the scheduler (not this test) creates a run, a process
worker runs it against the simulator, and it completes with the deployment's
topic. Then setup runs again, as ``make deploy`` does after any change: the
schedule stays on, and the scheduler's next run completes too. With
SQLAlchemy 2.1 the scheduler never creates a run and this test fails.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env

KEY = "np-schedule-test-key"
TIME_SCALE = 0.01
DEPLOYMENT = "topic-to-video/morning-nature"
SLUG = "every-morning"
INTERVAL_S = 20
WORKER = [str(BIN / "prefect"), "worker", "start", "--pool", "sora2-process", "--type", "process"]


@pytest.fixture
def simulator() -> Any:
    with SimulatorThread(SimulatorConfig(keys={KEY: 1000}, time_scale=TIME_SCALE)) as sim:
        yield sim


def prefect_file_firing_soon(path: Path, output_dir: Path) -> dict[str, Any]:
    """The project's prefect.yaml, the morning schedule every INTERVAL_S seconds; the
    deployment's parameters."""
    document = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text(encoding="utf-8"))
    morning = next(d for d in document["deployments"] if d["name"] == "morning-nature")
    schedule = next(s for s in morning["schedules"] if s["slug"] == SLUG)
    assert schedule["active"] is False  # shipped paused: every run spends credits
    assert "parameters" not in schedule  # a UI toggle would erase them there
    schedule.pop("cron")
    schedule.pop("timezone", None)
    schedule["interval"] = INTERVAL_S
    morning["parameters"]["output_dir"] = str(output_dir)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return dict(morning["parameters"])


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run(
        args, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.timeout(600)
def test_the_scheduler_runs_a_schedule_turned_on_and_a_redeploy_keeps_it(
    prefect_server: PrefectServer, simulator: Simulator, tmp_path: Path
) -> None:
    env = base_env(prefect_server.home, prefect_server.api_url)
    # The UI asks the server where its API is: this port, not the default 4200.
    ui = httpx.get(prefect_server.api_url.removesuffix("/api") + "/ui-settings", timeout=10)
    assert ui.json()["api_url"] == prefect_server.api_url

    prefect_file = tmp_path / "prefect.yaml"
    parameters = prefect_file_firing_soon(prefect_file, tmp_path / "videos")
    setup = [str(BIN / "python"), "-m", "deployments.setup", "--store-key"]
    setup += ["--prefect-file", str(prefect_file)]
    setup_env = {**env, "NANOPHOTO_API_KEY": KEY, "NANOPHOTO_BASE_URL": simulator.base_url}
    # The worker gets its key from the block; the form's schedule is in NanoPhoto's
    # seconds, which NANOPHOTO_TIME_SCALE maps onto the simulator's compressed clock.
    worker_env = {
        **env,
        "NANOPHOTO_TIME_SCALE": str(TIME_SCALE),
        "NANOPHOTO_RETRY_BASE_DELAY": "0.01",
    }

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        run(setup, setup_env)
        asyncio.run(turn_on_as_the_v2_ui_does(DEPLOYMENT, SLUG))
        prefect_server.start(WORKER, prefect_server.home / "worker.log", worker_env)

        first = wait_for_scheduled_run(prefect_server, after=None, within=180)
        assert first.parameters["topic"] == parameters["topic"]
        assert first.name == f"video: {parameters['topic']}"
        # The run's result is kept: readable from the API, as the UI shows it.
        assert first.state is not None
        result = asyncio.run(first.state.aresult())
        assert Path(result.video_path).is_file()
        assert result.prompt.startswith(parameters["topic"])

        # make deploy again: the schedule stays on and keeps its parameters.
        redeployed_at = datetime.now(UTC)
        assert f"kept schedule morning-nature/{SLUG} on" in run(setup, setup_env)
        schedule = asyncio.run(read_schedule(DEPLOYMENT, SLUG))
        assert schedule.active
        second = wait_for_scheduled_run(prefect_server, after=redeployed_at, within=180)
        assert second.parameters["topic"] == parameters["topic"]

    ledger = simulator.snapshot()
    assert ledger["submits"] >= 2
    assert all(t["prompt_head"].startswith(parameters["topic"][:40]) for t in ledger["tasks"])
    saved = {path.stem for path in (tmp_path / "videos").glob("*.mp4")}
    assert len(saved) >= 2
    assert saved <= {t["task_id"] for t in ledger["tasks"]}


async def turn_on_as_the_v2_ui_does(deployment: str, slug: str) -> None:
    """Prefect's V2 UI toggle: ``{"active": true}`` and nothing else."""
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        schedule = next(s for s in found.schedules if s.slug == slug)
        await client.update_deployment_schedule(found.id, schedule.id, active=True)


async def read_schedule(deployment: str, slug: str) -> Any:
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        return next(s for s in found.schedules if s.slug == slug)


async def scheduled_runs(deployment: str) -> list[FlowRun]:
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[found.id]))
        )


def wait_for_scheduled_run(
    server: PrefectServer, *, after: datetime | None, within: float
) -> FlowRun:
    """A run the scheduler created (expected after ``after``) that completed."""
    deadline = time.monotonic() + within
    seen: list[str] = []
    while time.monotonic() < deadline:
        runs = asyncio.run(scheduled_runs(DEPLOYMENT))
        seen = [f"{r.name} {r.state_name} auto={r.auto_scheduled}" for r in runs]
        for flow_run in runs:
            expected = flow_run.expected_start_time
            if not flow_run.auto_scheduled or (after and expected and expected < after):
                continue
            assert flow_run.state is not None
            assert not flow_run.state.is_final() or flow_run.state.is_completed(), (
                f"{flow_run.name}: {flow_run.state.type} {flow_run.state.message}\n"
                + (server.home / "worker.log").read_text(errors="replace")[-3000:]
            )
            if flow_run.state.is_completed():
                return flow_run
        time.sleep(1.0)
    scheduler_errors = [
        line
        for line in server.log.read_text(errors="replace").splitlines()
        if "Error" in line or "Traceback" in line
    ]
    raise AssertionError(
        f"no scheduled run of {DEPLOYMENT} completed within {within:g} s; runs: {seen}; "
        f"server errors: {scheduler_errors[-10:]}"
    )
