"""Concurrent runs on Prefect's embedded SQLite server against the production topology.

For each server, and for 10, 20 and 40 runs: that many ``topic-to-video``
runs created at once, taken by two process workers (``make worker``, half the
runs each), against one simulator at time scale 1/100. The deployments'
concurrency limit is raised to 40 for this (a copy of ``prefect.yaml``), so
the runs really are concurrent:

* *embedded*: ``make server`` (SQLite), the baseline: what one laptop runs;
* *cluster*: ``make cluster-up`` (PostgreSQL, Redis, two API replicas with
  ``--no-services``, one services process), one worker on each replica.

Figures per row: runs completed; runs that did not complete (failed, crashed,
or never created); HTTP 5xx answers, as the Prefect clients logged them
(each retry) and the servers' access lines; errors the servers logged
(``| ERROR``: on SQLite, "database is locked" in its event and messaging
loops, which lose or delay events even when no client sees a 5xx); wall time
from creating the runs to the last one final. Printed as a table with the
cluster's figures as ratios to the embedded server's.

Run: ``python -m benchmarks.topology`` (``make bench`` runs it; needs root
and apt-get, or PostgreSQL and Redis installed, for the cluster side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from nanophoto_simulator import SimulatorConfig, SimulatorThread

PROJECT_DIR = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY = "bench-topology-key"
TIME_SCALE = 0.01
# A row stops waiting after this long: runs still not final then (stuck Pending after the
# server dropped their submission) count as not completed, by their state's name.
ROW_LIMIT_S = 600
SCHEDULE = {"initial_delay": 120, "interval": 20, "max_wait": 3000, "expected_generation": 300}
# Retries the Prefect client logs name the status; the servers' access lines name it too.
SERVER_ERROR = re.compile(r"(?:status code|HTTP/1\.1\"?) 50[0-9]\b|\b50[0-9] (?:Internal|Service)")
LOGGED_ERROR = re.compile(r"\| ERROR ")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(home: Path, api_url: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NANOPHOTO_", "PREFECT_", "SORA2_"))
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        SORA2_OUTPUT_ROOT=str(home),
        NANOPHOTO_OPENCLAW_FILE=str(home / "no-openclaw.json"),
    )
    return env


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_healthy(api_url: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"bench: no Prefect API at {api_url} within {within:g} s")


@contextlib.contextmanager
def embedded(home: Path) -> Iterator[tuple[list[str], list[Path]]]:
    """``make server``: the API URLs (the same one twice) and the server's logs."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    server = _start(
        [str(BIN / "python"), "-m", "deployments.server", "--port", str(port)], log, _env(home, url)
    )
    try:
        _wait_healthy(url, 180)
        yield [url, url], [log]
    finally:
        _stop(server)


@contextlib.contextmanager
def cluster(home: Path) -> Iterator[tuple[list[str], list[Path]]]:
    """``make cluster-up`` on free ports: the two replicas' URLs and every server log."""
    folder = home / "cluster"
    ports = [_free_port() for _ in range(4)]
    command = [str(BIN / "python"), "-m", "deployments.cluster"]
    env = _env(home, "")
    env.pop("PREFECT_API_URL")
    up = subprocess.run(
        [
            *command,
            "up",
            "--dir",
            str(folder),
            "--postgres-port",
            str(ports[0]),
            "--redis-port",
            str(ports[1]),
            "--api-ports",
            f"{ports[2]},{ports[3]}",
        ],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        if up.returncode != 0:
            raise SystemExit(f"bench: cluster-up failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
        yield (
            [f"http://127.0.0.1:{port}/api" for port in ports[2:]],
            [folder / "api-1.log", folder / "api-2.log", folder / "services.log"],
        )
    finally:
        for path in folder.glob("*.log"):  # kept beside the others: `down` removes the folder
            (home / f"cluster-{path.name}").write_bytes(path.read_bytes())
        subprocess.run(
            [*command, "down", "--dir", str(folder)],
            cwd=PROJECT_DIR,
            env=env,
            capture_output=True,
            check=False,
        )


def _deploy(home: Path, api: str, base_url: str, limit: int) -> None:
    """``make deploy`` with the deployments' concurrency limit raised to ``limit``."""
    original = (PROJECT_DIR / "prefect.yaml").read_text()
    raised = re.sub(r"(concurrency: &video_concurrency\n\s+limit: )\d+", rf"\g<1>{limit}", original)
    prefect_file = home / "prefect.yaml"
    prefect_file.write_text(raised)
    env = {**_env(home, api), "NANOPHOTO_API_KEY": KEY, "NANOPHOTO_BASE_URL": base_url}
    done = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "deployments.setup",
            "--store-key",
            "--rate-limit",
            "100000",
            "--prefect-file",
            str(prefect_file),
        ],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


async def _create_and_wait(apis: list[str], count: int, videos: Path) -> tuple[list[str], float]:
    """``count`` topic-to-video runs at once, through each replica in turn; their final
    state names (``NOT_CREATED`` for a refused creation) and the wall time until the last
    is final."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def create(index: int) -> Any:
        with temporary_settings(updates={PREFECT_API_URL: apis[index % len(apis)]}):
            async with get_client() as client:
                deployment = await client.read_deployment_by_name("topic-to-video/on-demand")
                parameters = {"topic": f"bench {index}: a heron", "schedule": SCHEDULE}
                return await client.create_flow_run_from_deployment(
                    deployment.id, parameters={**parameters, "output_dir": str(videos)}
                )

    started = time.monotonic()
    created = await asyncio.gather(*(create(i) for i in range(count)), return_exceptions=True)
    runs = [run for run in created if not isinstance(run, BaseException)]
    states = ["NOT_CREATED"] * (count - len(runs))
    deadline = time.monotonic() + ROW_LIMIT_S
    with temporary_settings(updates={PREFECT_API_URL: apis[0]}):
        async with get_client() as client:
            while True:
                current = [await client.read_flow_run(run.id) for run in runs]
                final = all(r.state and r.state.is_final() for r in current)
                if final or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
    states += [r.state.type.value if r.state else "NONE" for r in current]
    return states, time.monotonic() - started


def _errors(logs: list[Path], pattern: re.Pattern[str] = SERVER_ERROR) -> int:
    return sum(
        len(pattern.findall(path.read_text(errors="replace"))) for path in logs if path.exists()
    )


def measure(side: str, counts: list[int], logs: Path) -> list[dict[str, Any]]:
    """Every row of one side."""
    home = Path(tempfile.mkdtemp(prefix=f"sora2-bench-{side}-", dir=logs))
    rows = []
    config = SimulatorConfig(keys={KEY: 1_000_000}, time_scale=TIME_SCALE, rate_limit=100_000)
    with (
        SimulatorThread(config) as simulator,
        (embedded if side == "embedded" else cluster)(home) as (apis, server_logs),
    ):
        _deploy(home, apis[0], simulator.base_url, max(counts))
        workers = [
            _start(
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    "sora2-process",
                    "--type",
                    "process",
                    "--limit",
                    str(max(counts)),
                    "--name",
                    f"w{index}",
                ],
                home / f"worker-{index}.log",
                {**_env(home, api), "NANOPHOTO_TIME_SCALE": str(TIME_SCALE)},
            )
            for index, api in enumerate(apis, start=1)
        ]
        try:
            for count in counts:
                before = _errors([*server_logs, *home.glob("worker-*.log")])
                logged = _errors(server_logs, LOGGED_ERROR)
                states, wall = asyncio.run(_create_and_wait(apis, count, home))
                errors = _errors([*server_logs, *home.glob("worker-*.log")]) - before
                logged = _errors(server_logs, LOGGED_ERROR) - logged
                rows.append(
                    {
                        "side": side,
                        "runs": count,
                        "completed": states.count("COMPLETED"),
                        "not_completed": count - states.count("COMPLETED"),
                        "server_errors": errors,
                        "logged_errors": logged,
                        "wall_s": round(wall, 1),
                        "states": {s: states.count(s) for s in sorted(set(states))},
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for worker in workers:
                _stop(worker)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table: each count, both sides, the cluster's ratios to the embedded."""
    lines = [
        "| runs at once | embedded: completed / not / 5xx / logged errors / wall | "
        "cluster: completed / not / 5xx / logged errors / wall | cluster wall ÷ embedded |",
        "|---:|---|---|---:|",
    ]
    by = {(row["side"], row["runs"]): row for row in rows}
    for count in sorted({row["runs"] for row in rows}):
        cells = []
        for side in ("embedded", "cluster"):
            row = by.get((side, count))
            cells.append(
                f"{row['completed']} / {row['not_completed']} / {row['server_errors']} / "
                f"{row['logged_errors']} / {row['wall_s']:.0f} s"
                if row
                else "n/a"
            )
        e, c = by.get(("embedded", count)), by.get(("cluster", count))
        ratio = f"{c['wall_s'] / e['wall_s']:.2f}" if e and c and e["wall_s"] else "n/a"
        lines.append(f"| {count} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure both sides and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.topology", description=__doc__)
    parser.add_argument("--runs", default="10,20,40", help="run counts (default: %(default)s)")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.runs.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="sora2-bench-topology-"))
    rows = measure("embedded", counts, logs)
    if not args.skip_cluster:
        rows += measure("cluster", counts, logs)
    print(table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
