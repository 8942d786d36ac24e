"""Exactly once under concurrency, crashes and reruns.

Two runs with one key at the same moment, in one process and in two; a run
killed with SIGKILL while queued for a rate-limit slot, while its submit is on
the wire, and while watching; reruns of a delivered batch, reordered; and the
ways out of an unknown outcome (resolve, release, the resubmit policy).
Every claim is read from the simulator's ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from flows.batch import BatchItem, batch_of_videos
from flows.submissions import submissions
from flows.video import prompt_to_video
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import Simulator
from tasks.submissions import SubmissionStore
from tests.helpers import MakeSimulator, exception_text, use_simulator

PROJECT = Path(__file__).resolve().parents[2]
FAST = WatchSchedule()  # NanoPhoto's seconds: NANOPHOTO_TIME_SCALE compresses them


def fresh(name: str) -> str:
    """A key no earlier test session can have used."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


def submits_per_prompt(simulator: Simulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in simulator.snapshot()["tasks"]:
        counts[task["prompt_head"]] = counts.get(task["prompt_head"], 0) + 1
    return counts


# --- one key, two runs, one moment ---------------------------------------------------------


async def test_two_runs_with_one_key_at_the_same_moment_pay_once_and_share_the_video(
    api: Simulator, tmp_path: Path
) -> None:
    keys = [fresh(f"twin-{n}") for n in range(6)]

    async def twice(n: int, key: str) -> list[Any]:
        prompt = f"twin {n}: a heron lifting off a pond"
        return list(
            await asyncio.gather(
                *(
                    prompt_to_video(
                        prompt=prompt,
                        output_dir=str(tmp_path),
                        idempotency_key=key,
                        return_state=True,
                    )
                    for _ in range(2)
                )
            )
        )

    pairs = await asyncio.gather(*(twice(n, key) for n, key in enumerate(keys)))
    counts = submits_per_prompt(api)
    assert all(count == 1 for count in counts.values()), counts
    assert len(counts) == len(keys)
    for first, second in pairs:
        assert first.is_completed(), await exception_text(first)
        assert second.is_completed(), await exception_text(second)
        assert (await first.aresult()).task_id == (await second.aresult()).task_id


def runner_env() -> dict[str, str]:
    """This test session's Prefect server and result storage, for another process."""
    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def spawn(
    spec: dict[str, Any], started: list[subprocess.Popen[str]], **env: str
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.prefect.runner", json.dumps(spec)],
        cwd=PROJECT,
        env={**runner_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    started.append(process)
    return process


def lines_of(process: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    out, _ = process.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def test_two_processes_with_the_same_keys_pay_once_per_key(
    api: Simulator, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    keys = [fresh(f"pair-{n}") for n in range(8)]
    runs = [
        {
            "prompt": f"pair {n}: lanterns on a river",
            "idempotency_key": key,
            "output_dir": str(tmp_path),
        }
        for n, key in enumerate(keys)
    ]
    # The same order in both: each key is started by both processes at about one moment.
    a = spawn({"runs": runs, "concurrency": 2}, processes)
    b = spawn({"runs": runs, "concurrency": 2}, processes)
    ended = lines_of(a, 240) + lines_of(b, 240)
    counts = submits_per_prompt(api)
    assert len(counts) == len(keys), counts
    assert set(counts.values()) == {1}, counts
    finished = [line for line in ended if "ready" not in line]
    assert len(finished) == 2 * len(keys)
    assert all(line["state"] == "COMPLETED" for line in finished), finished
    by_key: dict[str, set[str]] = {}
    for line in finished:
        by_key.setdefault(line["key"], set()).add(line["task_id"])
    assert all(len(task_ids) == 1 for task_ids in by_key.values())


# --- killed at each step ------------------------------------------------------------------


async def wait_for_state(key: str, states: set[str], within: float = 120) -> Any:
    deadline = time.monotonic() + within
    store = await SubmissionStore.default()
    while time.monotonic() < deadline:
        record = await store.read(key)
        if record is not None and record.state in states:
            return record
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} never reached {states}")


async def test_killed_while_queued_for_a_slot_nothing_was_sent_and_a_rerun_submits_once(
    api: Simulator, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    simulator = api
    key = fresh("queued")
    prompt = "queued: a kite over dunes"
    # The other process spends its budget's 2 slots first: its submit waits for a slot.
    victim = spawn(
        {"runs": [{"prompt": prompt, "idempotency_key": key}], "hog_slots": 2},
        processes,
        NANOPHOTO_RATE_LIMIT="2",
    )
    record = await wait_for_state(key, {"queued", "sending"})
    assert record.state == "queued"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert simulator.snapshot()["submit_requests"].get(prompt, 0) == 0  # nothing left
    result = await prompt_to_video(prompt=prompt, output_dir=str(tmp_path), idempotency_key=key)
    assert submits_per_prompt(simulator) == {prompt: 1}
    assert Path(str(result.video_path)).is_file()


async def test_killed_while_the_submit_was_on_the_wire_is_an_unknown_that_resolve_finishes(
    api: Simulator, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    key = fresh("wire")
    prompt = "wire: a train crossing a viaduct"
    api.config.faults = api.config.faults.model_copy(update={"stall_seconds": 6000})
    api.queue_fault("generate", "slow_answer")  # the origin works, then holds the answer
    victim = spawn({"runs": [{"prompt": prompt, "idempotency_key": key}]}, processes)
    await wait_for_state(key, {"sending"})
    deadline = time.monotonic() + 60
    while not api.snapshot()["tasks"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    # The request reached NanoPhoto: a true unknown, never sent again.
    state = await prompt_to_video(prompt=prompt, idempotency_key=key, return_state=True)
    message = await exception_text(state)
    assert "SUBMIT_OUTCOME_UNKNOWN" in message
    assert "resolve" in message
    assert "release" in message
    ledger = await submissions(action="list")
    assert key in {r.key for r in ledger.records if r.unknown}
    # The person finds the task in their NanoPhoto account and resolves the key with it.
    task_id = api.snapshot()["tasks"][0]["task_id"]
    resolved = await submissions(
        action="resolve", idempotency_key=key, task_id=task_id, output_dir=str(tmp_path)
    )
    assert resolved.state == "completed"
    assert Path(str(resolved.video_path)).name == f"{task_id}.mp4"
    again = await prompt_to_video(prompt=prompt, output_dir=str(tmp_path), idempotency_key=key)
    assert again.task_id == task_id
    assert submits_per_prompt(api) == {prompt: 1}


async def test_killed_while_watching_the_rerun_resumes_the_same_task(
    make_simulator: MakeSimulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    simulator = make_simulator(generation_seconds=(400, 400))
    use_simulator(simulator, monkeypatch)
    key = fresh("watch")
    prompt = "watch: fog rolling over a bridge"
    victim = spawn({"runs": [{"prompt": prompt, "idempotency_key": key}]}, processes)
    await wait_for_state(key, {"submitted"})
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    result = await prompt_to_video(prompt=prompt, output_dir=str(tmp_path), idempotency_key=key)
    assert submits_per_prompt(simulator) == {prompt: 1}
    assert result.task_id == simulator.snapshot()["tasks"][0]["task_id"]


# --- the ways out of an unknown outcome ------------------------------------------------------


async def test_release_lets_the_next_run_submit_again(api: Simulator, tmp_path: Path) -> None:
    key = fresh("release")
    api.queue_fault("generate", "dropped_connection_after")
    first = await prompt_to_video(prompt="release: a fox", idempotency_key=key, return_state=True)
    assert "SUBMIT_OUTCOME_UNKNOWN" in await exception_text(first)
    released = await submissions(action="release", idempotency_key=key)
    assert released.state == "released"
    result = await prompt_to_video(
        prompt="release: a fox", output_dir=str(tmp_path), idempotency_key=key
    )
    assert Path(str(result.video_path)).is_file()
    assert submits_per_prompt(api) == {"release: a fox": 2}  # the risk the person accepted


async def test_the_resubmit_policy_sends_a_cheap_unknown_again_and_says_so(
    api: Simulator, tmp_path: Path
) -> None:
    key = fresh("policy")
    api.queue_fault("generate", "dropped_connection_after")
    await prompt_to_video(prompt="policy: a fox", idempotency_key=key, return_state=True)
    refused = await prompt_to_video(
        prompt="policy: a fox",
        idempotency_key=key,
        resubmit_unknown_up_to_credits=3,  # the video costs 4: still not sent again
        return_state=True,
    )
    assert "SUBMIT_OUTCOME_UNKNOWN" in await exception_text(refused)
    await prompt_to_video(
        prompt="policy: a fox",
        output_dir=str(tmp_path),
        idempotency_key=key,
        resubmit_unknown_up_to_credits=4,
    )
    record = await (await SubmissionStore.default()).read(key)
    assert record is not None
    assert (record.state, record.possibly_charged_twice) == ("completed", True)
    assert submits_per_prompt(api) == {"policy: a fox": 2}


# --- batch reruns: looked up before any budget is reserved --------------------------------


async def test_a_delivered_batch_rerun_costs_nothing_even_reordered(
    api: Simulator, tmp_path: Path
) -> None:
    batch_key = fresh("batch")
    items = [BatchItem(prompt=f"Scene {i}: a paper boat in the rain") for i in range(20)]
    items.append(BatchItem(prompt="Scene 0: a paper boat in the rain"))  # twice the same
    first = await batch_of_videos(
        items=items, credit_budget=100, output_dir=str(tmp_path), batch_key=batch_key
    )
    assert first.delivered == 21
    assert first.credits_used == 84 == api.snapshot()["credits"]["sim-key"]["charged"]
    requests = api.snapshot()["total_requests"]
    again = await batch_of_videos(
        items=items, credit_budget=20, output_dir=str(tmp_path), batch_key=batch_key
    )
    assert (again.delivered, again.over_budget, again.credits_used) == (21, 0, 0)
    assert api.snapshot()["total_requests"] == requests
    reordered = await batch_of_videos(
        items=list(reversed(items)), credit_budget=0, output_dir=str(tmp_path), batch_key=batch_key
    )
    assert reordered.delivered == 21
    assert api.snapshot()["total_requests"] == requests
    first_ids = {(o.item, o.key): o.task_id for o in first.items}
    for outcome in reordered.items:
        assert first_ids[(outcome.item, outcome.key)] == outcome.task_id
    assert len({o.task_id for o in first.items}) == 21  # identical items are two videos


async def test_a_batchs_spend_is_what_the_ledger_charged(api: Simulator, tmp_path: Path) -> None:
    api.queue_fault("generate", "generation_failed", "dropped_connection_after", "rate_limited")
    api.queue_fault("generate-prompt", "gateway_error_after")
    items = [BatchItem(topic=f"Spend {i}: a lighthouse at dusk") for i in range(6)]
    summary = await batch_of_videos(
        items=items, max_in_flight=1, output_dir=str(tmp_path), batch_key=fresh("spend")
    )
    credits = api.snapshot()["credits"]["sim-key"]
    net = credits["charged"] - credits["refunded"]
    assert summary.unknown == 1
    assert summary.credits_used <= net <= summary.credits_used + summary.credits_at_risk
    # Here every credit at risk was in fact kept: a lost submit answer, a lost prompt.
    assert net == summary.credits_used + summary.credits_at_risk
