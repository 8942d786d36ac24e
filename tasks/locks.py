"""One lock per idempotency key, through Prefect's ``LockManager`` protocol.

A run holds its key's lock for one read and one write of the key's record at
a time (``tasks.submissions``): long enough to claim the key, or to change
its state only if it is still what the run expects. Between those moments
the claim (a lease the run renews while it prepares and sends the submit)
keeps other runs waiting, so two runs with one key never both send it: the
second waits for the first's outcome, then resumes the same video.

Two lock managers:

* ``FileLockManager`` (the default): an ``flock`` on a file beside the
  submission records, for workers on one machine. The operating system
  frees it the moment its process dies, so a worker killed with SIGKILL never
  leaves a key locked; a hold time-out is not needed and is ignored.
* prefect-redis's ``RedisLockManager``, for workers on several machines:
  set ``SORA2_LOCK_REDIS_URL`` (``redis://host:6379/0``). A holder that died
  keeps the key until its hold time-out passes.

``key_lock`` uses only the protocol's synchronous calls, each a short
non-blocking attempt in a thread, and waits between attempts on the event
loop: between attempts, a run waiting for a key holds no thread. Calls for
one key never run in two threads at once: ``RedisLockManager`` (prefect-redis
0.3.0) is not thread-safe. Its ``release_lock`` frees the Redis lock and only
then forgets it, so a second holder's acquisition in between was forgotten:
that holder's release then failed its run ("No lock held by ...") and left
the key locked for the whole hold time-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from prefect.locking.protocol import LockManager

REDIS_URL_VARIABLE: Final = "SORA2_LOCK_REDIS_URL"
_POLL_S: Final = 0.05


class FileLockManager(LockManager):
    """Locks as ``flock`` on files in ``directory``: one machine, freed when a holder dies.

    Each acquisition opens its own file description, so two runs in one
    process exclude each other as two processes do.

    Example:
        ```python
        locks = FileLockManager(Path("/var/lib/sora2/locks"))
        if locks.acquire_lock("my-key", holder="run-1", acquire_timeout=0):
            locks.release_lock("my-key", holder="run-1")
        ```
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory.expanduser()
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, file descriptor)

    def __repr__(self) -> str:
        return f"FileLockManager({str(self.directory)!r})"

    def _path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()}.lock"

    def _try(self, key: str) -> int | None:
        """A descriptor holding the key's lock, or None if another holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise
        return fd

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take the key's lock, waiting up to ``acquire_timeout`` (None: forever, 0: once)."""
        del hold_timeout  # the operating system frees the lock when its holder dies
        if self.is_lock_holder(key, holder):
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while (fd := self._try(key)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())  # for a person looking: who holds it
        except OSError:
            pass  # the lock is the flock, not the text
        self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """``acquire_lock``, waiting on the event loop."""
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self.acquire_lock(key, holder, acquire_timeout=0, hold_timeout=hold_timeout):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        """Free the key's lock; only its holder may."""
        held = self._held.get(key)
        if held is None or held[0] != holder:
            raise ValueError(f"No lock held by {holder} for key {key}")
        del self._held[key]
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def is_locked(self, key: str) -> bool:
        """Whether anyone, here or in another process, holds the key's lock."""
        if key in self._held:
            return True
        fd = self._try(key)
        if fd is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder`` holds the key's lock in this process."""
        held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until the key is free (not taking it); False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    async def await_for_lock(
        self,
        key: str,
        timeout: float | None = None,  # noqa: ASYNC109 (the protocol's own signature)
    ) -> bool:
        """``wait_for_lock``, waiting on the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True


def redis_lock_manager(url: str) -> LockManager:
    """prefect-redis's ``RedisLockManager`` for ``url`` (an optional dependency)."""
    try:
        from prefect_redis.locking import RedisLockManager
    except ImportError:
        raise RuntimeError(
            f"{REDIS_URL_VARIABLE} is set but prefect-redis is not installed: "
            'pip install -e ".[redis]"'
        ) from None
    manager: LockManager = RedisLockManager(connection_url=url)
    return manager


_managers: dict[str, LockManager] = {}


def lock_manager(local_directory: Path) -> LockManager:
    """The lock manager the workers share: Redis if configured, else file locks.

    ``local_directory`` is where file locks live: beside the records when they
    are on this machine.
    """
    url = os.environ.get(REDIS_URL_VARIABLE, "").strip()
    name = url or str(local_directory)
    if name not in _managers:
        _managers[name] = redis_lock_manager(url) if url else FileLockManager(local_directory)
    return _managers[name]


class KeyBusyError(TimeoutError):
    """Another run held the key's lock for longer than we may wait."""


_STRIPES: Final = 64
_key_calls = [threading.Lock() for _ in range(_STRIPES)]
_P = ParamSpec("_P")
_R = TypeVar("_R")


async def _call(key: str, call: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """``call`` in a thread, after any other thread's call for ``key`` has returned.

    One lock per stripe of keys, not per key: bounded however many keys a
    long-lived worker sees, and the calls are short (none waits for a holder).
    """
    stripe = _key_calls[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % _STRIPES]

    def serialized() -> _R:
        with stripe:
            return call(*args, **kwargs)

    return await asyncio.to_thread(serialized)


@contextlib.asynccontextmanager
async def key_lock(
    manager: LockManager, key: str, holder: str, *, wait: float, hold: float
) -> AsyncIterator[None]:
    """Hold ``key``'s lock for the block; raise ``KeyBusyError`` after ``wait`` seconds.

    Every call to ``manager`` is one short attempt in a thread, one at a time
    per key: a run waiting for a key keeps no thread busy, whatever the manager.
    """
    deadline = time.monotonic() + wait
    while not await _attempt(manager, key, holder, hold):
        if time.monotonic() >= deadline:
            raise KeyBusyError(key)
        await asyncio.sleep(_POLL_S * 4)
    try:
        yield
    finally:
        await asyncio.shield(_call(key, manager.release_lock, key, holder))


async def _attempt(manager: LockManager, key: str, holder: str, hold: float) -> bool:
    """One attempt at the lock; if we are cancelled while it runs, a lock it took is freed."""
    attempt = asyncio.ensure_future(
        _call(key, manager.acquire_lock, key, holder, acquire_timeout=0, hold_timeout=hold)
    )
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        if await attempt:  # the thread finished: free what it took for nobody
            await _call(key, manager.release_lock, key, holder)
        raise
