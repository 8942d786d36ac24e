"""Exactly once under crashes and reruns, one case at a time.

A run killed with SIGKILL while queued for a rate-limit slot, while its
submit is on the wire, and while watching; reruns of a delivered batch,
reordered; the ways out of an unknown outcome (resolve, release, the
resubmit policy); a batch's spend against the ledger. Every claim is read
from the simulator's ledger. ``test_concurrency_soak.py`` does all of it at
once, with two runs per key, under faults.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect import flow

from flows.batch import (
    BatchItem,
    CreditBudget,
    ItemOutcome,
    ItemsShare,
    LegacyKeys,
    _make_items,
    batch_of_videos,
)
from flows.pipeline import Spend, SubmittedVideo, Watching, finish_and_record, make_video_once
from flows.submissions import submissions
from flows.video import prompt_to_video
from nanophoto.errors import GenerationFailedError
from nanophoto.models import VideoRequest, VideoResult, VideoStatus, fingerprint
from nanophoto.settings import NanoPhotoSettings
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import Simulator
from tasks.submissions import ClaimLostError, SubmissionRecord, SubmissionStore, record_path
from tasks.video import submit_video
from tests.helpers import (
    MakeSimulator,
    exception_text,
    spawn,
    use_simulator,
    wait_for_state,
)

FAST = WatchSchedule()  # NanoPhoto's seconds: NANOPHOTO_TIME_SCALE compresses them


def fresh(name: str) -> str:
    """A key no earlier test session can have used."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


def submits_per_prompt(simulator: Simulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in simulator.snapshot()["tasks"]:
        counts[task["prompt_head"]] = counts.get(task["prompt_head"], 0) + 1
    return counts


# Two runs with one key at one moment, in one process and in two, are the concurrency
# soak's first two parts (test_concurrency_soak.py), under faults.


# --- killed at each step ------------------------------------------------------------------


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
    record = await wait_for_state(key, {"queued", "sending"}, runner=victim)
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
    await wait_for_state(key, {"sending"}, runner=victim)
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
    # A check that is rate limited cannot vouch for the task id: the key stays unknown.
    api.queue_fault("check-status", "rate_limited")
    unchecked = await submissions(
        action="resolve", idempotency_key=key, task_id=task_id, return_state=True
    )
    assert unchecked.is_failed()
    assert "RATE_LIMIT" in await exception_text(unchecked)
    record = await (await SubmissionStore.default()).read(key)
    assert record is not None
    assert record.state == "sending"
    assert record.task_id is None
    resolved = await submissions(
        action="resolve", idempotency_key=key, task_id=task_id, output_dir=str(tmp_path)
    )
    assert resolved.state == "completed"
    assert Path(str(resolved.video_path)).name == f"{task_id}.mp4"
    again = await prompt_to_video(prompt=prompt, output_dir=str(tmp_path), idempotency_key=key)
    assert again.task_id == task_id
    assert submits_per_prompt(api) == {prompt: 1}


async def test_a_twin_that_finds_the_submit_on_the_wire_waits_for_its_answer(
    api: Simulator, tmp_path: Path
) -> None:
    """Not a false unknown: the first run is alive and will record its answer."""
    key = fresh("twin-wire")
    prompt = "twin wire: a heron in fog"
    # The answer comes 10 s late here: longer than a claim lives unless its run renews it.
    api.config.faults = api.config.faults.model_copy(update={"stall_seconds": 1000})
    api.queue_fault("generate", "slow_answer")
    first = asyncio.create_task(
        prompt_to_video(prompt=prompt, idempotency_key=key, output_dir=str(tmp_path))
    )
    await wait_for_state(key, {"sending"})
    second = await prompt_to_video(prompt=prompt, idempotency_key=key, output_dir=str(tmp_path))
    result = await first
    assert second.task_id == result.task_id
    assert submits_per_prompt(api) == {prompt: 1}
    ledger = await submissions(action="list")
    assert key not in {r.key for r in ledger.records if r.unknown}


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
    await wait_for_state(key, {"submitted"}, runner=victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    result = await prompt_to_video(prompt=prompt, output_dir=str(tmp_path), idempotency_key=key)
    assert submits_per_prompt(simulator) == {prompt: 1}
    assert result.task_id == simulator.snapshot()["tasks"][0]["task_id"]


async def test_a_retried_run_counts_what_its_crashed_attempt_paid_another_run_does_not(
    api: Simulator, tmp_path: Path
) -> None:
    """A flow run retried after its worker died keeps its id: the video its first attempt
    paid for is resumed, not paid again, and still counted as this run's spend (a batch
    part's summary would otherwise under-report what the batch spent). Another run
    finding the same video spent nothing."""
    key = fresh("own")
    request = VideoRequest(prompt="own: a lantern on a canal")
    # make_video_once takes the schedule on the flow's clock, as the flows pass it.
    schedule = WatchSchedule().on_clock(NanoPhotoSettings().time_scale)
    how = Watching(schedule, output_dir=str(tmp_path), artifacts=False)
    first, retried = await _twice_in_one_flow_run(request, key, how)
    assert (first.video_credits, first.earlier) == (request.cost, False)
    assert (retried.video_credits, retried.earlier) == (request.cost, False)  # its own attempt
    assert retried.task_id == first.task_id
    other = await _once_in_a_flow_run(request, key, how)
    assert (other.video_credits, other.earlier) == (0, True)  # another run's video
    assert api.snapshot()["submits"] == 1


async def test_a_video_that_failed_stays_failed_on_the_runs_retry_and_a_new_run_makes_it(
    api: Simulator, tmp_path: Path
) -> None:
    """A run that saw its video fail, then crashed and was retried, ends as it would have
    without the crash: failed, nothing paid again. A new run with the key submits anew."""
    api.queue_fault("generate", "generation_failed")
    key = fresh("failed")
    request = VideoRequest(prompt="failed: a kite over dunes")
    schedule = FAST.on_clock(NanoPhotoSettings().time_scale)
    how = Watching(schedule, output_dir=str(tmp_path), artifacts=False)
    first, retried = await _fails_twice_in_one_flow_run(request, key, how)
    assert (first.task_id, first.video_credits) == (retried.task_id, 0)
    assert api.snapshot()["submits"] == 1  # the retry paid nothing
    again = await _once_in_a_flow_run(request, key, how)
    assert again.task_id != first.task_id
    assert api.snapshot()["submits"] == 2


@flow
async def _fails_twice_in_one_flow_run(
    request: VideoRequest, key: str, how: Watching
) -> tuple[Spend, Spend]:
    first, again = Spend(), Spend()
    with pytest.raises(GenerationFailedError):
        await make_video_once(request, key, how, spend=first)
    with pytest.raises(GenerationFailedError, match="failed in this run before it was retried"):
        await make_video_once(request, key, how, spend=again)  # as the same run, retried
    return first, again


async def test_a_retried_batch_run_gets_back_the_refund_of_a_video_its_crashed_attempt_paid(
    api: Simulator, tmp_path: Path
) -> None:
    """A batch run retried after a crash counts what its first attempt paid as its own
    spend; a video whose generation fails after the retry was refunded, and its credits
    let an item kept out of the budget in (a lost host's batch met it in the topology)."""
    api.queue_fault("generate", "generation_failed")
    items = [BatchItem(prompt=f"refund {n}: a kite over dunes") for n in range(2)]
    outcomes = await _crashed_after_its_first_submit_then_retried(
        items, [fresh("refund"), fresh("refund")], str(tmp_path)
    )
    assert [(o.status, o.error_code) for o in outcomes] == [
        ("failed", "GENERATION_FAILED"),
        ("delivered", None),  # the budget holds one video: the refunded one's
    ]
    assert api.snapshot()["submits"] == 2


class _Crashed(Exception):
    """Stands for the process dying right after a submit."""


@flow
async def _crashed_after_its_first_submit_then_retried(
    items: list[BatchItem], keys: list[str], output_dir: str
) -> list[ItemOutcome]:
    def crash(task_id: str) -> None:
        raise _Crashed(task_id)

    how = Watching(FAST.on_clock(NanoPhotoSettings().time_scale), output_dir, artifacts=False)
    with pytest.raises(_Crashed):  # the first attempt: submitted, then lost
        await make_video_once(items[0].job(), keys[0], how, on_submitted=crash)
    share = ItemsShare(  # own_run: the records are this very flow run's, as after a retry
        indices=[0, 1],
        keys=keys,
        schedule=FAST,
        output_dir=output_dir,
        max_in_flight=1,
        own_run=True,
    )
    outcomes, _ = await _make_items(items, share, CreditBudget(items[0].price), LegacyKeys("", 0))
    return outcomes


@flow
async def _twice_in_one_flow_run(
    request: VideoRequest, key: str, how: Watching
) -> tuple[Spend, Spend]:
    first, again = Spend(), Spend()
    await make_video_once(request, key, how, spend=first)
    await make_video_once(request, key, how, spend=again)  # as the same run, retried
    return first, again


@flow
async def _once_in_a_flow_run(request: VideoRequest, key: str, how: Watching) -> Spend:
    spend = Spend()
    await make_video_once(request, key, how, spend=spend)
    return spend


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


# --- claims: a lease on the key while a run prepares and sends its submit -----------------


async def claimed_record(key: str, prompt: str, *, alive: bool) -> SubmissionRecord:
    """Another run's claim on ``key``: alive (it renews it), or run out (that run stopped)."""
    store = await SubmissionStore.default()
    request = VideoRequest(prompt=prompt)
    until = datetime.now(UTC) + timedelta(seconds=300 if alive else -1)
    record = store.new(key, "queued", fingerprint(request), request).model_copy(
        update={"claim": "another-run:token", "claimed_until": until, "flow_run_id": "other-run"}
    )
    return await store.write(record)


async def test_a_claim_that_ran_out_is_taken_over_and_submitted_once(
    api: Simulator, tmp_path: Path
) -> None:
    key = fresh("expired")
    await claimed_record(key, "expired: a fox", alive=False)
    result = await prompt_to_video(
        prompt="expired: a fox", output_dir=str(tmp_path), idempotency_key=key
    )
    assert Path(str(result.video_path)).is_file()
    assert submits_per_prompt(api) == {"expired: a fox": 1}


async def test_a_live_claim_of_another_run_is_waited_for_then_named(
    api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = fresh("alive")
    await claimed_record(key, "alive: a fox", alive=True)
    monkeypatch.setenv("SORA2_KEY_WAIT", "1")
    state = await prompt_to_video(prompt="alive: a fox", idempotency_key=key, return_state=True)
    message = await exception_text(state)
    assert "IDEMPOTENCY_KEY_IN_USE" in message
    assert "other-run" in message
    assert api.snapshot()["total_requests"] == 0


async def test_a_claim_taken_over_meanwhile_is_never_sent(api: Simulator) -> None:
    """A run whose lease ran out while it waited (a lock server's time-out, a pause) and
    whose key another run claimed: at the last moment before sending, it stops."""
    key = fresh("lost")
    mine = await claimed_record(key, "lost: a fox", alive=True)
    mine = mine.model_copy(update={"claim": "this-run:token"})
    await claimed_record(key, "lost: a fox", alive=True)  # another run claimed it since
    with pytest.raises(ClaimLostError):
        await submit_video(mine, VideoRequest(prompt="lost: a fox"))
    assert api.snapshot()["submit_requests"] == {}


async def test_a_late_watcher_never_records_over_a_newer_attempt(api: Simulator) -> None:
    key = fresh("late")
    store = await SubmissionStore.default()
    request = VideoRequest(prompt="late: a fox")
    first = store.new(key, "submitted", fingerprint(request), request).model_copy(
        update={"task_id": "task_first"}
    )
    newer = await store.write(first.model_copy(update={"attempts": 2, "task_id": "task_newer"}))
    failed = SubmittedVideo(
        status=VideoStatus(task_id="task_first", status="failed"), submitted_at=time.monotonic()
    )
    how = Watching(WatchSchedule(), output_dir="", artifacts=False)
    with pytest.raises(GenerationFailedError):
        await _finish_in_a_flow(store, first, failed, how)
    kept = await store.read(key)
    assert kept is not None
    assert (kept.attempts, kept.task_id, kept.state) == (newer.attempts, "task_newer", "submitted")


@flow
async def _finish_in_a_flow(
    store: SubmissionStore, record: SubmissionRecord, video: SubmittedVideo, how: Watching
) -> VideoResult:
    return await finish_and_record(store, record, video, how)


async def test_a_batch_run_by_an_earlier_version_is_found_under_its_old_keys(
    api: Simulator, tmp_path: Path
) -> None:
    """Positional keys (``<batch key>:<n>``), from before keys were fingerprints: a rerun
    with the items reordered still finds each item's video and pays nothing."""
    batch_key = fresh("legacy")
    items = [BatchItem(prompt=f"Legacy {i}: a kite over dunes") for i in range(3)]
    first = await batch_of_videos(items=items, output_dir=str(tmp_path), batch_key=batch_key)
    store = await SubmissionStore.default()
    for outcome in first.items:  # move each record to where an earlier version kept it
        record = await store.read(outcome.key)
        assert record is not None
        await store.write(record.model_copy(update={"key": f"{batch_key}:{outcome.index}"}))
        (store.files.root / record_path(outcome.key)).unlink()  # type: ignore[attr-defined]
    requests = api.snapshot()["total_requests"]
    again = await batch_of_videos(
        items=list(reversed(items)), credit_budget=0, output_dir=str(tmp_path), batch_key=batch_key
    )
    assert again.delivered == 3
    assert api.snapshot()["total_requests"] == requests
    assert {o.task_id for o in again.items} == {o.task_id for o in first.items}
