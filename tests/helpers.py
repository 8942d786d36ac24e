"""Helpers every test module may import (fixtures live in the conftest files)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

import pytest
from prefect import State
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from nanophoto.settings import NanoPhotoSettings
from nanophoto_simulator import DEFAULT_KEY, Faults, Simulator

MakeSimulator = Callable[..., Simulator]
PROJECT: Final = Path(__file__).resolve().parents[1]
# The shared request budget the Prefect tests' server gets: roomy, so each simulator's
# own limit is the one that binds.
SESSION_RATE_LIMIT: Final = 100_000
# The soaks' fault mix (per request), and their seed: SORA2_SOAK_SEED replays a run.
SOAK_FAULTS: Final = Faults(
    internal_error=0.07,
    gateway_error=0.07,
    dropped_connection=0.07,
    rate_limited=0.03,
    truncated_stream=0.05,
    generation_failed=0.10,
    after_processing=0.5,
)
SOAK_SEED: Final = int(os.environ.get("SORA2_SOAK_SEED", "20261202"))


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


def runner_env() -> dict[str, str]:
    """This test session's Prefect server and result storage, for another process."""
    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # As patient with the harness's SQLite server (503 when busy) as the soaks are.
        "PREFECT_CLIENT_MAX_RETRIES": "12",
        # Each retry and its back-off (2**n s, no cap) in the runner's log (``runner_report``).
        "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG",
    }


def spawn(
    spec: dict[str, Any], started: list[subprocess.Popen[str]], **env: str
) -> subprocess.Popen[str]:
    """Start ``tests.prefect.runner`` with ``spec`` in a process group of its own."""
    # Its warnings, for a failure's message: a file with no name, closed by ``forget_runner``.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (outlives this call)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.prefect.runner", json.dumps(spec)],
        cwd=PROJECT,
        env={**runner_env(), **env},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    _runner_logs[process.pid] = log
    started.append(process)
    return process


_runner_logs: dict[int, IO[str]] = {}


def runner_report(process: subprocess.Popen[str]) -> str:
    """What a runner printed and the end of what it logged, once it is stopped (killed
    if still running): why a run of it did not get where a test waited for it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    out, _ = process.communicate(timeout=30)
    log = _runner_logs.get(process.pid)
    logged = ""
    if log is not None:
        log.seek(0)
        logged = log.read()[-4000:]
    forget_runner(process)
    return f"the runner printed {out!r} and logged ...{logged}"


def forget_runner(process: subprocess.Popen[str]) -> None:
    """Close the log of a runner that has ended."""
    log = _runner_logs.pop(process.pid, None)
    if log is not None:
        log.close()


def lines_of(process: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    """The JSON lines a runner process printed, once it has ended."""
    out, _ = process.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def wait_for_state(
    key: str,
    states: set[str],
    within: float = 300,
    runner: subprocess.Popen[str] | None = None,
) -> Any:
    """The key's submission record, once it is in one of ``states``; ``runner``, the process
    running the key, is reported (``runner_report``) if it ends first or time runs out."""
    from tasks.submissions import SubmissionStore

    deadline = time.monotonic() + within
    store = await SubmissionStore.default()
    while time.monotonic() < deadline:
        record = await store.read(key)
        if record is not None and record.state in states:
            return record
        if runner is not None and runner.poll() is not None:
            break
        await asyncio.sleep(0.1)
    record = await store.read(key)
    if record is not None and record.state in states:
        return record  # reached just before its runner ended
    where = record.state if record is not None else "no record"
    report = f"; {runner_report(runner)}" if runner is not None else ""
    raise AssertionError(f"{key} never reached {states} (it is at: {where}){report}")
