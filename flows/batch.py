"""Many videos in one run: concurrent pipelines under a credit budget and the key's rate budget.

Each item is its own pipeline (prompt, submit, watch, download). One item's
failure never stops the others: the batch reports what each became. Before
an item is submitted its price comes from the cost table; an item that would
take the batch over its credit budget is not submitted, and is reported.
Checks are timed by ``nanophoto.planner.BudgetPlanner``, so a batch the
key's hourly request limit cannot watch eagerly still makes the most videos.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Annotated, Literal, Self

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, model_validator

from flows.forms import described
from flows.pipeline import Watching, finish_earlier_attempt, submit_and_finish
from flows.video import RESULTS
from nanophoto.contract import PROMPT_COST
from nanophoto.errors import GenerationFailedError, NanoPhotoError, SubmitOutcomeUnknownError
from nanophoto.models import (
    PromptOptions,
    PromptRequest,
    PromptText,
    Topic,
    VideoJob,
    VideoOptions,
    VideoRequest,
    VideoResult,
    fingerprint,
)
from nanophoto.planner import BudgetPlanner
from nanophoto.settings import NanoPhotoSettings
from nanophoto.watch import CheckPlan, WatchSchedule
from tasks.observe import BatchProgress, best_effort
from tasks.ratelimit import shared_limiter
from tasks.submissions import IdempotencyKey, resolve_idempotency_key
from tasks.video import generate_prompt

ItemStatus = Literal["delivered", "failed", "over_budget"]


class BatchItem(VideoOptions, PromptOptions):
    """One video of a batch: a topic (a prompt is written first) or a ready prompt.

    Its options are the same fields, with the same descriptions, as the
    flows' (``nanophoto.models``); the prompt options apply to topics only.
    """

    topic: Topic | None = Field(
        None,
        title="Topic",
        description=str(PromptRequest.model_fields["topic"].description)
        + " Give a topic or a prompt.",
    )
    prompt: PromptText | None = Field(
        None,
        title="Prompt",
        description=str(VideoRequest.model_fields["prompt"].description)
        + " Give a topic or a prompt.",
    )

    @model_validator(mode="after")
    def _topic_or_prompt(self) -> Self:
        """A topic or a prompt: checked, with the options, before anything is paid."""
        if (self.topic is None) == (self.prompt is None):
            raise ValueError("give either a topic or a prompt, not both and not neither")
        return self

    def job(self) -> VideoJob:
        """What this item makes: a topic's prompt and video, or a ready prompt's video."""
        values = self.model_dump()
        return PromptRequest.pick(values) if self.topic is not None else VideoRequest.pick(values)

    @property
    def price(self) -> int:
        """Credits the item costs: its prompt, if it has a topic, and its video."""
        return self.job().price

    @property
    def label(self) -> str:
        """The item as a person knows it, in a table cell."""
        text = " ".join((self.topic or self.prompt or "").split())
        return text[:60] + ("…" if len(text) > 60 else "")


class ItemOutcome(BaseModel):
    """What one item of the batch became."""

    index: int
    item: str
    status: ItemStatus
    price: int
    credits_used: int = 0  # what this run spent on it (an earlier run's video: 0)
    task_id: str | None = None
    video_path: str | None = None
    video_size: int | None = None
    video_sha256: str | None = None
    error_code: str | None = None
    error: str | None = None
    seconds: float = 0.0


class BatchSummary(BaseModel):
    """The whole batch: counts, credits and every item's outcome."""

    delivered: int
    failed: int
    over_budget: int
    credit_budget: int | None
    credits_used: int
    requests: int
    seconds: float
    items: list[ItemOutcome]


class CreditBudget:
    """Credits the batch may still commit; an item reserves its price before it starts."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.committed = 0

    def reserve(self, price: int) -> bool:
        """Take ``price`` if it fits; False (nothing taken) if it would go over."""
        if self.limit is not None and self.committed + price > self.limit:
            return False
        self.committed += price
        return True

    def settle(self, reserved: int, spent: int) -> None:
        """Give back what an item reserved but did not spend (refunds, refusals)."""
        self.committed += spent - reserved


def _batch_run_name() -> str:
    """``batch of 3: A paper boat in a rain gutter…``: the first item tells batches apart."""
    items = flow_run.parameters.get("items") or []
    first = items[0] if items else {}
    if isinstance(first, BaseModel):
        first = first.model_dump()
    text = ""
    if isinstance(first, dict):
        text = " ".join(str(first.get("topic") or first.get("prompt") or "").split())
    label = text[:50] + ("…" if len(text) > 50 else "")
    return f"batch of {len(items)}: {label}" if label else f"batch of {len(items)}"


@flow(name="batch-of-videos", flow_run_name=_batch_run_name, **RESULTS)
@described
async def batch_of_videos(
    items: list[BatchItem],
    credit_budget: int | None = None,
    max_in_flight: Annotated[int, Field(ge=1, le=1000)] = 10,
    schedule: WatchSchedule = WatchSchedule(),
    output_dir: str = "videos",
    batch_key: IdempotencyKey | None = None,
) -> BatchSummary:
    """Make many videos at once: each item a topic or a ready prompt, with its own options.

    Args:
        items: The videos to make. Each has a topic (its prompt is written first, and
            paid for) or a ready prompt, and optionally its own technique, locale, mode,
            image_urls, model_tier, aspect_ratio and duration.
        credit_budget: Most credits the batch may spend (prompts and videos, from the
            cost table). Items that would go over it are not submitted and are
            reported. Empty: no budget.
        max_in_flight: Most videos being prompted, generated or downloaded at once.
        schedule: The checks' rhythm, in NanoPhoto's seconds, when the key's request
            budget allows it (first check, interval, when to stop watching); when it
            does not, checks are timed by the generation times seen so far.
        batch_key: Runs with the same key make each item's video once, paid once
            (item n's key is the batch key followed by ":n"). 1 to 200 letters,
            digits and the characters _ . : - (no spaces). Empty: this flow run's id.

    Returns:
        Counts, credits, requests, and each item's outcome (task id, file, checksum,
        or why it failed or was skipped).
    """
    logger = get_run_logger()
    if not items:
        raise ValueError("items: give at least one topic or prompt")
    if credit_budget is not None and credit_budget < 0:
        raise ValueError("credit_budget: must be 0 or more (empty for no budget)")
    key = resolve_idempotency_key(batch_key)
    settings = NanoPhotoSettings()
    schedule = schedule.on_clock(settings.time_scale)
    topics = sum(item.topic is not None for item in items)
    planner = BudgetPlanner(
        schedule,
        requests_per_window=settings.rate_limit,
        window=settings.rate_window,
        max_in_flight=max_in_flight,
        requests_per_item=1 + round(topics / len(items)),
        api_second=settings.time_scale,
    )
    planner.queued = len(items)
    credits = CreditBudget(credit_budget)
    slots = asyncio.Semaphore(max_in_flight)
    started = time.monotonic()
    limiter = shared_limiter(settings)
    granted_before = limiter.granted_total

    progress = BatchProgress(len(items), schedule.expected_generation)

    async def run(index: int, item: BatchItem) -> ItemOutcome:
        async with slots:
            planner.queued -= 1
            outcome = await _run_item(
                index, item, f"{key}:{index}", schedule, output_dir, planner, credits, progress
            )
        progress.finished(index, outcome.status)
        await progress.show()
        return outcome

    async def keep_progress_moving() -> None:
        while True:
            await progress.show()
            await asyncio.sleep(progress.tick_seconds)

    ticker = asyncio.create_task(keep_progress_moving())
    try:
        outcomes = await asyncio.gather(*(run(i, item) for i, item in enumerate(items)))
    finally:
        ticker.cancel()
    summary = BatchSummary(
        delivered=sum(o.status == "delivered" for o in outcomes),
        failed=sum(o.status == "failed" for o in outcomes),
        over_budget=sum(o.status == "over_budget" for o in outcomes),
        credit_budget=credit_budget,
        credits_used=sum(o.credits_used for o in outcomes),
        requests=limiter.granted_total - granted_before,
        seconds=round(time.monotonic() - started, 3),
        items=list(outcomes),
    )
    await _publish(summary)
    logger.info(
        "batch done: %d delivered, %d failed, %d over budget; %d credits, %d requests",
        summary.delivered,
        summary.failed,
        summary.over_budget,
        summary.credits_used,
        summary.requests,
    )
    if summary.delivered == 0 and summary.failed:
        codes = Counter(o.error_code for o in outcomes if o.status == "failed")
        reasons = ", ".join(f"{code} x{count}" for code, count in codes.most_common())
        raise RuntimeError(
            f"no video of the batch was delivered ({summary.failed} failed: {reasons}; "
            f"{summary.over_budget} over budget); see the batch-summary artifact"
        )
    return summary


async def _run_item(
    index: int,
    item: BatchItem,
    key: str,
    schedule: WatchSchedule,
    output_dir: str,
    planner: BudgetPlanner,
    credits: CreditBudget,
    progress: BatchProgress,
) -> ItemOutcome:
    """One item's pipeline; whatever goes wrong is its outcome, never the batch's."""
    logger = get_run_logger()
    outcome = ItemOutcome(index=index, item=item.label, status="failed", price=item.price)
    if not credits.reserve(item.price):
        logger.warning(
            "item %d (%s) not submitted: %d credits would exceed the budget of %s (%d committed)",
            index,
            item.label,
            item.price,
            credits.limit,
            credits.committed,
        )
        return outcome.model_copy(update={"status": "over_budget"})
    started = time.monotonic()
    prompt_credits = 0
    paid: str | None = None  # the task id, once this run submitted it
    watched: str | None = None  # the task id, once watched (this run's or an earlier one)

    def plan(task_id: str, submitted_at: float) -> CheckPlan:
        nonlocal watched
        watched = task_id
        progress.watching(index, submitted_at)
        return planner.track(task_id, item.model_tier, item.duration, submitted_at)

    def submitted(task_id: str) -> None:
        nonlocal paid, watched
        paid = watched = task_id

    job = item.job()
    how = Watching(schedule, output_dir, plan=plan, artifacts=False, checks_as_tasks=False)
    try:
        print_ = fingerprint(job)
        earlier = await finish_earlier_attempt(key, print_, how)
        if earlier.result is not None:
            result = earlier.result
        else:
            prompt_seconds, text = 0.0, item.prompt or ""
            if isinstance(job, PromptRequest):
                generated = await generate_prompt(job)
                prompt_credits = PROMPT_COST * generated.streams_charged
                prompt_seconds, text = time.monotonic() - started, generated.text
            result = await submit_and_finish(
                job.with_prompt(text),
                key,
                print_,
                earlier.attempt,
                how,
                prompt_seconds=prompt_seconds,
                prompt_credits=prompt_credits,
                on_submitted=submitted,
            )
    except Exception as error:
        # What was charged: the prompt, and the video once submitted (or maybe
        # submitted), unless its generation failed, which NanoPhoto refunds.
        charged = (paid is not None or isinstance(error, SubmitOutcomeUnknownError)) and not (
            isinstance(error, GenerationFailedError)
        )
        spent = prompt_credits + (job.cost if charged else 0)
        credits.settle(item.price, spent)
        if watched is not None:
            planner.finish(watched)
        code = error.code if isinstance(error, NanoPhotoError) else type(error).__name__
        logger.error("item %d (%s) failed: %s", index, item.label, error)
        return outcome.model_copy(
            update={
                "task_id": watched,
                "error_code": code,
                "error": str(error)[:500],
                "credits_used": spent,
                "seconds": round(time.monotonic() - started, 3),
            }
        )
    planner.finish(result.task_id, result.generation_time)
    spent = result.credits_used if earlier.result is None else 0  # an earlier run paid for it
    credits.settle(item.price, spent)
    return _delivered(outcome, result, spent, time.monotonic() - started)


def _delivered(
    outcome: ItemOutcome, result: VideoResult, spent: int, seconds: float
) -> ItemOutcome:
    return outcome.model_copy(
        update={
            "status": "delivered",
            "credits_used": spent,
            "task_id": result.task_id,
            "video_path": result.video_path,
            "video_size": result.video_size,
            "video_sha256": result.video_sha256,
            "seconds": round(seconds, 3),
        }
    )


@best_effort
async def _publish(summary: BatchSummary) -> None:
    """The table a person reads in the UI, and the same summary as JSON."""
    rows = [
        {
            "#": o.index,
            "item": o.item,
            "status": o.status,
            "credits": o.credits_used,
            "task id": o.task_id or "",
            "file": o.video_path or "",
            "error": o.error_code or "",
        }
        for o in summary.items
    ]
    headline = (
        f"{summary.delivered} delivered, {summary.failed} failed, "
        f"{summary.over_budget} over budget; {summary.credits_used} credits"
        + (f" of {summary.credit_budget}" if summary.credit_budget is not None else "")
        + f"; {summary.requests} API requests"
    )
    await acreate_table_artifact(table=rows, key="batch-summary", description=headline)
    document = json.dumps(summary.model_dump(mode="json"), indent=2)
    await acreate_markdown_artifact(
        markdown=f"# Batch summary\n\n{headline}\n\n```json\n{document}\n```\n",
        key="batch-summary-json",
        description="The batch's JSON summary",
    )
