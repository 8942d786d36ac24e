"""One lock per key: excludes across processes and within one, freed when a holder dies."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.locking.protocol import LockManager

from tasks.locks import FileLockManager, KeyBusyError, key_lock, redis_lock_manager
from tests.helpers import free_port

HOLD_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tasks.locks import FileLockManager
    locks = FileLockManager(Path(sys.argv[1]))
    assert locks.acquire_lock("the-key", holder="other-process", acquire_timeout=10)
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_it_is_a_prefect_lock_manager(tmp_path: Path) -> None:
    assert isinstance(FileLockManager(tmp_path), LockManager)


def test_a_lock_held_by_another_process_is_freed_the_moment_that_process_dies(
    tmp_path: Path,
) -> None:
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_ANOTHER_PROCESS, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "held"
        locks = FileLockManager(tmp_path)
        assert locks.is_locked("the-key")
        assert not locks.acquire_lock("the-key", holder="me", acquire_timeout=0.3)
        os.kill(other.pid, signal.SIGKILL)  # no cleanup runs: the kernel frees the lock
        other.wait(timeout=10)
        assert locks.acquire_lock("the-key", holder="me", acquire_timeout=10)
        assert locks.is_lock_holder("the-key", "me")
        locks.release_lock("the-key", holder="me")
        assert not locks.is_locked("the-key")
    finally:
        if other.poll() is None:
            os.kill(other.pid, signal.SIGKILL)
            other.wait(timeout=10)


def test_two_holders_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    locks = FileLockManager(tmp_path)
    assert locks.acquire_lock("k", holder="run-a", acquire_timeout=0)
    assert locks.acquire_lock("k", holder="run-a", acquire_timeout=0)  # already its own
    assert not locks.acquire_lock("k", holder="run-b", acquire_timeout=0)
    assert not FileLockManager(tmp_path).acquire_lock("k", holder="run-c", acquire_timeout=0)
    with pytest.raises(ValueError, match="run-b"):
        locks.release_lock("k", holder="run-b")
    locks.release_lock("k", holder="run-a")
    assert locks.acquire_lock("k", holder="run-b", acquire_timeout=0)
    locks.release_lock("k", holder="run-b")


async def test_a_waiter_gets_the_key_when_its_holder_lets_go(tmp_path: Path) -> None:
    locks = FileLockManager(tmp_path)
    order: list[str] = []

    async def first() -> None:
        async with key_lock(locks, "k", "first", wait=5, hold=60):
            order.append("first in")
            await asyncio.sleep(0.3)
            order.append("first out")

    async def second() -> None:
        await asyncio.sleep(0.05)
        async with key_lock(locks, "k", "second", wait=30, hold=60):
            order.append("second in")

    await asyncio.wait_for(asyncio.gather(first(), second()), timeout=60)
    assert order == ["first in", "first out", "second in"]


async def test_a_waiter_gives_up_after_its_bound(tmp_path: Path) -> None:
    locks = FileLockManager(tmp_path)
    assert locks.acquire_lock("k", holder="holder", acquire_timeout=0)
    started = time.monotonic()
    with pytest.raises(KeyBusyError):
        async with key_lock(locks, "k", "waiter", wait=0.5, hold=60):
            pytest.fail("the key was held by another")
    assert time.monotonic() - started >= 0.5


class SlowLocks(FileLockManager):
    """A lock manager whose every attempt takes a while (a busy thread pool, a Redis trip)."""

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        time.sleep(0.2)
        return super().acquire_lock(key, holder, acquire_timeout, hold_timeout)


async def test_a_run_cancelled_while_taking_the_lock_leaves_it_free(tmp_path: Path) -> None:
    locks = SlowLocks(tmp_path)

    async def holder() -> None:
        async with key_lock(locks, "k", "cancelled", wait=5, hold=60):
            await asyncio.sleep(30)

    task = asyncio.create_task(holder())
    await asyncio.sleep(0.05)  # its attempt is running in a thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with key_lock(locks, "k", "next", wait=5, hold=60):
        assert locks.is_lock_holder("k", "next")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port, stopped after the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait(timeout=10)


async def test_many_runs_of_one_process_taking_one_redis_key_in_turn_all_get_it(
    redis_url: str,
) -> None:
    """prefect-redis's manager forgets a lock after freeing it: a holder that took the key
    in between was forgotten, its release failed its run and left the key held."""
    locks = redis_lock_manager(redis_url)
    inside: list[str] = []
    entered = 0

    async def run(number: int) -> None:
        nonlocal entered
        for _ in range(60):
            async with key_lock(locks, "k", f"run-{number}-{uuid.uuid4().hex}", wait=30, hold=5):
                inside.append("in")
                assert len(inside) == 1, "two holders at once"
                entered += 1
                await asyncio.sleep(0)
                inside.pop()

    previous = sys.getswitchinterval()
    try:  # switch threads often, as a loaded machine does; restored for the next tests
        sys.setswitchinterval(1e-6)
        await asyncio.wait_for(asyncio.gather(*(run(n) for n in range(12))), timeout=120)
    finally:
        sys.setswitchinterval(previous)
    assert entered == 12 * 60
    assert not locks.is_locked("k")
