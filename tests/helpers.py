"""Helpers every test module may import (fixtures live in the conftest files)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from prefect import State

from nanophoto.settings import NanoPhotoSettings
from nanophoto_simulator import DEFAULT_KEY, Simulator

MakeSimulator = Callable[..., Simulator]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
    """Point the tasks' settings at ``simulator``, with short back-offs.

    The flows' schedules and the rate window are in NanoPhoto's seconds;
    ``NANOPHOTO_TIME_SCALE`` runs them on the simulator's compressed clock.
    """
    monkeypatch.setenv("NANOPHOTO_BASE_URL", simulator.base_url)
    monkeypatch.setenv("NANOPHOTO_API_KEY", DEFAULT_KEY)
    config = simulator.config
    monkeypatch.setenv("NANOPHOTO_RATE_LIMIT", str(config.rate_limit))
    monkeypatch.setenv("NANOPHOTO_RATE_WINDOW", str(config.real(config.rate_window_seconds)))
    monkeypatch.setenv("NANOPHOTO_TIME_SCALE", str(config.time_scale))
    monkeypatch.setenv("NANOPHOTO_RETRY_BASE_DELAY", "0.01")
    monkeypatch.setenv("NANOPHOTO_RETRY_MAX_DELAY", "0.05")
    monkeypatch.setenv("NANOPHOTO_RETRY_RATE_LIMIT_DELAY", "0.05")


async def exception_text(state: State[Any]) -> str:
    """The text of the exception a failed run ended with ("" if it did not fail)."""
    try:
        await state.aresult()
    except Exception as error:
        return str(error)
    return ""
