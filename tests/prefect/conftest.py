"""One Prefect test server for the whole session (it takes ~25 s to start)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
from prefect.settings import (
    PREFECT_CLIENT_MAX_RETRIES,
    PREFECT_LOCAL_STORAGE_PATH,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness

from nanophoto_simulator import Simulator
from tasks.ratelimit import create_rate_limit
from tests.helpers import SESSION_RATE_LIMIT, MakeSimulator, forget_runner, use_simulator


@pytest.fixture(autouse=True, scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server and SQLite database, started once.

    Result storage (where submission records live) is private to the session
    too: never the machine's ~/.prefect/storage.
    """
    storage = tmp_path_factory.mktemp("result-storage")
    with (
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}),
    ):
        # The shared budget, as setup creates it; roomy, so each simulator's own limit binds.
        asyncio.run(create_rate_limit(SESSION_RATE_LIMIT))
        yield


@pytest.fixture
def api(make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """A simulator the tasks talk to, through the environment, as in production."""
    simulator = make_simulator()
    use_simulator(simulator, monkeypatch)
    return simulator


@pytest.fixture
def patient_prefect_client() -> Iterator[None]:
    """More retries of the harness server's 503s (SQLite busy), for the soaks."""
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 12}):
        yield


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (``tests.helpers.spawn``); killed if still running at its end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        forget_runner(process)
