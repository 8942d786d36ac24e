"""Exactly-once submission: a record per idempotency key, in shared result storage.

The states a key's record goes through, and what each tells a rerun:

* ``queued``: a run claimed the key; nothing was sent. The claim is a lease
  its run renews while it writes the prompt and waits for a rate-limit slot;
  a run that finds a ``queued`` key whose lease ran out (its run stopped)
  takes it over and submits, reusing the prompt already written.
* ``sending``: written the moment before the submit's bytes leave (after the
  request budget granted its slot), so the window in which the outcome can
  be unknown is one HTTP request long. A rerun that finds ``sending`` knows
  the request may have reached NanoPhoto: it never sends it again, and says
  how to resolve it (with the task id found in the NanoPhoto account) or
  release it (accepting the risk of paying twice).
* ``submitted`` (a task id), ``completed`` (the result), ``failed`` (the
  generation failed and was refunded: one new paid attempt is allowed),
  ``refused`` (refused for sure, nothing charged: may be sent again),
  ``released`` (a person accepted the risk of an unknown outcome).

Every change of a record happens under its key's lock (``tasks.locks``),
held only for the read and the write, and checks that the record is still
what the run expects (its claim, its attempt): so two runs with one key never
both send. A second run waits while the first's claim is alive, then resumes
the same video.

Records live in Prefect's default result storage (``PREFECT_LOCAL_STORAGE_PATH``
or the block named by ``PREFECT_DEFAULT_RESULT_STORAGE_BLOCK``), which every
worker shares; they hold no key, only task ids, prompts and hashes. Whether
a record is absent is decided per kind of storage (a missing file, a missing
S3 object), never by a catch-all: a store that cannot be read stops the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.results import aget_default_result_storage
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from pydantic import BaseModel, StringConstraints, ValidationError

from nanophoto.errors import ConfigurationError, NanoPhotoError
from nanophoto.models import VideoJob, VideoResult
from nanophoto.settings import current_settings
from tasks.locks import REDIS_URL_VARIABLE, KeyBusyError, key_lock, lock_manager

FOLDER: Final = "sora2-submissions"
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
# How long a run waits for another run's claim on its key: in NanoPhoto's seconds, and at
# least a minute of ours; SORA2_KEY_WAIT (our seconds) sets it outright.
KEY_WAIT_S: Final = 600.0
KEY_WAIT_MIN_S: Final = 60.0
KEY_WAIT_VARIABLE: Final = "SORA2_KEY_WAIT"
# How long a claim lives unless renewed (its run renews it 4 times as often): a run that
# died leaves its key to others after this. NanoPhoto's seconds, at least 5 of ours.
CLAIM_TTL_S: Final = 120.0
CLAIM_TTL_MIN_S: Final = 5.0
# A critical section is one read and one write; a lock server frees a dead holder's key
# after this.
_LOCK_HOLD_S: Final = 60.0
# Records shared by machines need a shared lock; set this only if every worker runs on
# this one machine (file locks then suffice).
LOCAL_LOCKS_VARIABLE: Final = "SORA2_LOCAL_LOCKS"

State = Literal["queued", "sending", "submitted", "completed", "failed", "refused", "released"]
ItemKey = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.:-]{1,300}$"),
]

IdempotencyKey = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.:-]{1,200}$"),
]


class SubmissionStorageError(NanoPhotoError):
    """The submission record could not be read or written: nothing is submitted."""

    code = "SUBMISSION_STORAGE_ERROR"
    may_have_started = False


class KeyInUseError(NanoPhotoError):
    """Another run held the idempotency key for longer than we wait: nothing was sent."""

    code = "IDEMPOTENCY_KEY_IN_USE"
    may_have_started = False


class ClaimLostError(KeyInUseError):
    """Our claim on the key ran out and another run took it: we do not send."""


class SubmissionRecord(BaseModel):
    """What we know of one idempotency key's video."""

    key: str
    state: State
    fingerprint: str
    task_id: str | None = None
    prompt: str = ""
    cost: int = 0  # the video's price
    attempts: int = 1
    result: VideoResult | None = None
    updated_at: datetime
    created_at: datetime | None = None
    flow_run_id: str | None = None
    tier: str | None = None
    duration: int | None = None
    prompt_credits: int = 0  # prompt streams paid for this key (a takeover reuses the prompt)
    possibly_charged_twice: bool = False  # an unknown outcome was sent again on purpose
    note: str = ""
    claim: str | None = None  # the run that claimed the key (a token), while queued or sending
    claimed_until: datetime | None = None  # the claim's lease; renewed while queued or sending

    def claimed_by_another(self, token: str) -> bool:
        """A live claim of another run: it is preparing or sending this key's submit.

        A run renews its claim while it is alive, through ``sending`` too: a
        ``sending`` record with a live claim is a submit on the wire whose answer
        its run will record (wait for it); one whose claim ran out is an unknown
        outcome (its run stopped, or could not tell).
        """
        return (
            self.state in ("queued", "sending")
            and self.claim not in (None, token)
            and self.claimed_until is not None
            and self.claimed_until > datetime.now(UTC)
        )

    @property
    def unknown(self) -> bool:
        """The last submit may have reached NanoPhoto and nobody knows how it ended (a
        submit still on the wire, its run alive, is not unknown yet)."""
        return self.state == "sending" and not self.claimed_by_another("")

    def what_to_do(self) -> str:
        """The next step for a person, in a line."""
        if self.state == "sending" and not self.unknown:
            return f"being sent right now by flow run {self.flow_run_id}: wait for it"
        if self.state == "sending":
            return (
                f"outcome unknown: look for a video made around {self.updated_at:%Y-%m-%d %H:%M} "
                f"UTC in your NanoPhoto account; then resolve the key with its task id "
                f"(sora2 submissions resolve --key {self.key} --task-id ...), or release it "
                f"to allow a new submit that may charge {self.cost} credits twice "
                f"(sora2 submissions release --key {self.key})"
            )
        if self.state == "queued":
            return "claimed; nothing was sent yet (a rerun submits)"
        if self.state == "submitted":
            return f"being made: a rerun resumes task {self.task_id} (nothing is paid again)"
        if self.state == "completed":
            return "delivered"
        if self.state in ("failed", "refused", "released"):
            return "nothing to do: a rerun may submit (one new paid attempt)"
        return ""


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


# --- where records are kept: "absent" decided per kind of storage ------------------------


class RecordFiles(Protocol):
    """Bytes by path in a shared store."""

    lock_directory: Path  # where file locks live, if no lock server is configured

    async def read(self, path: str) -> bytes | None:
        """The file's bytes; None only if it surely does not exist."""

    async def write(self, path: str, content: bytes) -> None:
        """Write the whole file, never half of it."""

    async def list(self, folder: str) -> list[str]:
        """The paths of the files in ``folder``."""


class LocalRecords:
    """A folder on this machine (Prefect's ``LocalFileSystem``): atomic renames."""

    def __init__(self, storage: LocalFileSystem) -> None:
        self.root = Path(storage.basepath or ".").expanduser().resolve()
        self.lock_directory = self.root / FOLDER / ".locks"

    async def read(self, path: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self.root / path).read_bytes)
        except FileNotFoundError:
            return None

    async def write(self, path: str, content: bytes) -> None:
        await asyncio.to_thread(self._write, self.root / path, content)

    @staticmethod
    def _write(target: Path, content: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".record-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    async def list(self, folder: str) -> list[str]:
        directory = self.root / folder
        names = await asyncio.to_thread(lambda: sorted(os.listdir(directory)))
        return [f"{folder}/{name}" for name in names if name.endswith(".json")]


class FsspecRecords:
    """Prefect's ``RemoteFileSystem`` (any fsspec URL): a missing file is FileNotFoundError."""

    def __init__(self, storage: RemoteFileSystem) -> None:
        self.storage = storage
        self.lock_directory = Path(get_current_settings().home) / "sora2-locks"

    def _full(self, path: str) -> str:
        return f"{self.storage.basepath.rstrip('/')}/{path}"

    async def read(self, path: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self.storage.filesystem.cat_file, self._full(path))
        except FileNotFoundError:
            return None

    async def write(self, path: str, content: bytes) -> None:
        await asyncio.to_thread(self.storage.filesystem.pipe_file, self._full(path), content)

    async def list(self, folder: str) -> list[str]:
        try:
            found = await asyncio.to_thread(self.storage.filesystem.ls, self._full(folder), False)
        except FileNotFoundError:
            return []
        return [f"{folder}/{str(p).rsplit('/', 1)[-1]}" for p in found if str(p).endswith(".json")]


class S3Records:
    """prefect-aws's ``S3Bucket``: a missing object is botocore's 404 / NoSuchKey."""

    _ABSENT: Final = frozenset({"404", "NoSuchKey", "NotFound"})

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.lock_directory = Path(get_current_settings().home) / "sora2-locks"

    async def read(self, path: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            content: bytes = await self.storage.aread_path(path)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in self._ABSENT:
                return None
            raise
        return content

    async def write(self, path: str, content: bytes) -> None:
        await self.storage.awrite_path(path, content)  # one PUT: whole or not at all

    async def list(self, folder: str) -> list[str]:
        objects = await self.storage.alist_objects(f"{folder}/")
        prefix = (self.storage.bucket_folder or "").strip("/")
        keys = [str(o["Key"]) for o in objects]
        return [k.removeprefix(f"{prefix}/") if prefix else k for k in keys if k.endswith(".json")]


def record_files(storage: WritableFileSystem) -> RecordFiles:
    """The adapter for this kind of result storage; a kind we cannot vouch for is refused."""
    if isinstance(storage, LocalFileSystem):
        return LocalRecords(storage)
    if isinstance(storage, RemoteFileSystem):
        return FsspecRecords(storage)
    if type(storage).__module__.startswith("prefect_aws") and type(storage).__name__ == "S3Bucket":
        return S3Records(storage)
    raise ConfigurationError(
        f"submission records cannot be kept in a {type(storage).__name__} block: use a "
        "local folder (PREFECT_LOCAL_STORAGE_PATH), a RemoteFileSystem or an S3Bucket as "
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK. Nothing was sent."
    )


_RUN_STORES_KEPT: Final = 64


class SubmissionStore:
    """Reads and writes submission records, and holds their keys' locks."""

    def __init__(self, files: RecordFiles) -> None:
        self.files = files
        shared = not isinstance(files, LocalRecords)
        redis = os.environ.get(REDIS_URL_VARIABLE, "").strip()
        if shared and not redis and os.environ.get(LOCAL_LOCKS_VARIABLE, "") != "1":
            raise ConfigurationError(
                "submission records on shared storage need a lock every worker shares: set "
                f"{REDIS_URL_VARIABLE} (redis://host:6379/0), or {LOCAL_LOCKS_VARIABLE}=1 if "
                "every worker runs on this one machine. Nothing was sent."
            )
        self.locks = lock_manager(files.lock_directory)

    @classmethod
    async def default(cls) -> SubmissionStore:
        """The store in Prefect's default result storage, found once per flow run.

        Finding it asks the Prefect API for the server's default storage; a batch
        asked before every item's every step (2,000 calls for 500 videos, most of
        its CPU). A run keeps the store it found, so it also never switches stores
        midway; the settings that choose the store are part of the key.
        """
        run = flow_run.id
        settings = get_current_settings()
        key = (
            str(run),
            str(id(asyncio.get_running_loop())),  # a future waits on its own loop only
            str(settings.api.url),
            str(settings.results.default_storage_block),
            str(settings.results.local_storage_path),
            os.environ.get(REDIS_URL_VARIABLE, ""),
            os.environ.get(LOCAL_LOCKS_VARIABLE, ""),
        )
        if not run:
            return await cls._found()
        finding = _RUN_STORES.get(key)
        if finding is None:  # the first of a batch's items to ask: the others wait for it
            if len(_RUN_STORES) >= _RUN_STORES_KEPT:
                _RUN_STORES.pop(next(iter(_RUN_STORES)))  # the oldest run's
            finding = _RUN_STORES[key] = asyncio.ensure_future(cls._found())
        try:
            return await asyncio.shield(finding)  # one item cancelled cancels no other's
        except Exception:
            if _RUN_STORES.get(key) is finding:
                del _RUN_STORES[key]  # not found: the next step asks again
            raise

    @classmethod
    async def _found(cls) -> SubmissionStore:
        try:
            storage = await aget_default_result_storage()
        except Exception as error:
            raise SubmissionStorageError(
                f"could not open the result storage that keeps submission records "
                f"({type(error).__name__}); not submitting, to avoid paying twice"
            ) from error
        return cls(record_files(storage))

    async def read(self, key: str) -> SubmissionRecord | None:
        """The record for ``key``; None only when there surely is none."""
        return await self._read_path(record_path(key), key)

    async def _read_path(self, path: str, what: str) -> SubmissionRecord | None:
        try:
            content = await self.files.read(path)
        except Exception as error:
            raise SubmissionStorageError(
                f"could not read the submission record of {what!r} ({type(error).__name__}); "
                "not submitting, to avoid paying twice"
            ) from error
        if content is None:
            return None
        try:
            return SubmissionRecord.model_validate_json(content)
        except ValidationError:
            raise SubmissionStorageError(
                f"the submission record of {what!r} is unreadable (a write cut short, or "
                f"another version's?): {path}; not submitting, to avoid paying twice: check "
                "your NanoPhoto account"
            ) from None

    async def write(self, record: SubmissionRecord) -> SubmissionRecord:
        """Write ``record`` whole (a rename on local storage, one PUT on S3)."""
        record = record.model_copy(update={"updated_at": datetime.now(UTC)})
        try:
            await self.files.write(record_path(record.key), record.model_dump_json().encode())
        except Exception as error:
            raise SubmissionStorageError(
                f"could not write the submission record of {record.key!r} "
                f"({type(error).__name__})"
                + (f"; video task {record.task_id} was submitted" if record.task_id else "")
            ) from error
        return record

    async def update(
        self, key: str, expect: Callable[[SubmissionRecord], bool], change: dict[str, Any]
    ) -> SubmissionRecord | None:
        """Under the key's lock: apply ``change`` if the record is still what ``expect``
        says; None (nothing written) if another run changed it meanwhile."""
        async with self.holding(key):
            record = await self.read(key)
            if record is None or not expect(record):
                return None
            return await self.write(record.model_copy(update=change))

    async def all(self) -> tuple[list[SubmissionRecord], list[str]]:
        """Every record, newest first (the ledger a person reads), and the paths of
        records that cannot be read: never hidden, a rerun with their key stops."""
        try:
            paths = await self.files.list(FOLDER)
        except FileNotFoundError:
            return [], []
        except Exception as error:
            raise SubmissionStorageError(
                f"could not list the submission records ({type(error).__name__})"
            ) from error
        records, unreadable = [], []
        for path in paths:
            try:
                record = await self._read_path(path, path)
            except SubmissionStorageError:
                unreadable.append(path)
                continue
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.updated_at, reverse=True), unreadable

    @asynccontextmanager
    async def holding(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lock for one read and write; if another holds it longer than we
        wait, stop naming that run."""
        wait = key_wait()
        holder = new_claim_token()
        try:
            async with key_lock(self.locks, _lock_key(key), holder, wait=wait, hold=_LOCK_HOLD_S):
                yield
        except KeyBusyError:
            record = await self.read(key)
            raise key_in_use(key, record, wait) from None

    @staticmethod
    def new(
        key: str, state: State, print_: str, job: VideoJob, *, attempts: int = 1
    ) -> SubmissionRecord:
        """A record of ``job`` under ``key``, owned by this flow run."""
        now = datetime.now(UTC)
        return SubmissionRecord(
            key=key,
            state=state,
            fingerprint=print_,
            prompt=getattr(job, "prompt", "") or "",
            cost=job.cost,
            attempts=attempts,
            updated_at=now,
            created_at=now,
            flow_run_id=current_flow_run(),
            tier=job.model_tier.value,
            duration=job.duration,
        )


def key_wait() -> float:
    """Seconds a run waits for another run's claim on its key."""
    given = os.environ.get(KEY_WAIT_VARIABLE, "").strip()
    if given:
        try:
            return float(given)
        except ValueError:
            raise ConfigurationError(
                f"{KEY_WAIT_VARIABLE}: must be seconds, not {given!r}"
            ) from None
    return max(KEY_WAIT_S * current_settings().time_scale, KEY_WAIT_MIN_S)


# Each flow run's store (``SubmissionStore.default``), by run and the settings choosing it.
_RUN_STORES: dict[tuple[str, ...], asyncio.Future[SubmissionStore]] = {}


def claim_ttl() -> float:
    """Seconds a claim lives unless its run renews it."""
    return max(CLAIM_TTL_S * current_settings().time_scale, CLAIM_TTL_MIN_S)


def new_claim_token() -> str:
    """A token naming this flow run and this attempt at a key."""
    return f"{flow_run.id or 'no-flow-run'}:{uuid.uuid4().hex[:12]}"


def key_in_use(key: str, record: SubmissionRecord | None, wait: float) -> KeyInUseError:
    """The error of a run that waited for another run's claim in vain."""
    other = record.flow_run_id if record is not None else "unknown"
    return KeyInUseError(
        f"idempotency key {key!r} is claimed by another run (flow run {other}) for longer than "
        f"{wait:g} s; nothing was sent. Wait for that run, or use a new key."
    )


def current_flow_run() -> str | None:
    """This flow run's id, as records name their owner."""
    return str(flow_run.id) if flow_run.id else None


def record_path(key: str) -> str:
    """Where the record of ``key`` is kept, relative to the result storage."""
    return f"{FOLDER}/{hashlib.sha256(key.encode()).hexdigest()}.json"


def _lock_key(key: str) -> str:
    # Lock managers name keys in files or Redis keys: a hash keeps every key safe there.
    return "sora2-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def ledger_rows(
    records: list[SubmissionRecord], unreadable: list[str] | None = None
) -> list[dict[str, Any]]:
    """The submissions ledger as table rows: one per key, with what to do; a record that
    cannot be read is a row too (its key is unknown: its file is named)."""
    rows = [
        {
            "key": "(unreadable)",
            "state": "unreadable",
            "flow run": "",
            "updated (UTC)": "",
            "tier": "",
            "duration": "",
            "price": "",
            "task id": "",
            "prompt": "",
            "what to do": f"inspect {path}: a run with its key stops rather than pay again",
        }
        for path in unreadable or []
    ]
    return rows + [
        {
            "key": r.key,
            "state": r.state,
            "flow run": r.flow_run_id or "",
            "updated (UTC)": f"{r.updated_at:%Y-%m-%d %H:%M:%S}",
            "tier": r.tier or "",
            "duration": r.duration or "",
            "price": r.cost,
            "task id": r.task_id or "",
            "prompt": " ".join(r.prompt.split())[:80],
            "what to do": r.what_to_do(),
        }
        for r in records
    ]


def ledger_json(records: list[SubmissionRecord]) -> str:
    """The ledger as JSON, for scripts."""
    return json.dumps([r.model_dump(mode="json", exclude={"result"}) for r in records], indent=2)
