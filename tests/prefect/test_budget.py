"""The shared request budget's edges, on a real Prefect server: the branches that keep a
key under its limit, or stop a run before it sends anything, when the limit is full,
stuck, or the Prefect API that shares it is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL, temporary_settings

import tasks.ratelimit
from nanophoto.client import NanoPhotoClient
from nanophoto.errors import NanoPhotoError
from nanophoto.models import VideoRequest
from nanophoto.ratelimit import RequestLimiter
from nanophoto_simulator import Simulator
from tasks.ratelimit import PrefectRequestBudget, RateBudgetMissingError, RateBudgetUnavailableError
from tests.helpers import free_port, settings_for


@pytest.fixture
async def small_limit() -> AsyncIterator[str]:
    """A global concurrency limit of 2 of our own, deleted afterwards."""
    name = f"budget-test-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=2, active=True)
        )
    yield name
    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(name)


async def sent_at_once(budget: PrefectRequestBudget, count: int) -> None:
    """Take ``count`` slots for requests that are done as soon as they are granted."""
    done = await budget.acquire(count)
    for _ in range(count):
        done()


async def test_a_full_limit_waits_for_a_slot_instead_of_failing(small_limit: str) -> None:
    """HTTP 423 (every slot held by the last window's requests): wait, then go."""
    window = 3.0
    first = PrefectRequestBudget(small_limit, window=window)
    second = PrefectRequestBudget(small_limit, window=window)
    await sent_at_once(first, 2)
    filled_at = time.monotonic()
    waiting = asyncio.create_task(sent_at_once(second, 1))
    await asyncio.wait_for(waiting, timeout=60)
    # The slot came free only when the first budget released one, a window later.
    assert time.monotonic() - filled_at >= window


async def test_a_batch_of_slots_taken_one_at_a_time_starts_its_window_when_it_is_whole(
    small_limit: str,
) -> None:
    """Slot windows start when the requests go out, which is when the batch is whole.

    A worker that needs 2 slots from a full limit gets them one at a time; its
    requests leave once it has both. Were the first slot's window counted from
    its own grant, it would come free a window after that, while its request's
    hour on NanoPhoto's side runs later: a third request would fit in the limit
    and be a 429 at NanoPhoto. Two budgets stand for two workers on two hosts.
    """
    window = 3.0
    other, batch, third = (PrefectRequestBudget(small_limit, window=window) for _ in "abc")
    await sent_at_once(other, 1)
    await asyncio.sleep(window / 2)
    await sent_at_once(other, 1)  # the limit is full; its slots come free half a window apart
    await asyncio.wait_for(sent_at_once(batch, 2), timeout=60)
    whole_at = time.monotonic()  # the batch's two requests go out now
    await asyncio.wait_for(sent_at_once(third, 1), timeout=60)
    assert time.monotonic() - whole_at >= window


async def test_a_slot_is_held_while_its_request_is_under_way_then_for_a_window(
    small_limit: str,
) -> None:
    """Requests granted, then sent late (a submission record written first on a loaded
    host): another host waits until a window after they are done, as NanoPhoto counts."""
    window = 3.0
    busy, other = (PrefectRequestBudget(small_limit, window=window) for _ in "ab")
    done = await busy.acquire(2)
    waiting = asyncio.create_task(sent_at_once(other, 1))
    await asyncio.sleep(window * 1.5)  # the two requests are still under way
    assert not waiting.done()
    done()
    done()
    done_at = time.monotonic()
    await asyncio.wait_for(waiting, timeout=60)
    assert time.monotonic() - done_at >= window


async def test_a_limit_stuck_full_stops_the_request_with_what_to_do(small_limit: str) -> None:
    """Slots held by leases nobody releases (a server that lost them): no endless wait."""
    async with get_client() as client:
        await client.increment_concurrency_slots_with_lease(
            names=[small_limit], slots=2, mode="concurrency", lease_duration=300
        )
    budget = PrefectRequestBudget(small_limit, window=0.5, stuck_after=2.0)
    with pytest.raises(
        RateBudgetMissingError, match="full for 2 s, longer than any run holds a slot"
    ):
        await asyncio.wait_for(sent_at_once(budget, 1), timeout=60)


async def test_an_unreachable_prefect_api_stops_the_request_before_it_is_sent(
    small_limit: str, simulator: Simulator
) -> None:
    budget = PrefectRequestBudget(small_limit, window=60, api_retries=2, api_retry_delay=0.01)
    limiter = RequestLimiter(2, 60, upstream=budget)
    dead = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        async with NanoPhotoClient(settings=settings_for(simulator), limiter=limiter) as client:
            with pytest.raises(RateBudgetUnavailableError) as caught:
                await asyncio.wait_for(client.submit(VideoRequest(prompt="a fox")), timeout=60)
    error: NanoPhotoError = caught.value
    assert error.code == "RATE_LIMIT_UNAVAILABLE"
    assert not error.may_have_started  # a refusal, not an unknown outcome: nothing was sent
    assert simulator.snapshot()["total_requests"] == 0


async def test_a_locked_database_costs_the_budget_no_client_back_off(
    small_limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite server answers 503 to a write it could not lock: the lease call goes
    again at once, not after the Prefect client's 2-s back-off that every request of
    the process would wait behind (200 simulated s at a time scale of 1/100)."""
    locked = {"left": 3}
    real_send = httpx.AsyncHTTPTransport.handle_async_request

    async def sometimes_locked(
        transport: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        if request.url.path.endswith("/increment-with-lease") and locked["left"] > 0:
            locked["left"] -= 1
            return httpx.Response(503, json={"exception_message": "Service Unavailable"})
        return await real_send(transport, request)

    back_offs: list[float] = []  # the Prefect client's sleeps before sending again
    real_sleep = anyio.sleep

    async def recorded_sleep(seconds: float) -> None:
        if sys._getframe(1).f_code.co_name == "_send_with_retry":
            back_offs.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", sometimes_locked)
    monkeypatch.setattr(anyio, "sleep", recorded_sleep)
    budget = PrefectRequestBudget(small_limit, window=1.0)
    await asyncio.wait_for(sent_at_once(budget, 2), timeout=60)
    assert locked["left"] == 0  # the lease call met the locked database
    assert back_offs == []
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(small_limit)
    assert limit.active_slots == 2  # granted once, not once per try


async def test_the_budgets_calls_load_the_ca_bundle_once_per_process(
    small_limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Prefect client would load the CA bundle (about 20 ms of CPU) for itself, and the
    budget opens one again whenever it was idle: five requests a window apart open up
    to ten clients; they share one TLS context."""
    loads: list[object] = []
    real_load = ssl.SSLContext.load_verify_locations

    def counted(context: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args)
        real_load(context, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    budget = PrefectRequestBudget(small_limit, window=0.1)
    for _ in range(5):
        await asyncio.wait_for(sent_at_once(budget, 1), timeout=60)
    await asyncio.sleep(1.0)  # the releases, a window after each request
    assert len(loads) <= 2, loads  # one for the process, one for a stray client of Prefect's


async def test_the_budgets_calls_share_one_client_while_any_is_due(
    small_limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client per call cost a second request each time (the CSRF token Prefect's client
    asks for before its first write) and its construction. While releases are pending,
    every lease call and release goes through one client, closed once nothing is due."""
    opened: list[object] = []
    real_client = tasks.ratelimit.budget_client

    def counted() -> contextlib.AbstractAsyncContextManager[object]:
        opened.append(None)
        return real_client()

    monkeypatch.setattr(tasks.ratelimit, "budget_client", counted)
    window = 1.0
    budget = PrefectRequestBudget(small_limit, window=window)
    for _ in range(5):  # 2 slots: the third waits for the first's release, a window later
        await asyncio.wait_for(sent_at_once(budget, 1), timeout=60)
    if budget._releases:
        await asyncio.wait(set(budget._releases), timeout=30)  # the last releases
    assert not budget._releases
    if budget._closing:
        await asyncio.wait(set(budget._closing), timeout=30)
    assert len(opened) == 1, f"{len(opened)} clients for 5 lease calls and 5 releases"
    assert budget._client is None  # closed once nothing was due
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(small_limit)
    assert limit.active_slots == 0  # every release went through


def test_the_budgets_client_is_closed_with_its_event_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release pending for a window keeps the client open; when the loop ends first
    (a flow-run process exits, a test ends), the client still closes with it, and
    asyncio has nothing left to close (it logged an error at each flow run's end)."""
    name = f"budget-test-{uuid.uuid4().hex[:8]}"

    async def scenario() -> PrefectRequestBudget:
        async with get_client() as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=2, active=True)
            )
        budget = PrefectRequestBudget(name, window=60.0)
        await asyncio.wait_for(sent_at_once(budget, 1), timeout=60)
        assert budget._client is not None  # its release is a window away
        return budget

    async def remove() -> None:
        async with get_client() as client:
            await client.delete_global_concurrency_limit_by_name(name)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        budget = asyncio.run(scenario())
    asyncio.run(remove())
    assert budget._client is None
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_slot_whose_window_passed_serves_our_next_requests_by_renewals_a_few_in_a_row(
    small_limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release and a new lease are two database writes on the server; handing the aged
    lease to the next request is one renewal. A lease serves SERVES_AT_MOST requests in
    a row, then is released (another process gets its chance at the slot); the slot
    count never exceeds the requests of the last window, and an unused spare is freed."""
    calls: list[str] = []
    for method in (
        "increment_concurrency_slots_with_lease",
        "release_concurrency_slots_with_lease",
        "renew_concurrency_lease",
    ):
        real = getattr(PrefectClient, method)

        def counted(*args: object, _real: Any = real, _name: str = method, **kw: object) -> Any:
            calls.append(_name.split("_")[0])
            return _real(*args, **kw)

        monkeypatch.setattr(PrefectClient, method, counted)
    window = 2.0  # limit 2: a pace of 1 s, a spare kept 1.5 s
    budget = PrefectRequestBudget(small_limit, window=window)
    for _ in range(tasks.ratelimit.SERVES_AT_MOST + 1):
        await sent_at_once(budget, 1)
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(small_limit)
        assert limit.active_slots == 1  # the one slot, handed over or taken anew
        await asyncio.sleep(window + 0.6)  # its window has passed: a spare now
    serves = tasks.ratelimit.SERVES_AT_MOST
    assert calls == ["increment", *["renew"] * (serves - 1), "release", "increment"]
    await asyncio.wait(set(budget._releases), timeout=30)
    assert calls[-1] == "release"
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(small_limit)
    assert limit.active_slots == 0


async def test_a_spare_lease_the_server_lost_is_replaced_by_a_new_one(small_limit: str) -> None:
    """A server that lost its leases (a restart of one that keeps them in memory) answers
    the renewal 410: the request takes a new lease instead, and still goes."""
    window = 2.0
    budget = PrefectRequestBudget(small_limit, window=window)
    await sent_at_once(budget, 1)
    await asyncio.sleep(window + 0.6)  # a spare now
    [lost] = budget._spare
    async with get_client() as client:
        await client.release_concurrency_slots_with_lease(lost)  # gone behind its back
    await asyncio.wait_for(sent_at_once(budget, 1), timeout=60)
    assert lost not in budget._slots
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(small_limit)
    assert limit.active_slots == 1  # the new lease's, and no more


def test_no_run_is_stopped_as_stuck_while_another_legitimately_holds_the_slots() -> None:
    """One process may keep a slot for SERVES_AT_MOST requests in a row, each held a window
    and then kept as a spare; another waiting that long must not call the limit stuck
    (a small limit's spare is long: 1.5 x 3,636 s / 10 = 545 s)."""
    budget = PrefectRequestBudget("any", window=3600.0)
    budget._limit = 10
    held = tasks.ratelimit.SERVES_AT_MOST * (budget.window + budget._spare_for)
    assert budget.stuck_after > held
