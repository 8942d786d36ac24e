"""A batch follows each part's run to its end: a part left Crashed is scheduled again."""

from __future__ import annotations

import asyncio
import time
from uuid import UUID

import pytest
from prefect import flow, get_client
from prefect.states import Completed, Crashed, Running

import flows.batch
from flows.batch import PART_RESTARTS, _follow_part

# What a worker reports when a run's process exits at its start (its API unreachable).
EXITED = "Flow run infrastructure exited with non-zero status code 1."


@flow(name="part-stand-in")
def part_stand_in() -> None:
    """A flow to create runs of; nothing runs it."""


@pytest.fixture(autouse=True)
def quick_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows.batch, "PART_RESCHEDULE_S", 0.5)
    monkeypatch.setattr(flows.batch, "PART_POLL_S", 0.1)


async def crashed_run() -> UUID:
    async with get_client() as client:
        run = await client.create_flow_run(part_stand_in, state=Crashed(message=EXITED))
    return run.id


async def until_scheduled_again(run_id: UUID, within: float = 30.0) -> str:
    """The name of the Scheduled state the run is put in (bounded wait)."""
    deadline = time.monotonic() + within
    async with get_client() as client:
        while time.monotonic() < deadline:
            state = (await client.read_flow_run(run_id)).state
            if state is not None and state.is_scheduled():
                return str(state.name)
            await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} was never scheduled again")


async def test_a_part_crashed_at_its_start_is_scheduled_again_and_followed_to_its_end() -> None:
    run_id = await crashed_run()
    follow = asyncio.create_task(_follow_part(run_id))
    assert await until_scheduled_again(run_id) == "AwaitingRetry"
    async with get_client() as client:  # a worker takes it, and it completes
        await client.set_flow_run_state(run_id, Running(), force=True)
        await client.set_flow_run_state(run_id, Completed(), force=True)
    run = await asyncio.wait_for(follow, 60)
    assert run is not None
    assert run.state is not None
    assert run.state.is_completed()


async def test_a_part_that_keeps_crashing_is_given_up_after_the_restarts() -> None:
    run_id = await crashed_run()
    follow = asyncio.create_task(_follow_part(run_id))
    for _ in range(PART_RESTARTS):
        await until_scheduled_again(run_id)
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Crashed(message=EXITED), force=True)
    run = await asyncio.wait_for(follow, 60)
    assert run is not None
    assert run.state is not None
    assert run.state.is_crashed()
