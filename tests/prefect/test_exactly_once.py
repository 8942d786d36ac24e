"""One idempotency key, one paid video: reruns resume, unknown outcomes stop."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from flows.video import prompt_to_video, topic_to_video
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import DEFAULT_KEY, Simulator
from tasks.submissions import LocalRecords, SubmissionStore, record_path
from tests.helpers import MakeSimulator, exception_text, use_simulator

FAST = WatchSchedule()  # NanoPhoto's seconds: NANOPHOTO_TIME_SCALE compresses them
# Unique per test session, so no record from an earlier session can interfere.
KEYS = {n: f"fox-{n}-{uuid.uuid4().hex[:8]}" for n in range(1, 10)}


async def test_a_rerun_with_the_same_key_resumes_and_pays_once(
    api: Simulator, tmp_path: Path
) -> None:
    first = await topic_to_video(
        topic="A fox", schedule=FAST, output_dir=str(tmp_path), idempotency_key=KEYS[1]
    )
    first_requests = api.snapshot()["total_requests"]
    again = await topic_to_video(
        topic="A fox", schedule=FAST, output_dir=str(tmp_path), idempotency_key=KEYS[1]
    )
    assert again.task_id == first.task_id
    assert again.prompt == first.prompt
    ledger = api.snapshot()
    assert ledger["submits"] == 1
    assert ledger["requests"][DEFAULT_KEY]["generate-prompt"] == 1  # no second prompt
    # Already delivered and still on disk: returned as it was, no new request at all.
    assert ledger["total_requests"] == first_requests
    record = await (await SubmissionStore.default()).read(KEYS[1])
    assert record is not None
    assert (record.state, record.task_id) == ("completed", first.task_id)


async def test_an_interrupted_watch_resumes_the_same_task(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run that stops after its submit: the rerun with its key finishes that task."""
    # 9 s here against a 1.5-s watch: the first run gives up long before, even on a loaded
    # machine (3 s was done by the time a late check came, under two CPU burners).
    api = make_simulator(generation_seconds=(900, 900))
    use_simulator(api, monkeypatch)
    short = WatchSchedule(initial_delay=120, interval=20, max_wait=150)
    state = await prompt_to_video(
        prompt="a fox",
        schedule=short,
        output_dir="",
        idempotency_key=KEYS[2],
        return_state=True,
    )
    assert "WAIT_TIMEOUT" in await exception_text(state)  # the first run gives up
    result = await prompt_to_video(
        prompt="a fox", schedule=FAST, output_dir=str(tmp_path), idempotency_key=KEYS[2]
    )
    ledger = api.snapshot()
    assert ledger["submits"] == 1
    assert result.task_id == ledger["tasks"][0]["task_id"]
    assert Path(str(result.video_path)).is_file()


async def test_an_unknown_outcome_is_never_resubmitted_under_its_key(api: Simulator) -> None:
    api.queue_fault("generate", "dropped_connection_after")
    first = await prompt_to_video(
        prompt="a fox", schedule=FAST, idempotency_key=KEYS[3], return_state=True
    )
    assert "SUBMIT_OUTCOME_UNKNOWN" in await exception_text(first)
    second = await prompt_to_video(
        prompt="a fox", schedule=FAST, idempotency_key=KEYS[3], return_state=True
    )
    message = await exception_text(second)
    assert "SUBMIT_OUTCOME_UNKNOWN" in message
    assert KEYS[3] in message
    assert api.snapshot()["requests"][DEFAULT_KEY]["generate"] == 1


async def test_a_submit_refused_for_sure_may_be_sent_again(api: Simulator, tmp_path: Path) -> None:
    api.queue_fault("generate", *["rate_limited"] * 4)  # more than the client's retries
    first = await prompt_to_video(
        prompt="a fox", schedule=FAST, idempotency_key=KEYS[4], return_state=True
    )
    assert "API_KEY_RATE_LIMIT_EXCEEDED" in await exception_text(first)
    result = await prompt_to_video(
        prompt="a fox", schedule=FAST, output_dir=str(tmp_path), idempotency_key=KEYS[4]
    )
    assert api.snapshot()["submits"] == 1
    assert Path(str(result.video_path)).is_file()


async def test_a_key_reused_for_another_video_is_refused(api: Simulator) -> None:
    await prompt_to_video(prompt="a fox", schedule=FAST, output_dir="", idempotency_key=KEYS[5])
    state = await prompt_to_video(
        prompt="a fox", schedule=FAST, duration=15, idempotency_key=KEYS[5], return_state=True
    )
    assert "idempotency_key" in await exception_text(state)
    assert api.snapshot()["submits"] == 1


async def test_without_a_key_each_run_is_its_own_video(api: Simulator) -> None:
    await prompt_to_video(prompt="a fox", schedule=FAST, output_dir="")
    await prompt_to_video(prompt="a fox", schedule=FAST, output_dir="")
    assert api.snapshot()["submits"] == 2


async def test_after_a_failed_generation_the_key_pays_for_one_new_attempt(
    api: Simulator, tmp_path: Path
) -> None:
    api.queue_fault("generate", "generation_failed")
    state = await prompt_to_video(
        prompt="a fox",
        schedule=FAST,
        output_dir=str(tmp_path),
        idempotency_key=KEYS[6],
        return_state=True,
    )
    assert "GENERATION_FAILED" in await exception_text(state)
    result = await prompt_to_video(
        prompt="a fox", schedule=FAST, output_dir=str(tmp_path), idempotency_key=KEYS[6]
    )
    ledger = api.snapshot()
    assert ledger["submits"] == 2  # the failed one (refunded) and the new attempt
    assert [t["status"] for t in ledger["tasks"]] == ["failed", "completed"]
    assert result.task_id == ledger["tasks"][1]["task_id"]
    record = await (await SubmissionStore.default()).read(KEYS[6])
    assert record is not None
    assert (record.state, record.attempts) == ("completed", 2)
    again = await prompt_to_video(
        prompt="a fox", schedule=FAST, output_dir=str(tmp_path), idempotency_key=KEYS[6]
    )
    assert again.task_id == result.task_id
    assert api.snapshot()["submits"] == 2


async def test_a_key_reused_for_another_prompt_is_refused(api: Simulator) -> None:
    await prompt_to_video(prompt="a fox", schedule=FAST, output_dir="", idempotency_key=KEYS[7])
    state = await prompt_to_video(
        prompt="a whale in space",
        schedule=FAST,
        output_dir="",
        idempotency_key=KEYS[7],
        return_state=True,
    )
    assert "idempotency_key" in await exception_text(state)
    assert api.snapshot()["submits"] == 1


async def test_an_unreadable_record_stops_instead_of_paying_again(
    api: Simulator, tmp_path: Path
) -> None:
    await prompt_to_video(prompt="a fox", schedule=FAST, output_dir="", idempotency_key=KEYS[8])
    store = await SubmissionStore.default()
    assert isinstance(store.files, LocalRecords)
    (store.files.root / record_path(KEYS[8])).write_bytes(b"")  # a write cut short
    state = await prompt_to_video(
        prompt="a fox", schedule=FAST, output_dir="", idempotency_key=KEYS[8], return_state=True
    )
    assert "SUBMISSION_STORAGE_ERROR" in await exception_text(state)
    assert api.snapshot()["submits"] == 1
