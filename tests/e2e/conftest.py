"""A real Prefect server, setup command and process worker, for end-to-end tests.

Unlike tests/prefect, nothing here runs in-process: the server is
``prefect server start`` on a free loopback port with its own PREFECT_HOME,
the worker is ``prefect worker start``, and every process is stopped when the
tests end, pass or fail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from nanophoto.storage import OUTPUT_ROOT_VARIABLE
from tests.helpers import free_port

PROJECT_DIR = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The scheduler's full pass runs every 60 s by default; every 10 s here, so a
# schedule's runs appear within a test's patience. Nothing else differs.
SERVER_SETTINGS = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10"}


def base_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment of every process we start: no network, no stray keys."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NANOPHOTO_", "PREFECT_", "SORA2_"))
    }
    env.update(
        # As `make worker` runs it: the flow runs' `python` is the project's.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        NANOPHOTO_OPENCLAW_FILE=str(home / "no-openclaw.json"),
        # The tests' videos go under pytest's temporary folder (see isolated_env).
        **{OUTPUT_ROOT_VARIABLE: os.environ.get(OUTPUT_ROOT_VARIABLE, str(home.parent))},
    )
    return env


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to its whole group, then SIGKILL after 5 s: never leave one behind (a test
    server's graceful shutdown buys nothing, and often takes longer than that)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    # The group may hold children (flow-run processes) even after the leader exits.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


@dataclass
class PrefectServer:
    """A running ``prefect server start`` and where its files are."""

    home: Path
    api_url: str
    log: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a process in its own group, logging to ``log``; stopped at teardown."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                args,
                cwd=PROJECT_DIR,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        atexit.register(stop, process)  # even if pytest itself is interrupted
        return process

    def stop_all(self) -> None:
        """Stop every process started, newest first; each stop is independent."""
        for process in reversed(self.processes):
            try:
                stop(process)
            except Exception as error:  # keep stopping the others
                print(f"could not stop {process.args!r}: {error!r}", file=sys.stderr)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port, up within 180 s."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server = PrefectServer(home=home, api_url=api_url, log=home / "server.log")
    try:
        # As `make server` starts it: the UI pointed at this port, leases on disk.
        process = server.start(
            [str(BIN / "python"), "-m", "deployments.server", "--port", str(port)],
            server.log,
            {**base_env(home, api_url), **SERVER_SETTINGS},
        )
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, server.log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Prefect server did not start in 180 s"
            time.sleep(0.5)
        yield server
    finally:
        server.stop_all()


def files_holding(secret: str, *folders: Path) -> list[Path]:
    """The files under ``folders`` whose bytes contain ``secret``."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and secret.encode() in path.read_bytes():
                    found.append(path)
    return found
