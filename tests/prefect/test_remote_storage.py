"""Submission records on shared remote storage: an S3Bucket, served by moto on loopback.

Workers on several machines share their records through a remote result
storage block (``PREFECT_DEFAULT_RESULT_STORAGE_BLOCK``). A missing S3 object
is "no record"; a store that cannot be reached stops the run before it submits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import prefect.results
import pytest
from moto.server import ThreadedMotoServer
from prefect import flow
from prefect.settings import PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, temporary_settings
from prefect_aws import AwsClientParameters, AwsCredentials
from prefect_aws.s3 import S3Bucket

from flows.video import prompt_to_video
from nanophoto_simulator import Simulator
from tasks import submissions as submissions_module
from tasks.submissions import S3Records, SubmissionStore
from tests.helpers import exception_text, free_port

BUCKET = "sora2-records"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ThreadedMotoServer, str]]:
    """An S3-compatible server on a free loopback port, stopped afterwards."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never look for a cloud
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    try:
        yield server, endpoint
    finally:
        server.stop()


@pytest.fixture
async def records_on_s3(s3: tuple[ThreadedMotoServer, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Prefect's default result storage pointed at an S3Bucket block on that server; every
    worker of these tests runs on this machine, so file locks may guard the keys."""
    monkeypatch.setenv("SORA2_LOCAL_LOCKS", "1")
    name = f"records-{uuid.uuid4().hex[:8]}"
    await S3Bucket(
        bucket_name=BUCKET,
        bucket_folder="prefect",
        credentials=AwsCredentials(
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(endpoint_url=s3[1]),
        ),
    ).asave(name)
    with temporary_settings(updates={PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: f"s3-bucket/{name}"}):
        yield s3


async def test_a_new_key_on_s3_submits_once_and_a_rerun_finds_its_record(
    api: Simulator, records_on_s3: Any, tmp_path: Path
) -> None:
    key = f"s3-{uuid.uuid4().hex[:8]}"
    store = await SubmissionStore.default()
    assert isinstance(store.files, S3Records)
    assert await store.read(key) is None  # a missing object is "no record", not an error
    first = await prompt_to_video(prompt="s3: a fox", output_dir=str(tmp_path), idempotency_key=key)
    again = await prompt_to_video(prompt="s3: a fox", output_dir=str(tmp_path), idempotency_key=key)
    assert again.task_id == first.task_id
    assert api.snapshot()["submits"] == 1
    record = await store.read(key)
    assert record is not None
    assert (record.state, record.task_id) == ("completed", first.task_id)
    records, unreadable = await store.all()
    assert key in {r.key for r in records}
    assert unreadable == []


async def test_an_unreachable_store_stops_the_run_before_it_submits(
    api: Simulator, records_on_s3: Any
) -> None:
    server, _ = records_on_s3
    server.stop()
    state = await prompt_to_video(
        prompt="s3: a whale", idempotency_key=f"s3-{uuid.uuid4().hex[:8]}", return_state=True
    )
    assert state.is_failed()
    assert "SUBMISSION_STORAGE_ERROR" in await exception_text(state)
    assert api.snapshot()["submit_requests"] == {}


async def test_shared_records_without_a_shared_lock_are_refused_before_any_request(
    api: Simulator, records_on_s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on several machines would each lock on their own disk: not a lock at all."""
    monkeypatch.delenv("SORA2_LOCAL_LOCKS")
    state = await prompt_to_video(
        prompt="s3: an owl", idempotency_key=f"s3-{uuid.uuid4().hex[:8]}", return_state=True
    )
    message = await exception_text(state)
    assert "SORA2_LOCK_REDIS_URL" in message
    assert api.snapshot()["total_requests"] == 0


async def test_a_run_finds_its_record_store_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lookup asked the Prefect API: a batch made thousands. A run keeps what it found;
    another run looks again (its settings, or the server's default, may have changed)."""
    found = 0
    real = prefect.results.aget_default_result_storage

    async def counted() -> Any:
        nonlocal found
        found += 1
        return await real()

    monkeypatch.setattr(submissions_module, "aget_default_result_storage", counted)

    @flow
    async def two_lookups() -> bool:
        return await SubmissionStore.default() is await SubmissionStore.default()

    assert await two_lookups()
    assert await two_lookups()
    assert found == 2


async def test_items_asking_at_once_find_the_store_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's items all ask as it starts: they wait for the first one's answer."""
    found = 0
    real = prefect.results.aget_default_result_storage

    async def counted() -> Any:
        nonlocal found
        found += 1
        await asyncio.sleep(0.05)  # the API's answer takes a while
        return await real()

    monkeypatch.setattr(submissions_module, "aget_default_result_storage", counted)

    @flow
    async def many_at_once() -> int:
        stores = await asyncio.gather(*(SubmissionStore.default() for _ in range(50)))
        return len({id(store) for store in stores})

    assert await many_at_once() == 1
    assert found == 1
