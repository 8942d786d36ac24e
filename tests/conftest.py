"""Fixtures for every test: an isolated environment and the simulator.

The Prefect test harness is NOT loaded here: it lives in tests/prefect/, so
the tests that need no server never pay its ~25 s start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nanophoto.storage import OUTPUT_ROOT_VARIABLE
from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.helpers import MakeSimulator

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


@pytest.fixture(autouse=True)
def isolated_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No NANOPHOTO_* or SORA2_* from the machine, and no real ~/.openclaw file.

    Videos may be written anywhere under pytest's temporary folder (every
    ``tmp_path`` is inside it): the output folder a worker confines them to.
    """
    for name in list(os.environ):
        if name.startswith(("NANOPHOTO_", "SORA2_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(tmp_path / "absent-openclaw.json"))
    monkeypatch.setenv(OUTPUT_ROOT_VARIABLE, str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def make_simulator() -> Iterator[MakeSimulator]:
    """Start simulators with given settings; each stops when the test ends."""
    running: list[SimulatorThread] = []

    def make(**config: Any) -> Simulator:
        config.setdefault("time_scale", 0.01)
        config.setdefault("seed", 7)
        thread = SimulatorThread(SimulatorConfig(**config))
        simulator = thread.__enter__()
        running.append(thread)
        return simulator

    yield make
    for thread in running:
        thread.__exit__(None, None, None)


@pytest.fixture
def simulator(make_simulator: MakeSimulator) -> Simulator:
    """A simulator 100x faster than real time, with the default key."""
    return make_simulator()
