"""One request budget for every flow run and worker: a Prefect global concurrency limit.

NanoPhoto counts a key's requests over a sliding hour. The limit
``nanophoto-api`` reproduces that window exactly: each request holds one slot
from its grant until it is done, then for one window (a lease that we renew
while the request is under way, release when the window has passed, and
that the Prefect server revokes itself if our process died first, never
sooner than a window after the process's last request). A lease whose window
has passed is first kept a pace and a half for our next request, which
renews it instead of a release and a new lease (4 requests in a row at most,
so another process gets its chance at the slot). So the slots in use
are the requests under way or made in the last hour, by every process that
shares the key, and a request only goes out when one is free.

Why not ``rate_limit()``'s slot decay: a decaying bucket that allows bursts
admits up to ``limit + rate * hour`` requests in an hour, twice NanoPhoto's
budget, and one that never bursts would throttle a single video's 20 s checks.

The limit is strict: if it does not exist, the first request fails with a
message saying how to create it (``make deploy``), instead of running
unthrottled. In each process a ``RequestLimiter`` sits in front of it: it
orders waiting requests (submits first) and takes slots in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final
from uuid import UUID

import certifi
import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.context import AsyncClientContext
from prefect.exceptions import ObjectNotFound
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
)
from prefect.utilities.asyncutils import add_event_loop_shutdown_callback

from nanophoto.errors import ConfigurationError, NanoPhotoError
from nanophoto.ratelimit import WINDOW_MARGIN, Done, RequestLimiter
from nanophoto.settings import NanoPhotoSettings, current_settings

RATE_LIMIT_NAME: Final = "nanophoto-api"
_MIN_LEASE_S: Final = 60.0  # the Prefect server refuses shorter leases
RENEW_EVERY_S: Final = 10.0  # a lease whose requests are under way is renewed this often
# A lease serves at most this many requests in a row (``_reuse``), then is released: another
# process waiting for the key's slots gets its chance at a release, as without reuse.
SERVES_AT_MOST: Final = 4
_API_RETRIES: Final = 6
# A write the SQLite server could not lock is answered 503 at once and can be sent again
# at once; Prefect's client would sleep 2 s first (200 simulated s at a time scale of
# 1/100), and every request of the process would wait behind it.
_LOCKED_PAUSES_S: Final = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
_logger = logging.getLogger("sora2.ratelimit")


class RateBudgetMissingError(ConfigurationError):
    """The global concurrency limit that shares the key's budget does not exist."""

    code = "RATE_LIMIT_MISSING"


class RateBudgetUnavailableError(NanoPhotoError):
    """The Prefect API that shares the budget cannot be reached; nothing was sent."""

    code = "RATE_LIMIT_UNAVAILABLE"
    may_have_started = False
    retryable = True  # a watch tries again at its next check


class RetryLockedTransport(httpx.AsyncBaseTransport):
    """Sends a request again after a short pause while the server answers 503.

    Prefect's server answers 503 when its database could not take a write (SQLite's
    "database is locked"): nothing was written, so the same request can go again,
    as Prefect's client would, only sooner. A 503 for maintenance, or one that
    lasts past the pauses, goes on to Prefect's client and its own retries.
    """

    def __init__(
        self, inner: httpx.AsyncBaseTransport, pauses: tuple[float, ...] = _LOCKED_PAUSES_S
    ) -> None:
        self.inner = inner
        self.pauses = pauses

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for pause in self.pauses:
            response = await self.inner.handle_async_request(request)
            if response.status_code != 503 or response.headers.get("Prefect-Maintenance"):
                return response
            await response.aclose()
            await asyncio.sleep(pause)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _prefect_tls_context() -> ssl.SSLContext:
    """The TLS context Prefect's client would build for itself, built once per setting.

    Each budget call opens a client, and Prefect's loads the CA bundle for each
    (about 20 ms of CPU): three times per request when each grant takes its own
    lease, the largest single cost of a paced batch's process.
    """
    insecure = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
    cert_file = PREFECT_API_SSL_CERT_FILE.value() or certifi.where()
    context = _TLS_CONTEXTS.get((insecure, cert_file))
    if context is None:
        if insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=cert_file)
        _TLS_CONTEXTS[(insecure, cert_file)] = context
    return context


_TLS_CONTEXTS: dict[tuple[bool, str], ssl.SSLContext] = {}


class BudgetClient(contextlib.AbstractAsyncContextManager[PrefectClient]):
    """A Prefect client for the budget's calls, whose 503s are retried quickly.

    It wraps the transport Prefect built (its TLS, HTTP/2 and connection
    retries kept), so only the pause after a locked database changes; its TLS
    context is the process's one (``_prefect_tls_context``). A class, not an
    async generator: it stays open while calls are due and is closed by the
    event loop's shutdown callback, and asyncio would close a generator left
    open then itself, at the same time ("aclose(): asynchronous generator is
    already running", logged as an error at the end of a flow run).
    """

    def __init__(self) -> None:
        self._client = get_client(httpx_settings={"verify": _prefect_tls_context()})

    async def __aenter__(self) -> PrefectClient:
        client = await self._client.__aenter__()
        http = client._client
        http._transport = RetryLockedTransport(http._transport)
        return client

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._client.__aexit__(*exc_info)


def budget_client() -> BudgetClient:
    """A Prefect client for the budget's calls (``BudgetClient``)."""
    return BudgetClient()


class PrefectRequestBudget:
    """Slots of the global concurrency limit, each held for one rate window."""

    def __init__(
        self,
        name: str = RATE_LIMIT_NAME,
        *,
        window: float,
        stuck_after: float | None = None,
        api_retries: int = _API_RETRIES,
        api_retry_delay: float = 0.5,
    ) -> None:
        self.name = name
        self.window = window * (1 + WINDOW_MARGIN)
        self._limit: int | None = None
        self._stuck_after = stuck_after
        self.api_retries = api_retries
        self.api_retry_delay = api_retry_delay
        self._releases: set[asyncio.Task[None]] = set()
        # Leases whose window has passed, kept a little for the next request (``_reuse``):
        # lease -> its slots. Every lease's slot count is in ``_slots`` until released.
        self._spare: dict[UUID, int] = {}
        self._slots: dict[UUID, int] = {}
        self._served: dict[UUID, int] = {}  # lease -> the requests it served in a row
        # One Prefect client for every call while any is due (``_client``).
        self._client: PrefectClient | None = None
        self._client_url: str | None = None
        self._client_stack: contextlib.AsyncExitStack | None = None
        self._client_users = 0
        self._client_opening = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: list[contextlib.AsyncExitStack] = []  # clients of an older API URL
        self._closes_with_loop = False
        # One budget call at a time from this process: concurrent writes to a
        # SQLite-backed server collide, and the client then backs off for seconds.
        self._calls = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PrefectRequestBudget(name={self.name!r}, window={self.window:g})"

    async def acquire(self, count: int) -> Done:
        """Take ``count`` slots (see ``_acquire``), with a Prefect client of our own; the
        answer is called once per request when it is done."""
        try:
            leases = await asyncio.create_task(self._acquire(count), context=_own_client_context())
        except BaseException:
            self._close_client_if_idle()
            raise
        return self._held(leases, count)

    def _held(self, leases: list[UUID], count: int) -> Done:
        """Renew ``leases`` while any of their ``count`` requests is under way; release
        them a window after the last one is done."""
        keeper = self._spawn(self._keep_alive(leases), f"renew-{leases[0]}")
        left = count

        def done() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                keeper.cancel()
                self._release_later(leases, after=self.window)

        return done

    async def _keep_alive(self, leases: list[UUID]) -> None:
        """Every RENEW_EVERY_S, each lease lives a full ``_lease_duration`` again: a process
        that dies with a request under way leaves its slot held a window past that."""
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            for lease_id in leases:
                try:
                    async with self._calls, self._prefect() as client:
                        await client.renew_concurrency_lease(lease_id, self._lease_duration)
                except Exception as error:  # the next renewal tries again
                    _logger.warning("could not renew lease %s: %s", lease_id, error)

    async def _acquire(self, count: int) -> list[UUID]:
        """Take ``count`` slots, waiting while the last window's requests fill the limit.

        A Prefect API that fails for a moment is retried; one that stays down,
        or a limit full for longer than a holder may keep a slot (``stuck_after``:
        its slots orphaned, e.g. by a server that lost its leases in a restart),
        raises a ``NanoPhotoError`` naming the cause, so no run waits forever.
        """
        async with self._prefect() as client:
            failures = 0
            while True:
                try:
                    limit = await self._read_limit(client)
                    break
                except (httpx.TransportError, httpx.HTTPStatusError) as error:
                    if isinstance(error, httpx.HTTPStatusError) and (
                        error.response.status_code < 500
                    ):
                        raise
                    failures = await self._pause_after_failure(failures, error)
            poll = min(max(self.window / limit / 4, 0.02), 5.0)
            take = min(count, limit)
            # The requests go out once every slot of this batch is in, not when the
            # first was granted (a batch taken one slot at a time from a full limit may
            # take a while): the early leases live a full lease from now.
            taken: list[tuple[UUID, float]] = []  # each lease, and when it was granted
            try:
                count -= await self._reuse(client, count, taken)
                await self._take(client, count, take, poll, taken)
                await self._renew_early_ones(client, taken)
            except BaseException:
                # Never used: free them now, before a cancelled process goes away.
                await asyncio.shield(self._release_now([lease for lease, _ in taken]))
                raise
            return [lease for lease, _ in taken]

    async def _take(
        self,
        client: PrefectClient,
        count: int,
        take: int,
        poll: float,
        taken: list[tuple[UUID, float]],
    ) -> None:
        """Lease ``count`` slots into ``taken``, ``take`` at a time while they fit."""
        full_since: float | None = None
        failures = 0
        while count > 0:
            take = min(take, count)
            try:
                async with self._calls:
                    response = await client.increment_concurrency_slots_with_lease(
                        names=[self.name],
                        slots=take,
                        mode="concurrency",
                        lease_duration=self._lease_duration,
                    )
            except httpx.HTTPStatusError as error:
                if error.response.status_code == 423:  # slots = requests of the last hour
                    now = time.monotonic()
                    full_since = full_since or now
                    if now - full_since > self.stuck_after:
                        raise self._stuck() from None
                    take = 1  # never wait for several slots at once: others take them
                    await asyncio.sleep(poll)
                    count -= await self._reuse(client, count, taken)  # one of ours aged out
                    continue
                if error.response.status_code < 500:
                    raise
                failures = await self._pause_after_failure(failures, error)
                continue
            except httpx.TransportError as error:
                failures = await self._pause_after_failure(failures, error)
                continue
            full_since, failures = None, 0
            answer = response.json()
            lease_id = UUID(answer["lease_id"])
            if not answer.get("limits"):  # deleted since we read it
                await client.release_concurrency_slots_with_lease(lease_id)
                self._limit = None
                raise self._missing()
            taken.append((lease_id, time.monotonic()))
            self._slots[lease_id], self._served[lease_id] = take, 1
            count -= take

    async def _reuse(
        self, client: PrefectClient, count: int, taken: list[tuple[UUID, float]]
    ) -> int:
        """Serve up to ``count`` requests with spare leases (``_spare``); how many it served.

        A lease whose window has passed frees its slots, and a new request takes
        slots: renewing the lease for the new request does both in one call, and
        a cheap one (the lease store, not a database write), where a release and a
        new lease are two writes. Under a binding budget a request's slot ages out
        about when the next request is granted, so most requests take this path.
        """
        served = 0
        while served < count:
            lease_id = next(
                (lease for lease, n in self._spare.items() if n <= count - served), None
            )
            if lease_id is None:
                break
            slots = self._spare.pop(lease_id)
            taken.append((lease_id, time.monotonic()))  # cancelled meanwhile: released with them
            try:
                async with self._calls:
                    await client.renew_concurrency_lease(lease_id, self._lease_duration)
            except (httpx.TransportError, httpx.HTTPStatusError) as error:
                taken.pop()
                _logger.debug("could not reuse lease %s: %s", lease_id, error)
                if isinstance(error, httpx.HTTPStatusError) and error.response.status_code == 410:
                    self._forget(lease_id)  # gone (revoked, a restarted server): slots free
                else:  # it may still hold its slots: free them, and take new ones
                    self._spawn(self._release_now([lease_id]), f"release-{lease_id}")
                continue
            self._served[lease_id] = self._served.get(lease_id, 0) + 1
            served += slots
        return served

    @property
    def stuck_after(self) -> float:
        """Full for longer than this, the limit's slots are orphaned (a server that lost its
        leases): longer than one holder may keep a slot, a lease's life for each of the
        SERVES_AT_MOST requests it serves in a row, and a little."""
        if self._stuck_after is not None:
            return self._stuck_after
        return SERVES_AT_MOST * self._lease_duration + self.window * 0.1

    @property
    def _lease_duration(self) -> float:
        """Renewed every RENEW_EVERY_S while its requests are under way, a lease always
        outlives the window of a request sent now and its time as a spare; the server
        revokes it itself that long after its process died."""
        return max(self.window + 2 * RENEW_EVERY_S, _MIN_LEASE_S) + 5.0 + self._spare_for

    @property
    def _spare_for(self) -> float:
        """How long a lease whose window has passed waits for a request of ours before it
        is released: a pace and a half (the gap between grants when the budget binds),
        so that the next grant finds it; another process waits that long for its slot."""
        return 1.5 * self.window / self._limit if self._limit else 0.0

    async def _renew_early_ones(
        self, client: PrefectClient, taken: list[tuple[UUID, float]]
    ) -> None:
        """Leases granted a while before the batch was whole: their time starts again now,
        so none is revoked by the server before we release it, a window from now."""
        now = time.monotonic()
        for lease_id, granted in taken:
            if now - granted < 1.0:
                continue
            try:
                async with self._calls:
                    await client.renew_concurrency_lease(lease_id, self._lease_duration)
            except (httpx.TransportError, httpx.HTTPStatusError) as error:
                # The lease then ends up to the batch's wait early: rare, and logged.
                _logger.warning("could not renew lease %s: %s", lease_id, error)

    async def _pause_after_failure(self, failures: int, error: Exception) -> int:
        """Back off after a failed call to the Prefect API; give up after a few."""
        if failures >= self.api_retries:
            raise RateBudgetUnavailableError(
                f"the Prefect API did not answer the request budget's call "
                f"({type(error).__name__}) after {self.api_retries} retries; nothing was sent"
            ) from None
        await asyncio.sleep(min(2.0**failures * self.api_retry_delay, 10.0))
        return failures + 1

    def _stuck(self) -> RateBudgetMissingError:
        return RateBudgetMissingError(
            f"the global concurrency limit {self.name!r} has been full for "
            f"{self.stuck_after:.0f} s, longer than any run holds a slot, so its slots are "
            "held by requests that ended: a Prefect server "
            "that keeps leases in memory loses them when it restarts. Free them with "
            "`make deploy ARGS=--reset-rate-limit` (when no run is using the key), and "
            "start the server with PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="
            "prefect.server.concurrency.lease_storage.filesystem (as `make server` does)."
        )

    async def _read_limit(self, client: PrefectClient) -> int:
        if self._limit is None:
            try:
                limit = await client.read_global_concurrency_limit_by_name(self.name)
            except ObjectNotFound:
                raise self._missing() from None
            if not limit.active:
                raise RateBudgetMissingError(
                    f"the global concurrency limit {self.name!r} is inactive: activate it "
                    "in the Prefect UI (Concurrency) or run `make deploy`"
                )
            self._limit = limit.limit
        return self._limit

    def _missing(self) -> RateBudgetMissingError:
        return RateBudgetMissingError(
            f"the global concurrency limit {self.name!r}, which keeps every run under the "
            "key's requests per hour, does not exist on this Prefect server: create it with "
            "`make deploy` (python -m deployments.setup). Nothing was sent."
        )

    async def _release_now(self, lease_ids: list[UUID]) -> None:
        """Release these leases at once; one that cannot be expires on its own."""
        for lease_id in lease_ids:
            self._forget(lease_id)
            try:
                async with self._calls, self._prefect() as client:
                    await client.release_concurrency_slots_with_lease(lease_id)
            except Exception as error:
                _logger.debug("could not release lease %s: %s", lease_id, error)

    def _forget(self, lease_id: UUID) -> None:
        """The lease is released, or gone: it is no longer ours to reuse."""
        self._slots.pop(lease_id, None)
        self._served.pop(lease_id, None)

    def _release_later(self, lease_ids: list[UUID], *, after: float) -> None:
        """Release these leases ``after`` seconds from now (one timer for all), unless a
        request of ours reuses one meanwhile (spare for ``_spare_for`` first)."""
        if not lease_ids:
            return

        async def release() -> None:
            await asyncio.sleep(after)
            ours = [lease for lease in lease_ids if lease in self._slots]
            spared = [lease for lease in ours if self._served[lease] < SERVES_AT_MOST]
            for lease_id in spared:
                self._spare[lease_id] = self._slots[lease_id]
            if spared:
                await asyncio.sleep(self._spare_for)
            # Out of reach of ``_reuse`` all at once: the releases below take a while, and a
            # spare reused past its time could outlive its lease on the server.
            unused = {lease for lease in spared if self._spare.pop(lease, None) is not None}
            for lease_id in ours:
                if lease_id in spared and lease_id not in unused:
                    continue  # reused: its new request's release is timed anew
                self._forget(lease_id)
                try:
                    async with self._calls, self._prefect() as client:
                        await client.release_concurrency_slots_with_lease(lease_id)
                except Exception as error:  # the lease then expires on its own
                    _logger.debug("could not release lease %s: %s", lease_id, error)

        self._spawn(release(), f"release-{lease_ids[0]}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task of the budget, outside any run's context, kept referenced."""
        task = asyncio.create_task(work, name=name, context=_own_client_context())
        self._releases.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled():  # (cancelled: the loop is ending, or a release follows)
            self._close_client_if_idle()

    @contextlib.asynccontextmanager
    async def _prefect(self) -> AsyncIterator[PrefectClient]:
        """The budget's Prefect client (``budget_client``), open while calls are due.

        A fresh client per call would cost a second request each time (Prefect's
        client asks the server for a CSRF token before its first write) and the
        client's construction: a paced batch makes several budget calls per
        request. The client is closed once no call is under way and no renewal or
        release is pending (``_close_client_if_idle``), and replaced if the API's
        URL changed meanwhile.
        """
        url = PREFECT_API_URL.value()
        async with self._client_opening:
            if not self._closes_with_loop:  # pending releases die with the loop: not it
                await add_event_loop_shutdown_callback(self._close_all)
                self._closes_with_loop = True
            if self._client is None or self._client_url != url:
                if self._client_users == 0:
                    await self._close_client()
                elif self._client_stack is not None:  # in use: closed once nothing is
                    self._retired.append(self._client_stack)
                stack = contextlib.AsyncExitStack()
                client = await stack.enter_async_context(budget_client())
                self._client, self._client_url, self._client_stack = client, url, stack
            self._client_users += 1
            client = self._client
        try:
            yield client
        finally:
            self._client_users -= 1

    def _close_client_if_idle(self) -> None:
        """Close the client when nothing is due: no call, no pending renewal or release."""
        if self._client_users:
            return
        if self._retired or (self._client is not None and not self._releases):
            self._spawn_closing()

    def _spawn_closing(self) -> None:
        closing = asyncio.create_task(self._close_when_idle(), name="budget-client-close")
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _close_when_idle(self) -> None:
        async with self._client_opening:  # a call that came meanwhile keeps it open
            if not self._client_users:
                await self._close_retired()
                if not self._releases:
                    await self._close_client()

    async def _close_all(self) -> None:
        """The loop is ending: whatever is still open goes now."""
        await self._close_retired()
        await self._close_client()

    async def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for stack in retired:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _close_client(self) -> None:
        stack, self._client, self._client_stack = self._client_stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):  # a broken connection: nothing to keep
                await stack.aclose()


def _own_client_context() -> contextvars.Context:
    """This context, minus the run's Prefect client.

    The limiter serves every flow run of the process; inside one run's
    context, ``get_client()`` would hand out that run's client, closed when
    the run ends while the limiter still needs one.
    """
    context = contextvars.copy_context()
    context.run(AsyncClientContext.__var__.set, None)  # type: ignore[arg-type]
    return context


_limiters: dict[tuple[int, int, float], tuple[asyncio.AbstractEventLoop, RequestLimiter]] = {}


def shared_limiter(settings: NanoPhotoSettings | None = None) -> RequestLimiter:
    """This process's limiter for the key, drawing on the global limit (one per event loop)."""
    settings = settings or current_settings()
    loop = asyncio.get_running_loop()
    key = (id(loop), settings.rate_limit, settings.rate_window)
    entry = _limiters.get(key)
    if entry is None or entry[0] is not loop:
        limiter = RequestLimiter(
            settings.rate_limit,
            settings.rate_window,
            upstream=PrefectRequestBudget(window=settings.rate_window),
        )
        for old, (other, _) in list(_limiters.items()):
            if other.is_closed():
                del _limiters[old]
        _limiters[key] = entry = (loop, limiter)
    return entry[1]


async def ensure_rate_limit(
    client: PrefectClient, limit: int, *, name: str = RATE_LIMIT_NAME, reset: bool = False
) -> str:
    """Create the global limit, or set its size; ``reset`` frees slots nobody holds.

    Returns what was done, for setup's report. ``reset`` is for servers that
    keep leases in memory and were restarted (the embedded server of the
    demo): their slots would otherwise stay taken.
    """
    try:
        existing = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
        )
        return f"created global concurrency limit {name} ({limit} requests per window)"
    update: dict[str, object] = {}
    if existing.limit != limit:
        update["limit"] = limit
    if not existing.active:
        update["active"] = True
    if existing.slot_decay_per_second:
        update["slot_decay_per_second"] = 0.0  # a window of leases, not a decaying bucket
    if reset and existing.active_slots:
        update["active_slots"] = 0
    if not update:
        return f"global concurrency limit {name} already set ({limit} requests per window)"
    await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**update))
    return f"updated global concurrency limit {name}: {sorted(update)}"


async def create_rate_limit(limit: int, *, reset: bool = False) -> str:
    """``ensure_rate_limit`` on the configured Prefect server."""
    async with get_client() as client:
        return await ensure_rate_limit(client, limit, reset=reset)
