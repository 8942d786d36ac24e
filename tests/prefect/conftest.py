"""One Prefect test server for the whole session (it takes ~25 s to start)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from nanophoto_simulator import Simulator
from tasks.ratelimit import create_rate_limit
from tests.helpers import MakeSimulator, use_simulator

SESSION_RATE_LIMIT: Final = 100_000


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
