"""Prefect's production topology, as ``make cluster-up`` starts it: PostgreSQL, Redis,
two API replicas and a services process, on free loopback ports.

``make deploy`` against it, one process worker on each replica (each taking
its share, ``--limit``), every idempotency key locked through Redis
(``SORA2_LOCK_REDIS_URL``), and the key's request limit low enough to bind:
runs created at the same moment through both replicas all complete, each
video submitted once, with 0 HTTP 429 from NanoPhoto and 0 server errors
(5xx) from Prefect. Then ``make cluster-down`` leaves no process behind.

Needs root and apt-get (or PostgreSQL and Redis installed): it skips, saying
why, where neither is there.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.cluster import postgres_bin
from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env, stop
from tests.helpers import free_port

KEY = "np-topology-test-key"
TIME_SCALE = 0.01
RUNS = 16
RATE_LIMIT = 30  # requests per (compressed) hour: 16 videos need about 40, so it binds
WORKER = [str(BIN / "prefect"), "worker", "start", "--pool", "sora2-process", "--type", "process"]
SCHEDULE = {"initial_delay": 120, "interval": 20, "max_wait": 3000, "expected_generation": 300}


def _can_bring_up() -> str | None:
    """Why the cluster cannot come up here, or None."""
    if postgres_bin() is not None and shutil.which("redis-server"):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "PostgreSQL and Redis are not installed, and this is not root with apt-get"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``make cluster-up`` on free ports; ``make cluster-down`` afterwards, whatever happens."""
    reason = _can_bring_up()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(4)]
    home = tmp_path_factory.mktemp("prefect-home-cluster")
    env = {**base_env(home, ""), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL")
    command = [str(BIN / "python"), "-m", "deployments.cluster"]
    where = ["--dir", str(folder)]
    ports_args = ["--postgres-port", str(ports[0]), "--redis-port", str(ports[1])]
    ports_args += ["--api-ports", f"{ports[2]},{ports[3]}"]
    up = subprocess.run(
        [*command, "up", *where, *ports_args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.MULTILINE))
        yield {
            "folder": folder,
            "home": home,
            "apis": [f"http://127.0.0.1:{port}/api" for port in ports[2:]],
            "lock_url": exports["SORA2_LOCK_REDIS_URL"],
        }
    finally:
        down = subprocess.run(
            [*command, "down", *where], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert not folder.exists()
        for port in ports:  # nothing listens on the cluster's ports any more
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    config = SimulatorConfig(
        keys={KEY: 10_000},
        time_scale=TIME_SCALE,
        rate_limit=RATE_LIMIT,
        generation_seconds=(130, 200),
        seed=11,
        edge=True,
    )
    with SimulatorThread(config) as sim:
        yield sim


@pytest.mark.timeout(900)
def test_runs_spread_over_two_workers_on_two_replicas_pay_once_with_no_429_nor_5xx(
    cluster: dict[str, Any], simulator: Simulator, tmp_path: Path
) -> None:
    home: Path = cluster["home"]
    first, second = cluster["apis"]
    storage = tmp_path / "result-storage"  # shared by both workers: one machine here
    videos = tmp_path / "videos"
    env = {
        **base_env(home, first),
        "PREFECT_LOCAL_STORAGE_PATH": str(storage),
        "SORA2_LOCK_REDIS_URL": cluster["lock_url"],
        "SORA2_OUTPUT_ROOT": str(tmp_path),
    }
    setup_command = [str(BIN / "python"), "-m", "deployments.setup", "--store-key"]
    setup = subprocess.run(
        [*setup_command, "--rate-limit", str(RATE_LIMIT)],
        cwd=PROJECT_DIR,
        env={**env, "NANOPHOTO_API_KEY": KEY, "NANOPHOTO_BASE_URL": simulator.base_url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    # The rate window is NanoPhoto's hour on the simulator's clock.
    worker_env = {**env, "NANOPHOTO_TIME_SCALE": str(TIME_SCALE)}
    server = PrefectServer(home=home, api_url=first, log=home / "unused.log")
    try:
        for index, api in enumerate((first, second), start=1):
            server.start(
                [*WORKER, "--limit", str(RUNS // 2)],
                home / f"worker-{index}.log",
                {**worker_env, "PREFECT_API_URL": api},
            )
        runs = asyncio.run(create_runs(first, second, videos))
        finished = asyncio.run(wait_for_all(first, runs, within=600))
    finally:
        for process in server.processes:
            stop(process)
    states = {run.state.type.value if run.state else "?" for run in finished}
    assert states == {"COMPLETED"}, worker_logs(home)
    ledger = simulator.snapshot()
    assert ledger["submits"] == RUNS  # each video paid once
    assert len({task["prompt_head"] for task in ledger["tasks"]}) == RUNS
    assert ledger["rate_limited"] == {}, ledger["rate_limited"]  # 0 x 429 across both hosts
    assert ledger["total_requests"] > RATE_LIMIT  # the limit did bind
    # Both workers took runs.
    took = [worker_log(home, index).count("submitting flow run") for index in (1, 2)]
    assert all(took), took
    print(
        f"\ntopology: {RUNS} runs, taken {took[0]}/{took[1]} by the two workers; "
        f"{ledger['total_requests']} requests under a limit of {RATE_LIMIT} per window; "
        f"{ledger['submits']} submits; 429s: {sum(ledger['rate_limited'].values())}"
    )
    # No API answered a server error to a worker or to the test.
    logs = "".join(
        path.read_text(errors="replace") for path in cluster["folder"].glob("api-*.log")
    ) + worker_logs(home)
    assert not re.search(r"\b50[0-9] (Internal Server Error|Service Unavailable)", logs)


async def create_runs(first: str, second: str, videos: Path) -> list[FlowRun]:
    """RUNS prompt-to-video runs at once, half through each replica."""

    async def create(api: str, index: int) -> FlowRun:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            async with get_client() as client:
                deployment = await client.read_deployment_by_name("prompt-to-video/on-demand")
                return await client.create_flow_run_from_deployment(
                    deployment.id,
                    parameters={
                        "prompt": f"topology {index}: a heron over a misty lake",
                        "schedule": SCHEDULE,
                        "output_dir": str(videos),
                    },
                )

    return list(await asyncio.gather(*(create((first, second)[i % 2], i) for i in range(RUNS))))


async def wait_for_all(api: str, runs: list[FlowRun], within: float) -> list[FlowRun]:
    """Each run once it is final (or as it is when the time is up)."""
    deadline = time.monotonic() + within
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            while True:
                current = [await client.read_flow_run(run.id) for run in runs]
                if all(run.state and run.state.is_final() for run in current):
                    return current
                if time.monotonic() > deadline:
                    return current
                await asyncio.sleep(2)


def worker_log(home: Path, index: int) -> str:
    return (home / f"worker-{index}.log").read_text(errors="replace")


def worker_logs(home: Path) -> str:
    return "".join(worker_log(home, index)[-3000:] for index in (1, 2))
