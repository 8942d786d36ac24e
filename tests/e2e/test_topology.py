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
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.cluster import postgres_bin
from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env, stop
from tests.helpers import free_port

KEY = "np-topology-test-key"
TIME_SCALE = 0.01
RUNS = 16
BATCH, PARTS = 12, 3
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


@dataclass
class Pool:
    """Two process workers, one on each API replica, and where their logs are."""

    home: Path
    apis: list[str]
    server: PrefectServer

    def log(self, index: int) -> str:
        return (self.home / f"worker-{index}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "".join(self.log(index)[-3000:] for index in (1, 2))

    def stop(self) -> None:
        for process in self.server.processes:
            stop(process)


def deploy_and_start_workers(
    cluster: dict[str, Any], simulator: Simulator, tmp_path: Path, limit: int
) -> Pool:
    """``make deploy`` against the cluster, then a worker on each replica (``--limit``)."""
    home: Path = cluster["home"]
    first, second = cluster["apis"]
    env = {
        **base_env(home, first),
        # Shared by both workers (one machine here): the submission records and results.
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "result-storage"),
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
    pool = Pool(home, [first, second], PrefectServer(home, first, home / "unused.log"))
    for index, api in enumerate(pool.apis, start=1):
        pool.server.start(
            [*WORKER, "--limit", str(limit), "--name", f"worker-{index}"],
            home / f"worker-{index}.log",
            {**worker_env, "PREFECT_API_URL": api},
        )
    return pool


def assert_no_server_errors(cluster: dict[str, Any], pool: Pool) -> None:
    """No API answered a server error to a worker or to the test."""
    logs = (
        "".join(path.read_text(errors="replace") for path in cluster["folder"].glob("api-*.log"))
        + pool.logs()
    )
    assert not re.search(r"\b50[0-9] (Internal Server Error|Service Unavailable)", logs)


@pytest.mark.timeout(900)
def test_runs_spread_over_two_workers_on_two_replicas_pay_once_with_no_429_nor_5xx(
    cluster: dict[str, Any], simulator: Simulator, tmp_path: Path
) -> None:
    pool = deploy_and_start_workers(cluster, simulator, tmp_path, limit=RUNS // 2)
    first, second = pool.apis
    try:
        runs = asyncio.run(create_runs(first, second, tmp_path / "videos"))
        finished = asyncio.run(wait_for_all(first, runs, within=600))
    finally:
        pool.stop()
    states = {run.state.type.value if run.state else "?" for run in finished}
    assert states == {"COMPLETED"}, pool.logs()
    ledger = simulator.snapshot()
    assert ledger["submits"] == RUNS  # each video paid once
    assert len({task["prompt_head"] for task in ledger["tasks"]}) == RUNS
    assert ledger["rate_limited"] == {}, ledger["rate_limited"]  # 0 x 429 across both hosts
    assert ledger["total_requests"] > RATE_LIMIT  # the limit did bind
    ran_by = [run.labels.get("prefect.worker.name") for run in finished]
    took = [ran_by.count(f"worker-{index}") for index in (1, 2)]
    assert all(took), ran_by  # both workers ran runs (only the one that ran it labels it)
    print(
        f"\ntopology: {RUNS} runs, taken {took[0]}/{took[1]} by the two workers; "
        f"{ledger['total_requests']} requests under a limit of {RATE_LIMIT} per window; "
        f"{ledger['submits']} submits; 429s: {sum(ledger['rate_limited'].values())}"
    )
    assert_no_server_errors(cluster, pool)


@pytest.mark.timeout(900)
def test_a_batch_in_parts_uses_both_workers_under_one_budget_and_one_summary(
    cluster: dict[str, Any], simulator: Simulator, tmp_path: Path
) -> None:
    """The batch's run reserves the credits and waits; three batch-part runs make the
    videos. With two runs at most per worker and the batch's run holding one, no
    worker can take every part."""
    pool = deploy_and_start_workers(cluster, simulator, tmp_path, limit=2)
    first, _ = pool.apis
    items = [{"prompt": f"part {i}: lanterns on a canal"} for i in range(BATCH)]
    try:
        batch = asyncio.run(
            run_deployment_and_wait(
                first,
                "batch-of-videos/on-demand",
                {
                    "items": items,
                    "parts": PARTS,
                    "max_in_flight": 4,
                    "credit_budget": BATCH * 4 - 4,  # one item over budget: never sent
                    "schedule": SCHEDULE,
                    "output_dir": str(tmp_path / "videos"),
                },
                within=600,
            )
        )
        parts = asyncio.run(runs_named(first, "batch part"))
    finally:
        pool.stop()
    assert batch.state is not None
    assert batch.state.is_completed(), pool.logs()
    summary = asyncio.run(result_of(first, batch))
    assert (summary["delivered"], summary["over_budget"]) == (BATCH - 1, 1)
    assert summary["credits_used"] == (BATCH - 1) * 4  # one budget, one summary for the batch
    assert [item["index"] for item in summary["items"]] == list(range(BATCH))
    ledger = simulator.snapshot()
    assert ledger["submits"] == BATCH - 1  # each delivered video paid once; none over budget
    assert ledger["rate_limited"] == {}, ledger["rate_limited"]
    assert len(parts) == PARTS
    assert all(run.state and run.state.is_completed() for run in parts)
    workers = {run.labels.get("prefect.worker.name") for run in parts}
    assert workers == {"worker-1", "worker-2"}, f"a batch in parts ran on {workers} only"
    assert_no_server_errors(cluster, pool)


async def run_deployment_and_wait(
    api: str, name: str, parameters: dict[str, Any], within: float
) -> FlowRun:
    """A run of deployment ``name``, once it is final."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return (await wait_for_all(api, [run], within))[0]


async def runs_named(api: str, prefix: str) -> list[FlowRun]:
    """The flow runs whose name starts with ``prefix``."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            return [run for run in await client.read_flow_runs() if run.name.startswith(prefix)]


async def result_of(api: str, run: FlowRun) -> dict[str, Any]:
    """A finished batch's summary, from its batch-summary-json artifact."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
    text = next(str(a.data) for a in artifacts if a.key == "batch-summary-json")
    document: dict[str, Any] = json.loads(text.split("```json\n", 1)[1].rsplit("```", 1)[0])
    return document


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
