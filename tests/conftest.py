"""Fixtures for every test: an isolated environment and the simulator.

The Prefect test harness is NOT loaded here: it lives in tests/prefect/, so
the tests that need no server never pay its ~25 s start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nanophoto.settings import NanoPhotoSettings
from nanophoto.simulator import DEFAULT_KEY, Simulator, SimulatorConfig, SimulatorThread

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

MakeSimulator = Callable[..., Simulator]


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NANOPHOTO_* from the machine, and no real ~/.openclaw file."""
    for name in list(os.environ):
        if name.startswith("NANOPHOTO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(tmp_path / "absent-openclaw.json"))


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


def settings_for(simulator: Simulator, **overrides: Any) -> NanoPhotoSettings:
    """Client settings pointing at ``simulator``, with short back-offs."""
    values: dict[str, Any] = {
        "api_key": DEFAULT_KEY,
        "base_url": simulator.base_url,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "retry_rate_limit_delay": 0.05,
    }
    values.update(overrides)
    return NanoPhotoSettings(**values)


def use_simulator(simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the tasks' settings at ``simulator``, with short back-offs."""
    monkeypatch.setenv("NANOPHOTO_BASE_URL", simulator.base_url)
    monkeypatch.setenv("NANOPHOTO_API_KEY", DEFAULT_KEY)
    # Our limiter keeps to the simulator's own limit and (compressed) hour.
    config = simulator.config
    monkeypatch.setenv("NANOPHOTO_RATE_LIMIT", str(config.rate_limit))
    monkeypatch.setenv("NANOPHOTO_RATE_WINDOW", str(config.real(config.rate_window_seconds)))
    monkeypatch.setenv("NANOPHOTO_TIME_SCALE", str(config.time_scale))
    monkeypatch.setenv("NANOPHOTO_RETRY_BASE_DELAY", "0.01")
    monkeypatch.setenv("NANOPHOTO_RETRY_MAX_DELAY", "0.05")
    monkeypatch.setenv("NANOPHOTO_RETRY_RATE_LIMIT_DELAY", "0.05")
