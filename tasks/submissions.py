"""Exactly-once submission: a record per idempotency key, in shared result storage.

The rule, and what the user sees:

1. Before a submit is sent, its record is written as ``sending``.
2. The moment the submit returns a task id, the record becomes ``submitted``
   with that id. A retried or re-run flow with the same key finds it and
   resumes watching that task: it never submits again (and skips the prompt).
3. If the server refused the submit for sure (400, 401, 402, 429 after
   retries, no connection), the record becomes ``refused``: nothing was
   charged, so a retry may submit again.
4. If the submit failed in a way that may have reached NanoPhoto (gateway
   page, dropped connection, time-out, 500), the record stays ``sending``.
   Every later run with that key stops with ``SUBMIT_OUTCOME_UNKNOWN`` instead
   of risking a second charge: check the NanoPhoto account, then resume the
   task by its id (``resume-video``, ``sora2 resume``) or run again with a new
   idempotency key.

Records live in Prefect's default result storage (``PREFECT_LOCAL_STORAGE_PATH``
or the block named by ``PREFECT_DEFAULT_RESULT_STORAGE_BLOCK``), which every
worker of a deployment shares; they hold no key, only task ids and hashes.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from prefect.filesystems import WritableFileSystem
from prefect.results import aget_default_result_storage
from prefect.runtime import flow_run
from pydantic import BaseModel, StringConstraints, ValidationError

from nanophoto.models import VideoOptions, VideoRequest

FOLDER: Final = "sora2-submissions"
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,200}")

State = Literal["sending", "submitted", "refused"]


class SubmissionRecord(BaseModel):
    """What we know of one idempotency key's submit."""

    key: str
    state: State
    request_sha256: str
    task_id: str | None = None
    prompt: str = ""
    cost: int = 0
    updated_at: datetime
    flow_run_id: str | None = None


IdempotencyKey = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.:-]{1,200}$"),
]


def resolve_idempotency_key(given: str | None) -> str:
    """The caller's key, or one derived from this flow run (stable across its retries)."""
    if given:
        if not _SAFE_KEY.fullmatch(given):
            raise ValueError("idempotency_key: use 1-200 letters, digits, '_', '.', ':' or '-'")
        return given
    run_id = flow_run.id
    if not run_id:
        raise ValueError("idempotency_key: required outside a flow run")
    return f"flow-run-{run_id}"


def request_fingerprint(options: VideoOptions) -> str:
    """A hash of the video's options (not its prompt), to notice a key reused for another."""
    fields = options.model_dump(mode="json", include=set(VideoOptions.model_fields))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class SubmissionStore:
    """Reads and writes submission records in a shared file system."""

    def __init__(self, storage: WritableFileSystem) -> None:
        self.storage = storage

    @classmethod
    async def default(cls) -> SubmissionStore:
        """The store in Prefect's default result storage."""
        return cls(await aget_default_result_storage())

    async def read(self, key: str) -> SubmissionRecord | None:
        """The record for ``key``, or None if there is none."""
        try:
            content = await self.storage.read_path(self._path(key))
        except (FileNotFoundError, ValueError, OSError):
            return None
        try:
            return SubmissionRecord.model_validate_json(content)
        except ValidationError:
            return None

    async def write(
        self,
        key: str,
        state: State,
        request: VideoRequest,
        *,
        task_id: str | None = None,
    ) -> SubmissionRecord:
        """Write ``key``'s record in ``state``."""
        record = SubmissionRecord(
            key=key,
            state=state,
            request_sha256=request_fingerprint(request),
            task_id=task_id,
            prompt=request.prompt,
            cost=request.cost,
            updated_at=datetime.now(UTC),
            flow_run_id=str(flow_run.id) if flow_run.id else None,
        )
        await self.storage.write_path(self._path(key), record.model_dump_json().encode())
        return record

    @staticmethod
    def _path(key: str) -> str:
        return f"{FOLDER}/{hashlib.sha256(key.encode()).hexdigest()}.json"
