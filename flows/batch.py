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
import contextlib
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Final, Literal, Self
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run
from prefect.states import Scheduled
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
    MAX_RUN_COUNT,
    Spend,
    Watching,
    earlier_outcome,
    make_video_once,
    refuse_crash_loop,
)
from flows.video import RESULTS
from nanophoto.contract import TOPIC_MAX_CHARS
from nanophoto.errors import GenerationFailedError, NanoPhotoError, SubmitOutcomeUnknownError
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
from tasks.times import SHARE_EVERY_S, SharedTimes, forget
from tasks.video import OutputDir

ItemStatus = Literal["delivered", "failed", "over_budget"]
# The deployment a batch in parts runs its parts as (prefect.yaml), and how many at most.
PART_DEPLOYMENT: Final = "batch-part/pool"
SERVED: Final = "served"  # make serve's deployments' name: its batch part is batch-part/served
MAX_PARTS: Final = 64
# A part no worker has taken after PART_START_S (every slot busy, e.g. with batches waiting
# for their parts) is made by the batch's own run instead; a crashed part is followed into
# its retry for PART_RESCHEDULE_S. Our seconds: workers poll in real time.
PART_START_S: Final = 120.0
PART_RESCHEDULE_S: Final = 60.0
PART_POLL_S: Final = 2.0
# A crashed part the automation does not schedule again (it only retries runs whose
# heartbeats stopped; a process that could not reach the API at its start exits with an
# error instead) is scheduled again by the batch itself, this many times at most.
PART_RESTARTS: Final = 2


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


def _spent(charged: int, reserved: int, paid_by_own_attempt: bool, refunded: bool) -> int:
    """What an item took from the batch's budget: what this run was charged for it. A
    video this very run paid for before it crashed and was retried costs at least what
    it reserved, unless its generation failed since: NanoPhoto refunded it."""
    return max(charged, reserved) if paid_by_own_attempt and not refunded else charged


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
    parts: Annotated[int, Field(ge=1, le=MAX_PARTS)] = 1,
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
        parts: Spread the batch over this many runs of the batch-part deployment, which
            any worker of the pool may take (make deploy creates it); each makes its
            share of the items, max_in_flight at a time. 1: this run makes them all.

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
    started = time.monotonic()
    keys = item_keys(key, items)
    legacy = LegacyKeys(key, len(items))
    credits = CreditBudget(credit_budget)
    share = ItemsShare(
        indices=list(range(len(items))),
        keys=keys,
        schedule=schedule,
        output_dir=output_dir,
        max_in_flight=max_in_flight,
        resubmit_unknown_up_to=resubmit_unknown_up_to_credits,
        own_run=not batch_key,
    )
    if parts == 1:
        outcomes, requests = await _make_items(items, share, credits, legacy)
    else:
        outcomes, requests = await _spread_over_parts(items, share, credits, legacy, parts)
    summary = BatchSummary(
        delivered=sum(o.status == "delivered" for o in outcomes),
        failed=sum(o.status == "failed" for o in outcomes),
        over_budget=sum(o.status == "over_budget" for o in outcomes),
        unknown=sum(o.outcome_unknown for o in outcomes),
        credit_budget=credit_budget,
        credits_used=sum(o.credits_used for o in outcomes),
        credits_at_risk=sum(o.credits_at_risk for o in outcomes),
        requests=requests,
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


class ItemsShare(BaseModel):
    """Which items of a batch one run makes, under which keys, and how."""

    indices: list[int]  # each item's place in the whole batch
    keys: list[str]  # each item's idempotency key
    schedule: WatchSchedule
    output_dir: OutputDir  # checked again where the part runs: its worker's output folder
    max_in_flight: int
    resubmit_unknown_up_to: int = 0
    # No batch_key was given: the key is this flow run's id, so a record under it is this
    # very run's earlier attempt (a retry after a crash), whose spend still counts.
    own_run: bool = False
    # The batch run whose parts share the generation times they see (tasks/times.py).
    times_group: str | None = None


async def _make_items(
    items: list[BatchItem], share: ItemsShare, credits: CreditBudget, legacy: LegacyKeys
) -> tuple[list[ItemOutcome], int]:
    """Make ``items`` here, ``max_in_flight`` at a time: each item's outcome, and the
    API requests this process made for them."""
    settings = NanoPhotoSettings()
    schedule = share.schedule.on_clock(settings.time_scale)
    topics = sum(bool(item.topic) for item in items)
    times = None
    if share.times_group:  # a part: it learns what every part of its batch has seen
        part = hashlib.sha256("|".join(share.keys).encode()).hexdigest()[:16]
        times = SharedTimes(share.times_group, part)
    limiter = shared_limiter(settings)
    planner = BudgetPlanner(
        schedule,
        requests_per_window=settings.rate_limit,
        window=settings.rate_window,
        max_in_flight=share.max_in_flight,
        requests_per_item=1 + round(topics / len(items)),
        times=times,
        api_second=settings.time_scale,
        in_window=limiter.in_window,
    )
    planner.queued = len(items)
    slots = asyncio.Semaphore(share.max_in_flight)
    granted_before = limiter.granted_total
    progress = BatchProgress(len(items), schedule.expected_generation)

    async def run(position: int, item: BatchItem) -> ItemOutcome:
        async with slots:
            if planner.is_binding():  # checks would wait behind a burst of starts
                limiter.pace()
            planner.queued -= 1
            outcome = await _run_item(
                share.indices[position],
                item,
                ItemContext(
                    key=share.keys[position],
                    legacy=legacy,
                    schedule=schedule,
                    output_dir=share.output_dir,
                    planner=planner,
                    credits=credits,
                    progress=progress,
                    resubmit_unknown_up_to=share.resubmit_unknown_up_to,
                    own_run=share.own_run,
                ),
            )
        progress.finished(share.indices[position], outcome.status)  # shown at the next tick
        return outcome

    async def keep_progress_moving() -> None:
        # One update per tick, however many items finished in it: each update is a
        # write and an event on the server, and a batch's items finish in bursts.
        while True:
            await progress.show()
            await asyncio.sleep(progress.tick_seconds)

    async def share_times() -> None:
        while times is not None:
            await asyncio.sleep(SHARE_EVERY_S)
            await _share(times)

    ticker = asyncio.create_task(keep_progress_moving())
    sharer = asyncio.create_task(share_times())
    try:
        outcomes = await asyncio.gather(*(run(i, item) for i, item in enumerate(items)))
    finally:
        ticker.cancel()
        sharer.cancel()
    await progress.show()  # the batch's end, at once
    if times is not None:
        await _share(times)  # the last ones, for the parts of a later round
    return list(outcomes), limiter.granted_total - granted_before


@best_effort
async def _share(times: SharedTimes) -> None:
    """Share generation times with the batch's other parts (lost: each plans alone)."""
    learned = await times.share()
    if learned:
        get_run_logger().debug("learned %d generation times from other parts", learned)


async def _spread_over_parts(
    items: list[BatchItem],
    share: ItemsShare,
    credits: CreditBudget,
    legacy: LegacyKeys,
    parts: int,
) -> tuple[list[ItemOutcome], int]:
    """Reserve each item's credits here (one budget for the batch), then let ``parts``
    runs of the batch-part deployment make them, on whichever workers take them.

    An item an earlier run paid for costs nothing; one that would take the batch
    over its budget is kept out. When the parts are done, what they did not
    spend (refunds, items that failed before their submit) comes back to the
    budget, and the items kept out get another round while they fit, in order:
    as a batch made in one run would have sent them. What still does not fit is
    ``over_budget``.
    """
    logger = get_run_logger()
    deployment = await _part_deployment()
    share = share.model_copy(update={"times_group": str(flow_run.id)})
    outcomes: dict[int, ItemOutcome] = {}
    sent: list[int] = []
    reserved: dict[int, int] = {}  # what each sent item took from the budget
    paid_before: dict[int, bool] = {}  # an earlier run (or attempt) had paid for it
    kept_out: list[int] = []
    for position, item in enumerate(items):
        index, key = share.indices[position], share.keys[position]
        outcome = ItemOutcome(
            index=index, item=item.label, key=key, status="failed", price=item.price
        )
        try:
            earlier = await earlier_outcome(key)
            if earlier is None:
                legacy_record = await legacy.find(fingerprint(item.job()))
                if legacy_record is not None:
                    earlier = legacy_record
                    share.keys[position] = legacy_record.key
        except NanoPhotoError as error:
            outcomes[index] = outcome.model_copy(
                update={"error_code": error.code, "error": str(error)[:500]}
            )
            continue
        paid = earlier is not None and earlier.state in ("submitted", "completed")
        paid_before[position] = paid
        reserved[position] = item.price if share.own_run or not paid else 0
        if reserved[position] and not credits.reserve(item.price):
            outcomes[index] = outcome.model_copy(update={"status": "over_budget"})
            kept_out.append(position)
            continue
        sent.append(position)

    async def part(chunk: list[int]) -> BatchPart:
        sub_share = share.model_copy(
            update={
                "indices": [share.indices[p] for p in chunk],
                "keys": [share.keys[p] for p in chunk],
            }
        )
        mine = [items[p] for p in chunk]
        # The same part for a retried batch run: it finds the run it started, not a new one.
        tag = hashlib.sha256("|".join(sub_share.keys).encode()).hexdigest()[:16]
        started = await arun_deployment(
            deployment,
            parameters={
                "items": [item.model_dump(mode="json") for item in mine],
                "share": sub_share.model_dump(mode="json"),
            },
            as_subflow=True,
            timeout=0,
            idempotency_key=f"{flow_run.id}:part:{tag}",
        )
        run = await _follow_part(started.id)
        if run is None:  # no worker took it in time: this run makes it
            logger.warning(
                "no worker took batch part %s within %g s: making its %d items here",
                started.id,
                PART_START_S,
                len(mine),
            )
            outcomes, requests = await _make_items(mine, sub_share, CreditBudget(None), legacy)
            return BatchPart(outcomes=outcomes, requests=requests)
        if run.state is None or not run.state.is_completed():
            ended = f"{run.state.name}: {run.state.message}" if run.state else "no state"
            failed = [
                ItemOutcome(
                    index=share.indices[p],
                    item=items[p].label,
                    key=share.keys[p],
                    status="failed",
                    price=items[p].price,
                    error_code="BATCH_PART_FAILED",
                    error=f"its part (flow run {run.id}) ended {ended}; a rerun with the same "
                    "batch_key resumes it"[:500],
                )
                for p in chunk
            ]
            return BatchPart(outcomes=failed, requests=0)
        assert run.state is not None
        return BatchPart.model_validate(await run.state.aresult())

    requests = 0
    try:
        while sent:
            # Each item's part follows from its place in the batch, not from which items
            # are sent: a retried batch run finds the same parts (their idempotency keys).
            chunks = [[p for p in sent if p % parts == n] for n in range(parts)]
            chunks = [chunk for chunk in chunks if chunk]
            logger.info(
                "batch: %d items in %d parts of %s (any worker of the pool takes a part)",
                len(sent),
                len(chunks),
                deployment,
            )
            for result in await asyncio.gather(*(part(chunk) for chunk in chunks)):
                requests += result.requests
                for outcome in result.outcomes:
                    outcomes[outcome.index] = outcome
            for position in sent:
                done = outcomes[share.indices[position]]
                if done.error_code == "BATCH_PART_FAILED":  # its spend is unknown: kept
                    continue
                spent = _spent(
                    done.credits_used + done.credits_at_risk,
                    reserved[position],
                    share.own_run and paid_before[position],
                    refunded=done.error_code == GenerationFailedError.code,
                )
                credits.settle(reserved[position], spent)
            sent = [p for p in kept_out if credits.reserve(items[p].price)]
            kept_out = [p for p in kept_out if p not in sent]
            if sent:
                logger.info(
                    "batch: credits the parts did not spend came back; %d items kept out of "
                    "the budget get another round",
                    len(sent),
                )
    finally:
        await _forget_times(str(flow_run.id))
    ordered = [outcomes[index] for index in sorted(outcomes)]
    return ordered, requests


@best_effort
async def _forget_times(batch: str) -> None:
    await forget(batch)


async def _part_deployment() -> str:
    """The batch-part deployment beside this batch's own (make deploy's, or make serve's);
    it must exist for a batch in parts."""
    name = PART_DEPLOYMENT
    if this_deployment.name == SERVED:
        name = f"{PART_DEPLOYMENT.split('/')[0]}/{SERVED}"
    async with get_client() as client:
        try:
            await client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(
                f"parts: a batch in parts needs the deployment {name} (make deploy or make "
                "serve creates it) and a worker to run it; nothing was sent"
            ) from None
    return name


async def _follow_part(run_id: UUID) -> FlowRun | None:
    """The part's run once it has ended for good; None if no worker took it in time.

    A part that crashed (its worker died) is scheduled again by the
    retry-crashed-video-runs automation: it is followed into that retry. One
    the automation leaves Crashed for PART_RESCHEDULE_S (its process failed
    at start, e.g. while its API restarted) is scheduled again from here, up
    to PART_RESTARTS times: its records make a rerun pay for nothing twice.
    """
    waited = crashed_since = 0.0
    restarts = 0
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            state = run.state
            if state is not None and state.is_crashed() and run.run_count <= MAX_RUN_COUNT:
                if crashed_since > PART_RESCHEDULE_S:
                    if restarts >= PART_RESTARTS:
                        return run  # not scheduled again: it ended Crashed
                    restarts += 1
                    crashed_since = 0.0
                    await client.set_flow_run_state(
                        run_id,
                        Scheduled(
                            name="AwaitingRetry",
                            message=f"Scheduled again by its batch after a crash "
                            f"({restarts} of {PART_RESTARTS}): {state.message}"[:500],
                        ),
                        force=True,
                    )
                    continue
                crashed_since += PART_POLL_S
            elif state is not None and state.is_final():
                return run
            else:
                crashed_since = 0.0
                if run.run_count == 0 and (state is None or state.is_scheduled()):
                    waited += PART_POLL_S
                    if waited > PART_START_S:
                        with contextlib.suppress(ObjectNotFound):
                            await client.delete_flow_run(run_id)
                        return None
            await asyncio.sleep(PART_POLL_S)


class BatchPart(BaseModel):
    """What one part of a batch made: its items' outcomes and its API requests."""

    outcomes: list[ItemOutcome]
    requests: int


def _part_run_name() -> str:
    """``batch part of 5: A paper boat…``."""
    return "batch part" + _batch_run_name().removeprefix("batch")


# JSON, not pickle: the batch reads it back whichever way each process loaded this module
# (a worker loads it from its entrypoint as "batch", make serve as "flows.batch").
@flow(name="batch-part", flow_run_name=_part_run_name, result_serializer="json", **RESULTS)
async def batch_part(items: list[BatchItem], share: ItemsShare) -> BatchPart:
    """Make one part of a batch, on whichever worker took this run.

    The batch that started it reserved the items' credits; each item's key is
    the batch's, so a retried part resumes what it already paid for.

    Args:
        items: This part's items.
        share: Their places and keys in the batch, the schedule, the output folder
            and how many at once.

    Returns:
        Each item's outcome, and the API requests made for them.
    """
    refuse_crash_loop()
    if len(items) != len(share.indices) or len(items) != len(share.keys):
        raise ValueError("share: one index and one key per item")
    outcomes, requests = await _make_items(items, share, CreditBudget(None), LegacyKeys("", 0))
    return BatchPart(outcomes=outcomes, requests=requests)


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
    own_run: bool = False  # records under the key are this run's earlier attempt


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
    # An earlier run's video costs this run nothing; this run's own earlier attempt's does.
    reserved = item.price if context.own_run or not paid else 0
    credits = context.credits

    def spent(spend: Spend, refunded: bool = False) -> int:
        return _spent(spend.credits + spend.at_risk, reserved, context.own_run and paid, refunded)

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
        context.schedule,
        context.output_dir,
        plan=plan,
        artifacts=False,
        steps_as_tasks=False,
        live_prompt=False,
    )
    try:
        result = await make_video_once(
            job, key, how, spend=spend, resubmit_unknown_up_to=context.resubmit_unknown_up_to
        )
    except Exception as error:
        credits.settle(reserved, spent(spend, refunded=isinstance(error, GenerationFailedError)))
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
    credits.settle(reserved, spent(spend))
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
