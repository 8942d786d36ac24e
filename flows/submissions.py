"""The submissions ledger: every key's video, paid or maybe paid, and the ways out of an unknown.

``list`` publishes the ledger as a table artifact (one row per idempotency
key: state, flow run, time, tier, duration, price, task id, the prompt's
start, and what to do). For a submit whose outcome is unknown (it may have
reached NanoPhoto before its answer was lost), two ways out:

* ``resolve`` with the task id found in the NanoPhoto account: the video is
  watched and downloaded under that key, nothing is submitted;
* ``release``: the person accepts the risk; the next run with that key may
  submit (and may pay twice).
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from pydantic import BaseModel

from flows.forms import described
from flows.pipeline import SubmittedVideo, Watching, finish_and_record, on_our_clock
from flows.video import RESULTS
from nanophoto.contract import PROCESSING
from nanophoto.models import TaskIdText, VideoStatus
from nanophoto.watch import ResumeSchedule
from tasks.observe import best_effort
from tasks.submissions import (
    ItemKey,
    SubmissionRecord,
    SubmissionStore,
    current_flow_run,
    ledger_json,
    ledger_rows,
)
from tasks.video import CheckFailed, OutputDir, check_video_status

Action = Literal["list", "resolve", "release"]
# A key's record may be resolved while nobody knows its video; never over a known one.
_RESOLVABLE = ("sending", "queued", "refused", "released", "failed")


class LedgerReport(BaseModel):
    """What the ledger action did, and the ledger as it is now."""

    action: Action
    key: str | None = None
    state: str | None = None  # the key's record after the action
    task_id: str | None = None
    video_path: str | None = None
    unknown: int  # keys whose submit's outcome is unknown
    records: list[SubmissionRecord]
    unreadable: list[str] = []  # records that cannot be read: a run with their key stops


@flow(name="submissions", flow_run_name="submissions: {action}", **RESULTS)
@described
async def submissions(
    action: Action = "list",
    idempotency_key: ItemKey | None = None,
    task_id: TaskIdText | None = None,
    schedule: ResumeSchedule = ResumeSchedule(),
    output_dir: OutputDir = ".",
) -> LedgerReport:
    """Read the submissions ledger, or resolve or release one key's unknown outcome.

    Args:
        action: list: publish the ledger as a table artifact. resolve: give a key
            the task id found in your NanoPhoto account; its video is watched and
            downloaded, nothing is submitted. release: accept the risk of an
            unknown outcome; the next run with the key may submit (and pay again).
        idempotency_key: The key to resolve or release (a batch item's key is in
            the batch-summary table and in the ledger).
        task_id: For resolve: the NanoPhoto task id of the key's video.
        schedule: For resolve: when to check the video, in NanoPhoto's seconds from now.

    Returns:
        What was done, and every record of the ledger.
    """
    store = await SubmissionStore.default()
    logger = get_run_logger()
    result = None
    record: SubmissionRecord | None = None
    if action != "list":
        if not idempotency_key:
            raise ValueError(f"idempotency_key: needed to {action} a key")
        if action == "resolve" and not task_id:
            raise ValueError("task_id: needed to resolve a key (from your NanoPhoto account)")
        if action == "resolve":
            assert task_id is not None
            checked = await check_video_status(task_id)  # a mistyped id fails: TASK_NOT_FOUND
            if isinstance(checked, CheckFailed):  # a 429 or gateway page: unchecked, not resolved
                raise checked.error
        async with store.holding(idempotency_key):
            record = await store.read(idempotency_key)
            if record is None:
                raise ValueError(
                    f"idempotency_key: no submission is recorded under {idempotency_key!r}"
                )
            if action == "release":
                record = await _release(store, record)
            else:
                assert task_id is not None
                record = await _resolve(store, record, task_id)
        if action == "resolve":
            assert record.task_id is not None
            video = SubmittedVideo(
                status=VideoStatus(task_id=record.task_id, status=PROCESSING),
                submitted_at=time.monotonic(),
                prompt=record.prompt,
                cost=record.cost,
            )
            result = await finish_and_record(
                store, record, video, Watching(on_our_clock(schedule), output_dir)
            )
            record = await store.read(record.key)
        logger.info("%s %s: now %s", action, idempotency_key, record.state if record else "?")
    records, unreadable = await store.all()
    await _publish(records, unreadable)
    return LedgerReport(
        action=action,
        key=idempotency_key,
        state=record.state if record else None,
        task_id=record.task_id if record else None,
        video_path=result.video_path if result else None,
        unknown=sum(r.unknown for r in records),
        records=records,
        unreadable=unreadable,
    )


async def _release(store: SubmissionStore, record: SubmissionRecord) -> SubmissionRecord:
    if record.claimed_by_another(token=""):
        raise ValueError(
            f"idempotency_key: {record.key!r} is being submitted by flow run "
            f"{record.flow_run_id} right now; wait for it"
        )
    if record.state != "sending":
        raise ValueError(
            f"idempotency_key: {record.key!r} is {record.state}, not an unknown outcome: "
            "there is nothing to release"
        )
    return await store.write(
        record.model_copy(
            update={
                "state": "released",
                "note": f"released by flow run {current_flow_run()}: the earlier submit "
                f"({record.cost} credits) may have been charged; the next run may submit",
            }
        )
    )


async def _resolve(
    store: SubmissionStore, record: SubmissionRecord, task_id: str
) -> SubmissionRecord:
    by_hand = record.state == "submitted" and record.note.startswith("resolved by")
    if record.claimed_by_another(token=""):
        raise ValueError(
            f"idempotency_key: {record.key!r} is being submitted by flow run "
            f"{record.flow_run_id} right now; wait for it"
        )
    if record.state not in _RESOLVABLE and not by_hand:
        raise ValueError(
            f"idempotency_key: {record.key!r} is {record.state} with task {record.task_id}: "
            "its video is known, there is nothing to resolve"
        )
    return await store.write(
        record.model_copy(
            update={
                "state": "submitted",
                "task_id": task_id,
                "note": f"resolved by flow run {current_flow_run()} with task {task_id}",
            }
        )
    )


@best_effort
async def _publish(records: list[SubmissionRecord], unreadable: list[str]) -> None:
    """The ledger as a table a person reads in the UI, and as JSON."""
    unknown = sum(r.unknown for r in records)
    headline = f"{len(records)} keys; {unknown} with an unknown outcome (see 'what to do')"
    if unreadable:
        headline += f"; {len(unreadable)} unreadable records"
    await acreate_table_artifact(
        table=ledger_rows(records, unreadable), key="submissions-ledger", description=headline
    )
    await acreate_markdown_artifact(
        markdown=f"# Submissions ledger\n\n{headline}\n\n```json\n{ledger_json(records)}\n```\n",
        key="submissions-ledger-json",
        description="The submissions ledger as JSON",
    )
