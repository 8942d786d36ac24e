"""Videos land whole in a folder or any fsspec URL, named by task id, and once only."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import fsspec
import pytest

from nanophoto.client import NanoPhotoClient
from nanophoto.errors import VideoUnavailableError
from nanophoto.models import VideoRequest
from nanophoto.storage import VideoStore
from nanophoto_simulator import Simulator
from tests.helpers import settings_for


async def submit_and_finish(client: NanoPhotoClient) -> tuple[str, str]:
    """A finished video of the simulator: its task id and URL."""
    status = await client.submit(VideoRequest(prompt="A fox at dawn"))
    for _ in range(90):  # every 0.1 s: at most 4.8 s of generation, under 100 requests
        final = await client.check_status(status.task_id)
        if final.video_url:
            return status.task_id, final.video_url
        await asyncio.sleep(0.1)
    raise AssertionError("the simulator never finished the video")


@pytest.mark.parametrize("location", ["local", "memory://renders"])
async def test_a_video_is_saved_whole_under_its_task_id(
    simulator: Simulator, tmp_path: Path, location: str
) -> None:
    where = str(tmp_path / "videos") if location == "local" else location
    store = VideoStore(where)
    async with NanoPhotoClient(settings=settings_for(simulator)) as client:
        task_id, url = await submit_and_finish(client)
        assert store.existing(task_id) is None
        saved = await client.download(url, store, task_id)
    assert saved.path.endswith(f"{task_id}.mp4")
    with fsspec.open(saved.path, "rb") as file:
        data = file.read()
    assert data[4:8] == b"ftyp"
    assert (saved.size, saved.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    kept = store.existing(task_id)
    assert kept is not None
    assert (kept.size, kept.sha256) == (saved.size, saved.sha256)
    # Nothing but the final file is left behind.
    assert [Path(p).name for p in store.fs.ls(store.root, detail=False)] == [f"{task_id}.mp4"]


async def test_a_failed_download_leaves_no_file(simulator: Simulator, tmp_path: Path) -> None:
    store = VideoStore(str(tmp_path))
    async with NanoPhotoClient(settings=settings_for(simulator)) as client:
        with pytest.raises(VideoUnavailableError):
            await client.download(f"{simulator.media_url}/sora/task_x.mp4", store, "task_x")
    assert list(tmp_path.iterdir()) == []
    assert store.existing("task_x") is None


def test_an_empty_location_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="output"):
        VideoStore("  ")
