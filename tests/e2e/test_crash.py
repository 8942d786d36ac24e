"""A worker killed with SIGKILL while a video is watched: the retried run resumes it.

Nobody steps in: the run's heartbeats stop, the ``crash-zombie-video-runs``
automation marks it Crashed within the bound ``make deploy`` set (here 60 s
without a heartbeat; 90 s by default), ``retry-crashed-video-runs`` schedules
the same flow run again (AwaitingRetry), another worker picks it up, finds the
submission record of its idempotency key (derived from the flow run's id) and
watches the same task to the end. The simulator's ledger shows one submit.
The workers hold the key in their environment, and the kill leaves it in no
file of their temporary folder or of PREFECT_HOME.
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
from prefect.client.schemas.objects import StateType
from prefect.deployments import arun_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env, files_holding

KEY = "np-crash-test-key"
ZOMBIE_S = 60  # seconds without a heartbeat before the run is marked Crashed
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
        [str(BIN / "python"), "-m", "deployments.setup", "--heartbeat-timeout", str(ZOMBIE_S)],
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
        killed_at = time.monotonic()
        wait_until(lambda: not processes_of_flow_run(flow_run.id), "the kill", 10)
        checks_at_kill = simulator.snapshot()["tasks"][0]["status_checks"]
        left_by_the_kill = files_holding(KEY, worker_tmp, prefect_server.home)

        # Another worker; the automations crash the run and schedule it again.
        prefect_server.start(WORKER, prefect_server.home / "worker-2.log", worker_env)
        # Crashed is brief: the retry automation schedules the run again at once.
        crashed = asyncio.run(_wait_for_named(flow_run.id, "Crashed", within=ZOMBIE_S + 120))
        assert crashed, "the zombie automation never marked the run Crashed"
        crashed_after = time.monotonic() - killed_at
        state = asyncio.run(_wait_for(flow_run.id, StateType.COMPLETED, within=240))
        assert state is not None, (prefect_server.home / "worker-2.log").read_text()[-3000:]
        history = asyncio.run(_state_names(flow_run.id))
        # The run's process ships its last logs after its Completed state: wait for them.
        resumed = asyncio.run(_wait_for_log(flow_run.id, "resuming it, not paying again", 60))
    # Killed, Crashed after the heartbeats stopped, scheduled again by the automation.
    assert history.index("Crashed") < history.index("AwaitingRetry") < len(history) - 1, history
    # A heartbeat every 30 s; the automation allows ZOMBIE_S without one.
    assert crashed_after <= ZOMBIE_S + 30 + 60, crashed_after
    print(f"\ncrash: marked Crashed {crashed_after:.0f} s after the kill (bound {ZOMBIE_S} s)")

    ledger = simulator.snapshot()
    assert ledger["submits"] == 1
    task = ledger["tasks"][0]
    assert task["status"] == "completed"
    assert task["status_checks"] > checks_at_kill  # the new worker watched the same task
    assert (videos / f"{task['task_id']}.mp4").read_bytes()[4:8] == b"ftyp"
    assert resumed, "the retried run never logged that it resumed the video"
    # The key was in the workers' environment: no file they or their runs wrote holds it.
    assert left_by_the_kill == []
    assert files_holding(KEY, worker_tmp, prefect_server.home) == []


async def _wait_for(flow_run_id: UUID, kind: StateType, within: float) -> Any:
    """The run's state once it is of ``kind`` (None if it never was within the time)."""
    deadline = time.monotonic() + within
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type == kind:
                return run.state
            await asyncio.sleep(0.5)
    return None


async def _wait_for_named(flow_run_id: UUID, name: str, within: float) -> bool:
    """Whether the run has been in a state called ``name`` within the time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if name in await _state_names(flow_run_id):
            return True
        await asyncio.sleep(1)
    return False


async def _state_names(flow_run_id: UUID) -> list[str]:
    """The names of the run's states, oldest first."""
    async with get_client() as client:
        states = await client.read_flow_run_states(flow_run_id)
    return [str(state.name) for state in sorted(states, key=lambda s: s.timestamp)]


async def _wait_for_log(flow_run_id: UUID, text: str, within: float) -> bool:
    """Whether a log line of the run holds ``text`` within the time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(text in line for line in await _logs(flow_run_id)):
            return True
        await asyncio.sleep(1)
    return False


async def _logs(flow_run_id: UUID) -> list[str]:
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]
