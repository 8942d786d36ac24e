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
from dataclasses import dataclass
from typing import Annotated, Literal, Self

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.runtime import flow_run
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from flows.forms import described
from flows.pipeline import (
    Spend,
    Watching,
    earlier_outcome,
    make_video_once,
    refuse_crash_loop,
)
from flows.video import RESULTS
from nanophoto.contract import TOPIC_MAX_CHARS
from nanophoto.errors import NanoPhotoError, SubmitOutcomeUnknownError
from nanophoto.models import (
    PromptOptions,
    PromptRequest,
    VideoJob,
    VideoOptions,
    VideoRequest,
    VideoResult,
    fingerprint,
    trimmed,
)
from nanophoto.planner import BudgetPlanner
from nanophoto.settings import NanoPhotoSettings
from nanophoto.watch import CheckPlan, WatchSchedule
from tasks.observe import BatchProgress, best_effort
from tasks.ratelimit import shared_limiter
from tasks.submissions import IdempotencyKey, SubmissionRecord, resolve_idempotency_key
from tasks.video import OutputDir

ItemStatus = Literal["delivered", "failed", "over_budget"]


class _ItemSource(BaseModel):
    """Where an item's video comes from: a topic or a ready prompt (the form's first fields).

    Plain text boxes, empty meaning "not this one": a form shows an optional
    text as a type toggle a person must click first.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: Annotated[
        str, BeforeValidator(trimmed), StringConstraints(max_length=TOPIC_MAX_CHARS)
    ] = Field(
        "",
        title="Topic",
        description=str(PromptRequest.model_fields["topic"].description)
        + " Give a topic or a prompt.",
    )
    prompt: Annotated[str, BeforeValidator(trimmed)] = Field(
        "",
        title="Prompt",
        description=str(VideoRequest.model_fields["prompt"].description)
        + " Give a topic or a prompt.",
    )


class BatchItem(VideoOptions, PromptOptions, _ItemSource):
    """One video of a batch: a topic (a prompt is written first) or a ready prompt.

    Its options are the same fields, with the same descriptions, as the
    flows' (``nanophoto.models``); the prompt options apply to topics only.
    """

    @model_validator(mode="after")
    def _topic_or_prompt(self) -> Self:
        """A topic or a prompt: checked, with the options, before anything is paid."""
        if bool(self.topic) == bool(self.prompt):
            raise ValueError("give either a topic or a prompt, not both and not neither")
        return self

    def job(self) -> VideoJob:
        """What this item makes: a topic's prompt and video, or a ready prompt's video."""
        values = self.model_dump()
        return PromptRequest.pick(values) if self.topic else VideoRequest.pick(values)

    @property
    def price(self) -> int:
        """Credits the item costs: its prompt, if it has a topic, and its video."""
        return self.job().price

    @property
    def label(self) -> str:
        """The item as a person knows it, in a table cell."""
        text = " ".join((self.topic or self.prompt).split())
        return text[:60] + ("…" if len(text) > 60 else "")


class ItemOutcome(BaseModel):
    """What one item of the batch became."""

    index: int
    item: str
    key: str  # its idempotency key: what the submissions ledger lists it by
    status: ItemStatus
    price: int
    credits_used: int = 0  # what this run surely spent on it (an earlier run's video: 0)
    credits_at_risk: int = 0  # maybe charged by this run: an unknown outcome, a lost prompt
    paid_earlier: bool = False  # delivered or resumed from an earlier run's submit
    outcome_unknown: bool = False  # its submit may have been charged: see the ledger
    possibly_charged_twice: bool = False
    task_id: str | None = None
    video_path: str | None = None
    video_size: int | None = None
    video_sha256: str | None = None
    error_code: str | None = None
    error: str | None = None
    seconds: float = 0.0


class BatchSummary(BaseModel):
    """The whole batch: counts, credits and every item's outcome.

    ``credits_used`` is what NanoPhoto's ledger shows for this run: prompts and
    videos it surely paid for, minus refunds. ``credits_at_risk`` is what it
    may have been charged besides (unknown outcomes), never counted as spent.
    """

    delivered: int
    failed: int
    over_budget: int
    unknown: int
    credit_budget: int | None
    credits_used: int
    credits_at_risk: int
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
    output_dir: OutputDir = ".",
    batch_key: IdempotencyKey | None = None,
    resubmit_unknown_up_to_credits: Annotated[int, Field(ge=0)] = 0,
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
        batch_key: Runs with the same key make each item's video once, paid once:
            an item's key is the batch key followed by what the item is (its
            fingerprint, and a number for identical items), so a rerun finds each
            item's earlier outcome however the items are reordered. 1 to 200 letters,
            digits and the characters _ . : - (no spaces). Empty: this flow run's id.

    Returns:
        Counts, credits, requests, and each item's outcome (task id, file, checksum,
        or why it failed or was skipped).
    """
    logger = get_run_logger()
    refuse_crash_loop()
    if not items:
        raise ValueError("items: give at least one topic or prompt")
    if credit_budget is not None and credit_budget < 0:
        raise ValueError("credit_budget: must be 0 or more (empty for no budget)")
    key = resolve_idempotency_key(batch_key)
    settings = NanoPhotoSettings()
    schedule = schedule.on_clock(settings.time_scale)
    topics = sum(bool(item.topic) for item in items)
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
    keys = item_keys(key, items)
    legacy = LegacyKeys(key, len(items))

    async def run(index: int, item: BatchItem) -> ItemOutcome:
        async with slots:
            planner.queued -= 1
            outcome = await _run_item(
                index,
                item,
                ItemContext(
                    key=keys[index],
                    legacy=legacy,
                    schedule=schedule,
                    output_dir=output_dir,
                    planner=planner,
                    credits=credits,
                    progress=progress,
                    resubmit_unknown_up_to=resubmit_unknown_up_to_credits,
                ),
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
        unknown=sum(o.outcome_unknown for o in outcomes),
        credit_budget=credit_budget,
        credits_used=sum(o.credits_used for o in outcomes),
        credits_at_risk=sum(o.credits_at_risk for o in outcomes),
        requests=limiter.granted_total - granted_before,
        seconds=round(time.monotonic() - started, 3),
        items=list(outcomes),
    )
    await _publish(summary)
    logger.info(
        "batch done: %d delivered, %d failed (%d with an unknown outcome), %d over budget; "
        "%d credits spent, %d at risk; %d requests",
        summary.delivered,
        summary.failed,
        summary.unknown,
        summary.over_budget,
        summary.credits_used,
        summary.credits_at_risk,
        summary.requests,
    )
    if summary.delivered == 0:
        codes = Counter(o.error_code for o in outcomes if o.status == "failed")
        reasons = ", ".join(f"{code} x{count}" for code, count in codes.most_common())
        raise RuntimeError(
            f"no video of the batch was delivered ({summary.failed} failed"
            + (f": {reasons}" if reasons else "")
            + f"; {summary.over_budget} over budget); see the batch-summary artifact"
        )
    return summary


def item_keys(batch_key: str, items: list[BatchItem]) -> list[str]:
    """Each item's idempotency key, from what it is: a rerun with the items reordered,
    inserted or removed maps each item to its own record."""
    seen: Counter[str] = Counter()
    keys = []
    for item in items:
        print_ = fingerprint(item.job())
        seen[print_] += 1
        occurrence = f":{seen[print_]}" if seen[print_] > 1 else ""
        keys.append(f"{batch_key}:{print_[:16]}{occurrence}")
    return keys


class LegacyKeys:
    """The records earlier versions kept under positional keys (``<batch key>:<n>``), found
    by fingerprint: a batch run before the keys changed, then rerun reordered, still
    pays for no video twice. Read once, on first need."""

    def __init__(self, batch_key: str, count: int) -> None:
        self.batch_key = batch_key
        self.count = count
        self._by_fingerprint: dict[str, list[SubmissionRecord]] | None = None
        self._reading = asyncio.Lock()

    async def find(self, print_: str) -> SubmissionRecord | None:
        """The legacy record of the item with this fingerprint, if one was kept."""
        async with self._reading:
            if self._by_fingerprint is None:
                found = await asyncio.gather(
                    *(earlier_outcome(f"{self.batch_key}:{n}") for n in range(self.count))
                )
                self._by_fingerprint = {}
                for record in found:
                    if record is not None:
                        self._by_fingerprint.setdefault(record.fingerprint, []).append(record)
            kept = self._by_fingerprint.get(print_)
            return kept.pop(0) if kept else None  # each legacy record serves one item


@dataclass(frozen=True)
class ItemContext:
    """What one item's pipeline shares with the batch."""

    key: str
    legacy: LegacyKeys  # the positional keys of earlier versions: read, to pay for nothing twice
    schedule: WatchSchedule
    output_dir: str
    planner: BudgetPlanner
    credits: CreditBudget
    progress: BatchProgress
    resubmit_unknown_up_to: int


async def _run_item(index: int, item: BatchItem, context: ItemContext) -> ItemOutcome:
    """One item's pipeline; whatever goes wrong is its outcome, never the batch's.

    Its earlier outcome is read before any budget is reserved: a video an
    earlier run paid for costs nothing now and is never over budget.
    """
    logger = get_run_logger()
    job = item.job()
    key = context.key
    outcome = ItemOutcome(index=index, item=item.label, key=key, status="failed", price=item.price)
    try:
        earlier = await earlier_outcome(key)
        if earlier is None:
            legacy = await context.legacy.find(fingerprint(job))
            if legacy is not None:
                key, earlier = legacy.key, legacy
                outcome = outcome.model_copy(update={"key": key})
    except NanoPhotoError as error:  # the store cannot say: this item stops, not the batch
        logger.error("item %d (%s): %s", index, item.label, error)
        return outcome.model_copy(update={"error_code": error.code, "error": str(error)[:500]})
    paid = earlier is not None and earlier.state in ("submitted", "completed")
    reserved = 0 if paid else item.price
    credits = context.credits
    if reserved and not credits.reserve(reserved):
        logger.warning(
            "item %d (%s) not submitted: %d credits would exceed the budget of %s (%d committed)",
            index,
            item.label,
            reserved,
            credits.limit,
            credits.committed,
        )
        return outcome.model_copy(update={"status": "over_budget"})
    started = time.monotonic()
    spend = Spend()
    planner, progress = context.planner, context.progress

    def plan(task_id: str, submitted_at: float) -> CheckPlan:
        progress.watching(index, submitted_at)
        return planner.track(task_id, item.model_tier, item.duration, submitted_at)

    how = Watching(
        context.schedule, context.output_dir, plan=plan, artifacts=False, checks_as_tasks=False
    )
    try:
        result = await make_video_once(
            job, key, how, spend=spend, resubmit_unknown_up_to=context.resubmit_unknown_up_to
        )
    except Exception as error:
        credits.settle(reserved, spend.credits + spend.at_risk)
        if spend.task_id is not None:
            planner.finish(spend.task_id)
        code = error.code if isinstance(error, NanoPhotoError) else type(error).__name__
        logger.error("item %d (%s) failed: %s", index, item.label, error)
        return outcome.model_copy(
            update={
                "task_id": spend.task_id,
                "error_code": code,
                "error": str(error)[:500],
                "credits_used": spend.credits,
                "credits_at_risk": spend.at_risk,
                "paid_earlier": spend.earlier,
                "outcome_unknown": isinstance(error, SubmitOutcomeUnknownError),
                "possibly_charged_twice": spend.possibly_charged_twice,
                "seconds": round(time.monotonic() - started, 3),
            }
        )
    planner.finish(result.task_id, result.generation_time)
    credits.settle(reserved, spend.credits + spend.at_risk)
    return _delivered(outcome, result, spend, time.monotonic() - started)


def _delivered(
    outcome: ItemOutcome, result: VideoResult, spend: Spend, seconds: float
) -> ItemOutcome:
    return outcome.model_copy(
        update={
            "status": "delivered",
            "credits_used": spend.credits,
            "credits_at_risk": spend.at_risk,
            "paid_earlier": spend.earlier,
            "possibly_charged_twice": spend.possibly_charged_twice,
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
            "at risk": o.credits_at_risk,
            "task id": o.task_id or "",
            "file": o.video_path or "",
            "error": o.error_code or "",
            "key": o.key,
        }
        for o in summary.items
    ]
    headline = (
        f"{summary.delivered} delivered, {summary.failed} failed, "
        f"{summary.over_budget} over budget; {summary.credits_used} credits"
        + (f" of {summary.credit_budget}" if summary.credit_budget is not None else "")
        + (f", {summary.credits_at_risk} at risk" if summary.credits_at_risk else "")
        + f"; {summary.requests} API requests"
        + (
            f"; {summary.unknown} with an unknown outcome: see the submissions ledger"
            if summary.unknown
            else ""
        )
    )
    await acreate_table_artifact(table=rows, key="batch-summary", description=headline)
    document = json.dumps(summary.model_dump(mode="json"), indent=2)
    await acreate_markdown_artifact(
        markdown=f"# Batch summary\n\n{headline}\n\n```json\n{document}\n```\n",
        key="batch-summary-json",
        description="The batch's JSON summary",
    )
