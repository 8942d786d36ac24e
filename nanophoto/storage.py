"""Where finished videos are kept: a local folder or any fsspec URL, one file per task.

A video is written under a temporary name and moved to ``<taskId>.mp4`` only
once it is whole, so a file with the final name is a complete video: a rerun
finds it and does not download it again (the URL may have expired by then).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import fsspec
from fsspec.core import split_protocol, url_to_fs

from nanophoto.models import video_filename

_CHUNK = 1 << 20
# The one folder a flow run may write videos to on the worker's disk (remote URLs
# aside): a parameter cannot send them to ../../etc. Default: videos/ in the working
# directory, which is the project on a deployment's worker (prefect.yaml's pull step).
OUTPUT_ROOT_VARIABLE: Final = "SORA2_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT: Final = Path("videos")
# fsspec's names for this machine's own disk: such a location is confined to the root.
LOCAL_PROTOCOLS: Final = frozenset({"file", "local"})
# Stores on other machines (or in memory) that a video may be written to as given.
# Not fsspec's wrappers (simplecache://, dir://, zip://, …): they can write to this disk.
REMOTE_PROTOCOLS: Final = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "hdfs", "webhdfs"}
    | {"sftp", "ssh", "ftp", "smb", "oci", "dbfs", "hf"}
)


@dataclass(frozen=True)
class StoredVideo:
    """A whole video in the store, with what proves it is whole."""

    path: str
    size: int
    sha256: str


class VideoStore:
    """Videos under ``location``: a folder (``videos``) or a URL (``s3://bucket/videos``).

    Example:
        ```python
        store = VideoStore("memory://renders")
        store.existing("task_1")  # None until it is saved
        ```
    """

    def __init__(self, location: str, **storage_options: Any) -> None:
        if not location.strip():
            raise ValueError("output: must name a folder or an fsspec URL")
        self.location = location
        self.fs: fsspec.AbstractFileSystem
        self.fs, self.root = url_to_fs(location, **storage_options)

    def __repr__(self) -> str:
        return f"VideoStore({self.location!r})"

    @property
    def is_local(self) -> bool:
        """Whether videos land on this machine's disk."""
        return "file" in _protocols(self.fs)

    def path_of(self, task_id: str) -> str:
        """Where the video of ``task_id`` is kept: a local path, or a URL."""
        path = f"{self.root.rstrip('/')}/{video_filename(task_id)}"
        if self.is_local:
            return os.path.normpath(path)
        return str(self.fs.unstrip_protocol(path))

    def existing(self, task_id: str) -> StoredVideo | None:
        """The video already saved for ``task_id``, read back to checksum it; else None."""
        path = self._fs_path(task_id)
        if not self.fs.exists(path):
            return None
        digest, size = hashlib.sha256(), 0
        with self.fs.open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        if size == 0:
            return None
        return StoredVideo(self.path_of(task_id), size, digest.hexdigest())

    def open_partial(self, task_id: str) -> tuple[str, IO[bytes]]:
        """A new temporary file beside the final one, open for writing."""
        self.fs.makedirs(self.root, exist_ok=True)
        name = f".{video_filename(task_id)}.{secrets.token_hex(4)}.part"
        partial = f"{self.root.rstrip('/')}/{name}"
        return partial, self.fs.open(partial, "wb")

    def publish(self, partial: str, task_id: str) -> str:
        """Give a whole temporary file its final name; returns where it is."""
        self.fs.mv(partial, self._fs_path(task_id))
        return self.path_of(task_id)

    def discard(self, partial: str) -> None:
        """Remove a temporary file that will never be whole."""
        try:
            if self.fs.exists(partial):
                self.fs.rm(partial)
        except OSError:
            pass

    def _fs_path(self, task_id: str) -> str:
        return f"{self.root.rstrip('/')}/{video_filename(task_id)}"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def output_root() -> Path:
    """The worker's output folder: ``$SORA2_OUTPUT_ROOT``, else ``./videos``."""
    return Path(os.environ.get(OUTPUT_ROOT_VARIABLE) or DEFAULT_OUTPUT_ROOT)


def confined(location: str, root: Path) -> str:
    """Where ``location`` may be written: a local path inside ``root``, or a remote URL.

    A relative path is taken inside ``root``; neither ``..`` nor a symlink nor
    an absolute path leads out of it. A URL with a remote fsspec scheme
    (``s3://``, ``gcs://``, ``memory://``) is kept as given; an unknown scheme
    or a chained URL is refused. Empty stays empty (no download).

    Raises:
        ValueError: ``location`` would be written outside ``root``, or cannot be.
    """
    text = location.strip()
    if not text:
        return ""
    if "::" in text:
        raise ValueError("a chained fsspec URL (with ::) is not accepted; name one folder or URL")
    protocol, path = split_protocol(text)
    if protocol is not None and protocol not in LOCAL_PROTOCOLS:
        if protocol not in REMOTE_PROTOCOLS:
            known = ", ".join(f"{name}://" for name in sorted(REMOTE_PROTOCOLS))
            raise ValueError(f"{protocol}:// is not a remote store; use a folder or one of {known}")
        return text
    base = root.expanduser().resolve()
    target = (base / path).resolve()  # an absolute path replaces base, then must lie inside it
    if not target.is_relative_to(base):
        raise ValueError(f"{location!r} is outside the output folder {base}; name one inside it")
    return str(target)
