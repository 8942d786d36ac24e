"""Fault soak: 45 videos through the flow against a faulty simulator.

Faults on every endpoint: 5xx and gateway pages (12%), dropped connections
(7%), 429s (3%), cut prompt streams (5%) and failed generations (10%). Half
of the gateway pages and drops strike after the server did the work, so some
submits start and are charged while their answer is lost.

What must hold, read from the simulator's ledger:
- no video is ever submitted twice, and every video whose run knew its task
  was submitted exactly once;
- every submitted task ends in a final state;
- credits charged minus refunds equal the cost of the completed videos (plus
  the prompts that were delivered or lost, which NanoPhoto keeps);
- every run ends Completed, or Failed with one of our errors and its code:
  no unhandled exception anywhere.

Then every run is retried with its own idempotency key (faults off), and
what each rerun must do follows from what the ledger says happened to that
video: a completed video comes back with no new submit; an unknown outcome
stops with no new submit; a failed (refunded) generation pays for one new
attempt; a video that never reached a submit (its prompt failed, or its
submit was refused for sure) is submitted once and completes. Paid tasks
whose answer was lost are counted, not hidden.

The simulator's faults are seeded per request (``SORA2_SOAK_SEED``, printed),
so a failing soak can be replayed with the same faults on the same videos.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import State

from flows.video import topic_to_video
from nanophoto.contract import PROMPT_COST
from nanophoto.errors import NanoPhotoError
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import DEFAULT_KEY, Faults
from tests.helpers import SOAK_FAULTS, SOAK_SEED, MakeSimulator, use_simulator

VIDEOS = 45
# The test harness's SQLite server answers 503 (database locked) when many runs
# write at once: 5 at a time, and more client retries, keep it about our code.
CONCURRENCY = 5
# Codes a first-pass run may fail with. Before any submit: the prompt's retries ran
# out, or the submit was refused for sure (429s). After it: the video failed, or the
# submit's outcome is unknown.
BEFORE_SUBMIT = {"INTERNAL_ERROR", "GATEWAY_ERROR", "CONNECTION_DROPPED", "TIMEOUT"}
BEFORE_SUBMIT |= {"API_KEY_RATE_LIMIT_EXCEEDED", "CONNECT_ERROR"}
EXPECTED_FAILURES = {"GENERATION_FAILED", "SUBMIT_OUTCOME_UNKNOWN", *BEFORE_SUBMIT}


# The harness's SQLite server stalls for up to 60 s at a time under these writes (README,
# "Tests"): on a loaded machine the soak has met 3 to 6 of them, and once (two CPU burners
# beside `make test`) 11 in 13.5 minutes, past a 900-s bound. Bounded all the same.
@pytest.mark.timeout(1500)
@pytest.mark.usefixtures("patient_prefect_client")
async def test_forty_five_videos_under_faults_are_paid_once_and_accounted_for(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert SOAK_FAULTS.internal_error + SOAK_FAULTS.gateway_error >= 0.10
    assert SOAK_FAULTS.dropped_connection >= 0.05
    print(f"\nsoak seed {SOAK_SEED} (replay: SORA2_SOAK_SEED={SOAK_SEED})")
    sim = make_simulator(
        generation_seconds=(120, 240),
        faults=SOAK_FAULTS,
        rate_limit=100_000,
        keys={DEFAULT_KEY: 10**6},
        seed=SOAK_SEED,
    )
    use_simulator(sim, monkeypatch)
    schedule = WatchSchedule()  # compressed by NANOPHOTO_TIME_SCALE
    gate = asyncio.Semaphore(CONCURRENCY)

    run_id = uuid.uuid4().hex[:8]

    async def one(index: int) -> State[Any]:
        async with gate:
            state = await topic_to_video(
                topic=f"soak video {index:03d}: a fox crossing snow",
                schedule=schedule,
                output_dir=str(tmp_path),
                idempotency_key=f"soak-{run_id}-{index}",
                return_state=True,
            )
            assert isinstance(state, State)
            return state

    started = time.monotonic()
    states = await asyncio.gather(*(one(i) for i in range(VIDEOS)))
    print(f"\nsoak: {VIDEOS} videos in {time.monotonic() - started:.1f} s")

    # Every run ends Completed, or Failed with one of our errors and its code.
    outcomes: dict[str, int] = {}
    completed: dict[int, Any] = {}
    failed_codes: dict[int, str] = {}
    for index, state in enumerate(states):
        if state.is_completed():
            completed[index] = await state.aresult()
            outcomes["completed"] = outcomes.get("completed", 0) + 1
            continue
        assert state.is_failed(), f"video {index}: {state.type} {state.message}"
        try:
            await state.aresult()
        except NanoPhotoError as error:
            failed_codes[index] = error.code
            outcomes[error.code] = outcomes.get(error.code, 0) + 1
        except Exception as error:  # an unhandled exception: the soak fails
            pytest.fail(f"video {index} failed with {type(error).__name__}: {error}")
    print(f"soak outcomes: {outcomes}")
    assert set(failed_codes.values()) <= EXPECTED_FAILURES, f"seed {SOAK_SEED}"
    assert len(completed) >= VIDEOS // 2

    # Let every submitted task reach its final state at the simulator.
    deadline = time.monotonic() + 30
    while any(t["status"] == "processing" for t in sim.snapshot()["tasks"]):
        assert time.monotonic() < deadline, "tasks still processing 30 s after the soak"
        await asyncio.sleep(0.2)
    ledger = sim.snapshot()
    print(f"soak ledger: {ledger['total_requests']} requests, faults {ledger['faults']}")
    ledger_file = Path(os.environ.get("SORA2_SOAK_LEDGER", tmp_path / "soak-ledger.json"))
    ledger_file.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
    print(f"soak ledger written to {ledger_file}")

    # No video submitted twice; every video that knew its task, submitted once.
    by_video: dict[int, list[dict[str, Any]]] = {}
    for task in ledger["tasks"]:
        index = int(task["prompt_head"].split(":")[0].removeprefix("soak video "))
        by_video.setdefault(index, []).append(task)
    assert all(len(tasks) == 1 for tasks in by_video.values()), "a video was submitted twice"
    for index, result in completed.items():
        assert [t["task_id"] for t in by_video[index]] == [result.task_id]
        assert by_video[index][0]["status"] == "completed"
        assert (tmp_path / f"{result.task_id}.mp4").stat().st_size == result.video_size
    for index, code in failed_codes.items():
        if code == "GENERATION_FAILED":
            assert by_video[index][0]["status"] == "failed"
        elif code in BEFORE_SUBMIT:  # the ledger agrees: nothing was submitted
            assert index not in by_video, f"video {index} ({code}) was submitted; seed {SOAK_SEED}"

    # Every submitted task ended in a final state.
    assert {t["status"] for t in ledger["tasks"]} <= {"completed", "failed"}

    # Charged minus refunded = the videos we delivered, plus the paid tasks whose
    # submit answer was lost (outcome unknown to us: counted, never hidden), plus
    # the prompts NanoPhoto kept.
    credits = ledger["credits"][DEFAULT_KEY]
    prompts = ledger["prompts"]
    kept_prompts = PROMPT_COST * (prompts.get("started", 0) - prompts.get("failed", 0))
    delivered = sum(r.video_credits for r in completed.values())
    unknown = [i for i, code in failed_codes.items() if code == "SUBMIT_OUTCOME_UNKNOWN"]
    lost = [t for i in unknown for t in by_video.get(i, []) if t["status"] == "completed"]
    print(
        f"soak: {len(lost)} of {len(unknown)} unknown-outcome submits were in fact "
        f"processed and charged ({sum(t['cost'] for t in lost)} credits)"
    )
    assert credits["charged"] - credits["refunded"] == (
        delivered + sum(t["cost"] for t in lost) + kept_prompts
    )

    # The faults really were there, at about the rates asked for.
    faults = ledger["faults"]
    total = ledger["total_requests"]
    server_errors = sum(
        faults.get(k, 0) for k in ("internal_error", "gateway_error", "gateway_error_after")
    )
    drops = faults.get("dropped_connection", 0) + faults.get("dropped_connection_after", 0)
    # (Asked: 14% and 7%; these floors sit about 3 standard deviations below.)
    assert server_errors / total >= 0.09
    assert drops / total >= 0.035
    assert faults.get("rate_limited", 0) > 0
    assert sum(1 for t in ledger["tasks"] if t["status"] == "failed") >= 3

    # Second pass: every run retried with its own key, faults off.
    sim.set_faults(Faults())
    before = {i: len(by_video.get(i, [])) for i in range(VIDEOS)}
    again = await asyncio.gather(*(one(i) for i in range(VIDEOS)))
    after: dict[int, int] = {}
    for task in sim.snapshot()["tasks"]:
        index = int(task["prompt_head"].split(":")[0].removeprefix("soak video "))
        after[index] = after.get(index, 0) + 1
    for index, state in enumerate(again):
        where = (
            f"video {index} (first pass: {failed_codes.get(index, 'completed')}; seed {SOAK_SEED})"
        )
        if index in completed:
            assert state.is_completed(), where
            assert (await state.aresult()).task_id == completed[index].task_id, where
            assert after[index] == before[index] == 1, where
        elif failed_codes[index] == "SUBMIT_OUTCOME_UNKNOWN":  # never sent again under that key
            assert state.is_failed(), where
            assert after.get(index, 0) == before[index], where
        else:  # refunded, or never submitted: one new, paid attempt that completes
            assert state.is_completed(), where
            assert after[index] == before[index] + 1, where
