"""Exactly-once submission: a record per idempotency key, in shared result storage.

The rule, and what the user sees:

1. Before a submit is sent, its record is written as ``sending`` (naming the
   flow run that sends it).
2. The moment the submit returns a task id, the record becomes ``submitted``
   with that id. A retried or re-run flow with the same key finds it and
   resumes watching that task with a fresh watch window: it never submits
   again (and skips the prompt).
3. When the video completes, the record becomes ``completed`` with the result:
   a rerun returns it (and downloads again only if the file is gone).
4. If the generation failed (NanoPhoto refunds it), the record becomes
   ``failed``: a rerun with the same key pays for one new attempt.
5. If the server refused the submit for sure (400, 401, 402, 429 after
   retries, no connection), the record becomes ``refused``: nothing was
   charged, so a rerun may submit.
6. If the submit failed in a way that may have reached NanoPhoto (gateway
   page, dropped connection, time-out, 500), or a crash cut it short, the
   record stays ``sending``. Every later run with that key stops with
   ``SUBMIT_OUTCOME_UNKNOWN`` instead of risking a second charge: check the
   NanoPhoto account, then resume the task by its id (``resume-video``,
   ``sora2 resume``) or run again with a new idempotency key.

A record that cannot be read (storage down, a half-written file) is never
taken for "no record": the run stops without submitting.

Records live in Prefect's default result storage (``PREFECT_LOCAL_STORAGE_PATH``
or the block named by ``PREFECT_DEFAULT_RESULT_STORAGE_BLOCK``), which every
worker of a deployment shares; they hold no key, only task ids and hashes.
Two runs started at the same moment with the same key are not serialised:
the second one usually finds the first one's ``sending`` record and stops,
but both can pass the check if they read it within milliseconds of each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect.results import aget_default_result_storage
from prefect.runtime import flow_run
from pydantic import BaseModel, StringConstraints, ValidationError

from nanophoto.errors import NanoPhotoError
from nanophoto.models import VideoOptions, VideoResult

FOLDER: Final = "sora2-submissions"
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,200}")

State = Literal["sending", "submitted", "refused", "failed", "completed"]

IdempotencyKey = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.:-]{1,200}$"),
]


class SubmissionStorageError(NanoPhotoError):
    """The submission record could not be read or written: nothing is submitted."""

    code = "SUBMISSION_STORAGE_ERROR"
    may_have_started = False


class SubmissionRecord(BaseModel):
    """What we know of one idempotency key's video."""

    key: str
    state: State
    fingerprint: str
    task_id: str | None = None
    prompt: str = ""
    cost: int = 0
    attempts: int = 1
    result: VideoResult | None = None
    updated_at: datetime
    flow_run_id: str | None = None


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


def fingerprint(options: VideoOptions, source: dict[str, Any]) -> str:
    """A hash of what is paid for: the video's options and where its prompt comes from
    (the prompt itself, or the topic and prompt options), so a key reused for
    another video is noticed."""
    fields = options.model_dump(mode="json", include=set(VideoOptions.model_fields))
    blob = json.dumps({"options": fields, "source": source}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class SubmissionStore:
    """Reads and writes submission records in a shared file system."""

    def __init__(self, storage: WritableFileSystem) -> None:
        self.storage = storage

    @classmethod
    async def default(cls) -> SubmissionStore:
        """The store in Prefect's default result storage."""
        return cls(await aget_default_result_storage())

    async def read(self, key: str) -> SubmissionRecord | None:
        """The record for ``key``; None only when there surely is none."""
        path = self._path(key)
        local = isinstance(self.storage, LocalFileSystem)
        if local and not self.storage._resolve_path(path).exists():  # type: ignore[attr-defined]
            return None
        try:
            content = await self.storage.read_path(path)
        except FileNotFoundError:
            return None
        except Exception as error:
            raise SubmissionStorageError(
                f"could not read the submission record of {key!r} ({type(error).__name__}); "
                "not submitting, to avoid paying twice"
            ) from error
        try:
            return SubmissionRecord.model_validate_json(content)
        except ValidationError:
            raise SubmissionStorageError(
                f"the submission record of {key!r} is unreadable (a write cut short?); "
                "not submitting, to avoid paying twice: check your NanoPhoto account"
            ) from None

    async def write(self, record: SubmissionRecord) -> SubmissionRecord:
        """Write ``record`` (atomically on local storage: no half-written file)."""
        record = record.model_copy(update={"updated_at": datetime.now(UTC)})
        content = record.model_dump_json().encode()
        path = self._path(record.key)
        try:
            if isinstance(self.storage, LocalFileSystem):
                target = self.storage._resolve_path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".record-")
                with os.fdopen(fd, "wb") as file:
                    file.write(content)
                os.replace(temporary, target)
            else:
                await self.storage.write_path(path, content)
        except Exception as error:
            raise SubmissionStorageError(
                f"could not write the submission record of {record.key!r} "
                f"({type(error).__name__})"
                + (f"; video task {record.task_id} was submitted" if record.task_id else "")
            ) from error
        return record

    @staticmethod
    def new(key: str, state: State, print_: str, *, prompt: str, cost: int) -> SubmissionRecord:
        """A record for this flow run."""
        return SubmissionRecord(
            key=key,
            state=state,
            fingerprint=print_,
            prompt=prompt,
            cost=cost,
            updated_at=datetime.now(UTC),
            flow_run_id=str(flow_run.id) if flow_run.id else None,
        )

    @staticmethod
    def _path(key: str) -> str:
        return f"{FOLDER}/{hashlib.sha256(key.encode()).hexdigest()}.json"
