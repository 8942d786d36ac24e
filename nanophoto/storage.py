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
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from nanophoto.models import video_filename

_CHUNK = 1 << 20


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
