"""The batch flow: isolation, credit budget, rate budget, reports, and reruns."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import ParameterTypeError
from prefect.logging.handlers import APILogHandler

from flows.batch import BatchItem, batch_of_videos
from flows.video import topic_to_video
from nanophoto.contract import ModelTier
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import DEFAULT_KEY
from nanophoto_simulator.server import Simulator
from tasks.ratelimit import RATE_LIMIT_NAME, create_rate_limit
from tests.helpers import SESSION_RATE_LIMIT, MakeSimulator, exception_text, use_simulator

FAST = WatchSchedule()  # NanoPhoto's seconds: NANOPHOTO_TIME_SCALE compresses them


async def test_one_failure_never_fails_the_others_and_the_budget_holds(
    api: Simulator, tmp_path: Path
) -> None:
    items = [
        BatchItem(topic="A fox at dawn"),  # 2 + 4
        BatchItem(prompt="A lighthouse in a storm", duration=15),  # 8
        BatchItem(topic="A city at night", model_tier=ModelTier.PRO_STANDARD),  # 2 + 60: over
        BatchItem(prompt="Waves on a black beach"),  # 4
    ]
    # The first video submitted fails server-side: NanoPhoto refunds it.
    api.queue_fault("generate", "generation_failed")
    state = await batch_of_videos(
        items=items,
        credit_budget=30,
        max_in_flight=1,  # in order, so which one fails is known
        schedule=FAST,
        output_dir=str(tmp_path),
        return_state=True,
    )
    summary = await state.aresult()
    statuses = [o.status for o in summary.items]
    assert statuses == ["failed", "delivered", "over_budget", "delivered"]
    assert summary.items[0].error_code == "GENERATION_FAILED"
    assert summary.items[0].credits_used == 2  # the prompt; the video was refunded
    assert (summary.delivered, summary.failed, summary.over_budget) == (2, 1, 1)
    ledger = api.snapshot()
    # The item over budget was never sent: not its prompt, not its submit.
    assert ledger["submits"] == 3
    assert ledger["requests"][DEFAULT_KEY]["generate-prompt"] == 1
    credits = ledger["credits"][DEFAULT_KEY]
    assert credits["charged"] - credits["refunded"] == summary.credits_used == 2 + 8 + 4
    assert ledger["rate_limited"] == {}
    for outcome in summary.items:
        if outcome.status == "delivered":
            assert outcome.video_path is not None
            saved = Path(outcome.video_path)
            assert saved.name == f"{outcome.task_id}.mp4"
            assert saved.stat().st_size == outcome.video_size
    assert summary.requests == ledger["total_requests"]
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batch-summary"]))
        )
    assert artifacts
    assert artifacts[0].type == "table"
    # Batches are told apart by their first item, and show how far along they are.
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        mine = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert flow_run.name == "batch of 4: A fox at dawn"
    # No task run per step: plain calls (a task run per step was most of Prefect's work
    # per item); the table above, the events and the run's logs show each item.
    async with get_client() as client:
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert [run.name for run in task_runs] == []
    await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    text = "\n".join(log.message for log in logs)
    for outcome in summary.items:
        if outcome.task_id:  # each paid video is on the run's page: submitted, and saved
            assert f"submitted {outcome.task_id}" in text, text
    assert text.count("saved ") == 2, text
    [progress] = [a for a in mine if a.type == "progress"]
    assert progress.data == 100.0
    assert progress.description is not None
    assert progress.description.startswith("Batch: 4 of 4 finished")
    assert "2 delivered" in progress.description


async def test_a_bad_item_is_refused_by_index_before_anything_is_paid(api: Simulator) -> None:
    items = [
        {"topic": "A fox at dawn"},
        {"prompt": "A cat", "mode": "imageToVideo"},  # no images
    ]
    with pytest.raises(ParameterTypeError, match=r"items\.1\W.*image_urls"):
        await batch_of_videos(items=items, schedule=FAST, output_dir="")  # type: ignore[arg-type]
    with pytest.raises(ParameterTypeError, match="topic or a prompt"):
        await batch_of_videos(items=[{"technique": "pov"}], schedule=FAST)  # type: ignore[list-item]
    assert api.snapshot()["total_requests"] == 0


async def test_the_shared_limit_must_exist(api: Simulator) -> None:
    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(RATE_LIMIT_NAME)
    try:
        with pytest.raises(RuntimeError, match="RATE_LIMIT_MISSING"):
            await batch_of_videos(
                items=[BatchItem(prompt="A cat on a piano")], schedule=FAST, output_dir=""
            )
    finally:
        await create_rate_limit(SESSION_RATE_LIMIT)
    assert api.snapshot()["total_requests"] == 0


async def test_a_batch_in_parts_needs_the_part_deployment_and_says_so(api: Simulator) -> None:
    state = await batch_of_videos(
        items=[BatchItem(prompt="A cat on a piano"), BatchItem(prompt="A dog on a drum")],
        schedule=FAST,
        output_dir="",
        parts=2,
        return_state=True,
    )
    assert state.is_failed()
    assert "batch-part/pool" in await exception_text(state)
    assert api.snapshot()["total_requests"] == 0  # nothing reserved, nothing sent


async def test_a_tight_budget_is_never_exceeded_and_binds_the_checks(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # 30 requests per compressed hour (36 s), generations of 1.2-4.8 s.
    simulator = make_simulator(rate_limit=30, seed=3)
    use_simulator(simulator, monkeypatch)
    items = [BatchItem(prompt=f"Scene {i}: a paper boat in the rain") for i in range(12)]
    summary = await batch_of_videos(
        items=items, max_in_flight=6, schedule=FAST, output_dir=str(tmp_path)
    )
    ledger = simulator.snapshot()
    assert ledger["rate_limited"] == {}
    assert summary.delivered == 12
    # Checks went where videos were done: close to one per video.
    checks = ledger["requests"][DEFAULT_KEY]["check-status"]
    assert checks <= 12 * 1.5, checks
    # The planner saw the budget bind: the six first submits were paced, one every
    # hour / 30 = 120 simulated s, not sent in a burst (allow one pace of jitter).
    submits = sorted(task["submitted_at"] for task in ledger["tasks"])
    assert submits[5] - submits[0] >= 4 * 120.0, submits


async def _prompt_records(flow_run_id: UUID | None) -> list[str]:
    """The log records of a run that carry its prompt, as the Prefect server stored them."""
    await APILogHandler.aflush()  # logs go out in batches: the last ones may still be queued
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs if log.message.startswith("prompt | ")]


async def test_a_batch_logs_each_prompt_in_one_record_a_single_video_line_by_line(
    api: Simulator, tmp_path: Path
) -> None:
    """A person watching one video sees its prompt as it is written; a batch stores one
    record per prompt (a dozen lines each would be most of what its server stores)."""
    one = await topic_to_video(
        topic="Logs: a fox at dawn", schedule=FAST, output_dir=str(tmp_path), return_state=True
    )
    lines = await _prompt_records(one.state_details.flow_run_id)
    assert len(lines) > 3  # one record per line, as it arrived
    assert all("\n" not in line for line in lines)
    batch = await batch_of_videos(
        items=[BatchItem(topic=f"Logs {i}: a heron in the reeds") for i in range(2)],
        output_dir=str(tmp_path),
        return_state=True,
    )
    records = await _prompt_records(batch.state_details.flow_run_id)
    assert len(records) == 2, records
    for record in records:
        assert record.count("\n") >= 3  # the whole prompt, each line marked as streamed ones are
        assert all(line.startswith("prompt | ") for line in record.splitlines())
