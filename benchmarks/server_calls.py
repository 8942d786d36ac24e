"""What each kind of call a batch makes costs Prefect's embedded server, in its own CPU.

Starts a private embedded server (Prefect's, in a temporary ``PREFECT_HOME``) and,
from inside a flow run as the batch does, makes ``CALLS`` calls of each kind: a new
lease on a global concurrency limit, its release, a lease renewal, a progress-bar
update, an event, a log call. Prints the server's CPU per call (from ``/proc``) and
the calling process's, beside an idle baseline measured the same way.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

CALLS = 200


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pid() -> int:
    """The embedded server: this process's child running uvicorn."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == os.getpid() and b"uvicorn" in command:
            return int(entry.name)
    raise RuntimeError("no embedded Prefect server found among this process's children")


async def measure() -> list[tuple[str, float, float]]:
    """(call, server CPU ms per call, caller CPU ms per call) for each kind of call."""
    from prefect import flow, get_client
    from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, LogCreate
    from prefect.events import emit_event

    rows: list[tuple[str, float, float]] = []

    @flow
    async def calls() -> None:
        async with get_client() as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="server-calls", limit=100_000)
            )
            server = _server_pid()
            leases: list[UUID] = []

            async def timed(name: str, call: Callable[[int], Awaitable[Any]]) -> None:
                await asyncio.sleep(1.0)  # what came before is done
                server_before, own_before = _cpu(server), time.process_time()
                for i in range(CALLS):
                    await call(i)
                await asyncio.sleep(1.0)  # events and logs are sent in the background
                rows.append(
                    (
                        name,
                        1000 * (_cpu(server) - server_before) / CALLS,
                        1000 * (time.process_time() - own_before) / CALLS,
                    )
                )

            async def lease(i: int) -> None:
                answer = await client.increment_concurrency_slots_with_lease(
                    names=["server-calls"], slots=1, mode="concurrency", lease_duration=3700
                )
                leases.append(UUID(answer.json()["lease_id"]))

            async def renew(i: int) -> None:
                await client.renew_concurrency_lease(leases[i], 3700)

            async def release(i: int) -> None:
                await client.release_concurrency_slots_with_lease(leases[i])

            bar = await acreate_progress_artifact(progress=0.0, description="bar")

            async def update(i: int) -> None:
                await aupdate_progress_artifact(bar, progress=i / CALLS * 100, description=f"{i}")

            async def event(i: int) -> None:
                emit_event(
                    event="nanophoto.video.benchmark",
                    resource={"prefect.resource.id": f"nanophoto.video.{i}"},
                )

            async def log(i: int) -> None:
                record = LogCreate(
                    name="bench", level=20, message=f"line {i}", timestamp=datetime.now(UTC)
                )
                await client.create_logs([record])

            async def idle(i: int) -> None:
                await asyncio.sleep(0.005)

            await timed("nothing (5 ms asleep)", idle)
            await timed("a new lease", lease)
            await timed("a lease renewal", renew)
            await timed("a lease release", release)
            await timed("a progress-bar update", update)
            await timed("an event", event)
            await timed("a log call (one record)", log)

    await calls()
    return rows


def main() -> int:
    os.environ.update(
        PREFECT_HOME=tempfile.mkdtemp(prefix="sora2-server-calls-"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    os.environ.pop("PREFECT_API_URL", None)
    rows = asyncio.run(measure())
    print(f"What each call costs Prefect's embedded server ({CALLS} calls each, from a flow run)")
    print("| call | server CPU ms per call | caller CPU ms per call |")
    print("|---|---:|---:|")
    for name, server, own in rows:
        print(f"| {name} | {server:.1f} | {own:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
