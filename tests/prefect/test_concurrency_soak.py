"""Concurrency soak: 50 keys each started twice at one moment, kills at each step, a batch.

Under the fault mix of ``test_soak.py`` (5xx and gateway pages, dropped
connections before and after the server did the work, 429s, cut prompt
streams, failed generations):

1. 15 keys, each started twice at the same moment in this process;
2. 15 keys, each started at the same moment by two worker processes;
3. runs killed with SIGKILL while queued for a rate-limit slot, while their
   submit is on the wire (a slow answer), and while watching; then rerun;
4. a batch of topics; then the batch rerun, reversed.

What must hold, from the simulator's ledger: no key paid twice (a refunded,
failed generation aside); no false unknown outcome (every key whose record is
left ``sending`` had a submit request reach the simulator); every paid task
delivered, or listed in the submissions ledger for a person to resolve; and
the batch's spend what the ledger charged, to the credit (what is unknown to
us, credits at risk, bounded).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from flows.batch import BatchItem, batch_of_videos
from flows.submissions import submissions
from flows.video import prompt_to_video
from nanophoto.errors import NanoPhotoError
from nanophoto_simulator import DEFAULT_KEY, Faults, Simulator
from tasks.submissions import SubmissionStore
from tests.helpers import (
    SOAK_FAULTS,
    SOAK_SEED,
    MakeSimulator,
    lines_of,
    spawn,
    use_simulator,
    wait_for_state,
)

TWINS_HERE = 15
TWINS_ACROSS = 15
KILLED = 5
BATCH = 12


async def run_state(prompt: str, key: str, output: Path | None) -> dict[str, Any]:
    state = await prompt_to_video(
        prompt=prompt,
        output_dir=str(output) if output else "",
        idempotency_key=key,
        return_state=True,
    )
    line: dict[str, Any] = {"key": key, "state": state.type.value}
    try:
        line["task_id"] = (await state.aresult()).task_id
    except NanoPhotoError as error:
        line["code"] = error.code
    return line


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("patient_prefect_client")
async def test_keys_started_twice_killed_and_rerun_never_pay_twice_nor_lose_a_video(
    make_simulator: MakeSimulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    sim = make_simulator(
        generation_seconds=(120, 180),
        faults=SOAK_FAULTS,
        rate_limit=100_000,
        keys={DEFAULT_KEY: 10**6},
        seed=SOAK_SEED,
    )
    use_simulator(sim, monkeypatch)
    tag = uuid.uuid4().hex[:6]
    prompts: dict[str, str] = {}  # key -> prompt: how the ledger names a key's submits
    delivered: dict[str, set[str]] = {}  # key -> task ids runs returned
    outcomes: list[dict[str, Any]] = []

    def job(name: str) -> tuple[str, str]:
        key = f"csoak-{tag}-{name}"
        prompts[key] = f"csoak {tag} {name}: a heron over a misty lake"
        return key, prompts[key]

    def record(lines: list[dict[str, Any]]) -> None:
        for line in lines:
            if "ready" in line:
                continue
            outcomes.append(line)
            if line.get("task_id"):
                delivered.setdefault(line["key"], set()).add(line["task_id"])

    # 1. Twins in one process, 5 keys at a time (10 runs: spare the harness's SQLite).
    gate = asyncio.Semaphore(5)

    async def twins(n: int) -> list[dict[str, Any]]:
        key, prompt = job(f"here-{n}")
        async with gate:  # no download: what is asserted is the task each run returns
            return list(await asyncio.gather(*(run_state(prompt, key, None) for _ in "ab")))

    started = time.monotonic()
    for pair in await asyncio.gather(*(twins(n) for n in range(TWINS_HERE))):
        record(pair)

    # 2. Twins across two worker processes: the same keys, the same order.
    across = [job(f"across-{n}") for n in range(TWINS_ACROSS)]
    runs = [{"prompt": p, "idempotency_key": k, "output_dir": ""} for k, p in across]
    workers = [spawn({"runs": runs, "concurrency": 4}, processes) for _ in "ab"]
    for worker in workers:
        record(lines_of(worker, 600))

    # 3. Kills, faults off so each run is where the test says it is.
    sim.set_faults(Faults())
    queued = [job(f"queued-{n}") for n in range(KILLED)]
    victim = spawn(
        {"runs": [{"prompt": p, "idempotency_key": k} for k, p in queued], "hog_slots": 2},
        processes,
        NANOPHOTO_RATE_LIMIT="2",
    )
    for key, _ in queued:
        await wait_for_state(key, {"queued"}, runner=victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)

    sim.config.faults = Faults(stall_seconds=60_000)
    wire = [job(f"wire-{n}") for n in range(KILLED)]
    sim.queue_fault("generate", *["slow_answer"] * KILLED)
    victim = spawn(
        {"runs": [{"prompt": p, "idempotency_key": k} for k, p in wire], "concurrency": KILLED},
        processes,
    )
    for key, _ in wire:
        await wait_for_state(key, {"sending"}, runner=victim)
    deadline = time.monotonic() + 120
    while sum(sim.snapshot()["submit_requests"].get(p, 0) for _, p in wire) < KILLED:
        assert time.monotonic() < deadline, "the slow submits never reached the simulator"
        await asyncio.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)

    sim.config.faults = Faults()
    # 900 s (9 s here) to watch, under the 1200 s give-up: long enough on a loaded machine
    # that no video is done before every run is seen submitted (the keys are waited on
    # together: one at a time, a late first run let a later one complete first).
    sim.config.generation_seconds = (900, 900)
    watching = [job(f"watch-{n}") for n in range(KILLED)]
    victim = spawn(
        {"runs": [{"prompt": p, "idempotency_key": k} for k, p in watching], "concurrency": KILLED},
        processes,
    )
    await asyncio.gather(
        *(wait_for_state(key, {"submitted"}, runner=victim) for key, _ in watching)
    )
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    sim.config.generation_seconds = (120, 180)

    # Every killed run rerun: queued ones submit, watched ones resume, wired ones are unknown.
    reruns = await asyncio.gather(
        *(run_state(p, k, tmp_path) for k, p in [*queued, *wire, *watching])
    )
    record(reruns)
    by_key = {line["key"]: line for line in reruns}
    assert all(by_key[k]["state"] == "COMPLETED" for k, _ in [*queued, *watching]), reruns
    assert all(by_key[k].get("code") == "SUBMIT_OUTCOME_UNKNOWN" for k, _ in wire), reruns

    # 4. A batch under faults, then rerun reversed: every delivered item costs nothing.
    sim.set_faults(SOAK_FAULTS)
    topics = [f"csoak {tag} batch {i:02d}: lanterns on a canal" for i in range(BATCH)]
    batch_key = f"csoak-{tag}-batch"
    charged_before = sim.snapshot()["credits"][DEFAULT_KEY]
    summary = await batch_of_videos(
        items=[BatchItem(topic=t) for t in topics],
        max_in_flight=6,
        output_dir=str(tmp_path),
        batch_key=batch_key,
    )
    print(
        f"\nconcurrency soak: batch of {BATCH}: {summary.delivered} delivered, "
        f"{summary.failed} failed ({summary.unknown} unknown), {summary.credits_used} credits "
        f"spent, {summary.credits_at_risk} at risk; {time.monotonic() - started:.0f} s so far"
    )
    await _assert_batch_spend_is_the_ledgers(sim, summary, topics, charged_before)
    sim.set_faults(Faults())
    requests = sim.snapshot()["total_requests"]
    rerun = await batch_of_videos(
        items=[BatchItem(topic=t) for t in reversed(topics)],
        credit_budget=0,  # a delivered video costs nothing: never over budget
        output_dir=str(tmp_path),
        batch_key=batch_key,
    )
    delivered_first = {o.item: o.task_id for o in summary.items if o.status == "delivered"}
    for outcome in rerun.items:
        if outcome.item in delivered_first:  # found before any budget was reserved
            assert outcome.status == "delivered"
            assert outcome.task_id == delivered_first[outcome.item]
            assert outcome.credits_used == 0
        else:  # not paid for yet: a budget of 0 keeps it from being sent
            assert outcome.status == "over_budget"
    assert sim.snapshot()["total_requests"] == requests

    # The ledger's verdict over everything.
    figures = await _assert_nothing_paid_twice_nor_lost(sim, prompts, delivered, wire, outcomes)
    codes: dict[str, int] = {}
    for line in outcomes:
        name = line.get("code") or line["state"]
        codes[name] = codes.get(name, 0) + 1
    print(
        f"concurrency soak: {len(prompts)} keys, {len(outcomes)} runs finished "
        f"(+{3 * KILLED} killed), {time.monotonic() - started:.0f} s; run outcomes {codes}; "
        f"{figures}; seed {SOAK_SEED}"
    )


async def _assert_batch_spend_is_the_ledgers(
    sim: Simulator, summary: Any, topics: list[str], before: dict[str, int]
) -> None:
    ledger = sim.snapshot()
    credits = ledger["credits"][DEFAULT_KEY]
    net = (credits["charged"] - before["charged"]) - (credits["refunded"] - before["refunded"])
    assert summary.credits_used <= net <= summary.credits_used + summary.credits_at_risk, summary
    for outcome in summary.items:
        topic = topics[outcome.index]
        prompt_credits = ledger["prompt_charges"].get(topic[:80], 0)
        videos = sum(
            t["cost"]
            for t in ledger["tasks"]
            if t["prompt_head"].startswith(topic[:60]) and t["status"] != "failed"
        )
        charged = prompt_credits + videos
        assert outcome.credits_used <= charged <= outcome.credits_used + outcome.credits_at_risk, (
            outcome,
            prompt_credits,
            videos,
        )


async def _assert_nothing_paid_twice_nor_lost(
    sim: Simulator,
    prompts: dict[str, str],
    delivered: dict[str, set[str]],
    wire: list[tuple[str, str]],
    outcomes: list[dict[str, Any]],
) -> dict[str, int]:
    deadline = time.monotonic() + 60
    while any(t["status"] == "processing" for t in sim.snapshot()["tasks"]):
        assert time.monotonic() < deadline, "tasks still processing a minute after the soak"
        await asyncio.sleep(0.2)
    ledger = sim.snapshot()
    store = await SubmissionStore.default()
    records = {key: await store.read(key) for key in prompts}
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for task in ledger["tasks"]:
        by_prompt.setdefault(task["prompt_head"], []).append(task)
    unknown_listed = {r.key for r in (await submissions(action="list")).records if r.unknown}
    figures = {"paid twice": 0, "false unknowns": 0, "unknowns (request reached)": 0}
    figures |= {"paid, delivered": 0, "paid, listed unknown": 0}
    for key, prompt in prompts.items():
        paid = [t for t in by_prompt.get(prompt[:80], []) if t["status"] != "failed"]
        assert len(paid) <= 1, f"{key} was paid {len(paid)} times"
        assert len(delivered.get(key, set())) <= 1, f"{key} returned two videos"
        record = records[key]
        if record is not None and record.state == "sending":  # an unknown outcome...
            # ...is never false: its submit reached the simulator, and a person can see it.
            assert ledger["submit_requests"].get(prompt[:80], 0) >= 1, f"{key}: false unknown"
            assert key in unknown_listed
            figures["unknowns (request reached)"] += 1
        for task in paid:  # every paid video delivered, or listed to be resolved
            if task["task_id"] in delivered.get(key, set()):
                figures["paid, delivered"] += 1
            else:
                assert key in unknown_listed, f"{key}: paid {task['task_id']}, not delivered"
                figures["paid, listed unknown"] += 1
    assert {k for k, _ in wire} <= unknown_listed
    # No run said "unknown" of a key whose submit was known in the end (a twin that
    # found the other run's submit on the wire waits for its answer instead).
    for line in outcomes:
        if line.get("code") == "SUBMIT_OUTCOME_UNKNOWN":
            final = records[line["key"]]
            state = final.state if final is not None else "absent"
            if state != "sending":
                figures["false unknowns"] += 1
            assert state == "sending", f"{line['key']}: reported unknown, but it ended {state}"
    return figures
