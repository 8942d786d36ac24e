"""A worker killed with SIGKILL while a video is watched: the retried run resumes it.

The flow run is retried the way the UI's Retry button does it (AwaitingRetry,
same flow run id), a new worker picks it up, finds the submission record of
its idempotency key (derived from that id) and watches the same task to the
end. The simulator's ledger shows one submit. The workers hold the key in
their environment, and the kill leaves it in no file of their temporary
folder or of PREFECT_HOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.deployments import arun_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import AwaitingRetry

from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env, files_holding

KEY = "np-crash-test-key"
# NanoPhoto's seconds; the workers' NANOPHOTO_TIME_SCALE runs them 100 times faster.
SCHEDULE = {"initial_delay": 120, "interval": 20, "max_wait": 3000, "expected_generation": 600}
WORKER = [str(BIN / "prefect"), "worker", "start", "--pool", "sora2-process", "--type", "process"]


@pytest.fixture
def simulator() -> Any:
    config = SimulatorConfig(keys={KEY: 1000}, time_scale=0.01, generation_seconds=(900, 900))
    with SimulatorThread(config) as sim:
        yield sim


def processes_of_flow_run(flow_run_id: UUID) -> list[int]:
    """Pids whose environment names this flow run (the flow-run process)."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def wait_until(predicate: Any, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.timeout(600)
def test_a_killed_worker_leaves_a_video_that_the_retried_run_resumes(
    prefect_server: PrefectServer, simulator: Simulator, tmp_path: Path
) -> None:
    env = base_env(prefect_server.home, prefect_server.api_url)
    worker_tmp = tmp_path / "worker-tmp"  # the workers' and their flow runs' temporary folder
    worker_tmp.mkdir()
    worker_env = {
        **env,
        "TMPDIR": str(worker_tmp),
        "NANOPHOTO_API_KEY": KEY,
        "NANOPHOTO_BASE_URL": simulator.base_url,
        "NANOPHOTO_RETRY_BASE_DELAY": "0.01",
        "NANOPHOTO_TIME_SCALE": "0.01",
    }
    done = subprocess.run(
        [str(BIN / "python"), "-m", "deployments.setup"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    first = prefect_server.start(WORKER, prefect_server.home / "worker-1.log", worker_env)
    videos = tmp_path / "videos"

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        flow_run = asyncio.run(
            arun_deployment(
                "prompt-to-video/on-demand",
                parameters={"prompt": "A fox", "schedule": SCHEDULE, "output_dir": str(videos)},
                timeout=0,
            )
        )
        # Kill everything once the video is submitted and being watched.
        wait_until(
            lambda: any(t["status_checks"] for t in simulator.snapshot()["tasks"]),
            "the first status check",
            120,
        )
        victims = processes_of_flow_run(flow_run.id)
        assert victims, "no flow-run process found to kill"
        os.killpg(first.pid, signal.SIGKILL)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.wait(timeout=10)
        wait_until(lambda: not processes_of_flow_run(flow_run.id), "the kill", 10)
        checks_at_kill = simulator.snapshot()["tasks"][0]["status_checks"]
        left_by_the_kill = files_holding(KEY, worker_tmp, prefect_server.home)

        # Retry the run, as the UI's Retry button does, and give it a new worker.
        asyncio.run(_retry(flow_run.id))
        prefect_server.start(WORKER, prefect_server.home / "worker-2.log", worker_env)
        state = asyncio.run(_wait_for_final(flow_run.id, within=180))
        assert state is not None
        assert state.is_completed(), (prefect_server.home / "worker-2.log").read_text()[-3000:]
        logs = asyncio.run(_logs(flow_run.id))

    ledger = simulator.snapshot()
    assert ledger["submits"] == 1
    task = ledger["tasks"][0]
    assert task["status"] == "completed"
    assert task["status_checks"] > checks_at_kill  # the new worker watched the same task
    assert (videos / f"{task['task_id']}.mp4").read_bytes()[4:8] == b"ftyp"
    assert any("resuming it, not paying again" in line for line in logs)
    # The key was in the workers' environment: no file they or their runs wrote holds it.
    assert left_by_the_kill == []
    assert files_holding(KEY, worker_tmp, prefect_server.home) == []


async def _retry(flow_run_id: UUID) -> None:
    async with get_client() as client:
        await client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)


async def _wait_for_final(flow_run_id: UUID, within: float) -> Any:
    deadline = time.monotonic() + within
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run.state
            await asyncio.sleep(0.5)
    return None


async def _logs(flow_run_id: UUID) -> list[str]:
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]
