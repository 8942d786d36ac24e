"""``sora2 video``: the whole chain through the Prefect flow, from the command line."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from nanophoto.models import VideoRequest, fingerprint
from nanophoto_simulator import DEFAULT_KEY, Simulator
from sora2.cli import main
from tasks.submissions import SubmissionStore

# NanoPhoto's seconds, as a user types them: NANOPHOTO_TIME_SCALE compresses them.
FAST = ["--initial-status-delay", "120", "--status-check-interval", "20", "--max-wait", "1200"]


def test_video_runs_the_flow_and_prints_the_result(api: Simulator, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(
        [
            "video",
            "--topic",
            "A red fox at dawn",
            "--aspect-ratio",
            "landscape",
            *FAST,
            "--output-dir",
            str(tmp_path),
        ],
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    document = json.loads(out.getvalue())
    assert document["stage"] == "video"
    result = document["response"]
    assert Path(result["video_path"]).read_bytes()[4:8] == b"ftyp"
    assert result["prompt"].startswith("A red fox at dawn")
    assert api.snapshot()["tasks"][0]["aspect_ratio"] == "landscape"
    assert api.snapshot()["credits"][DEFAULT_KEY]["charged"] == 6


def test_video_refuses_bad_video_options_before_paying_for_a_prompt(
    api: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    err = io.StringIO()
    code = main(
        ["video", "--topic", "A fox", "--mode", "imageToVideo"], stdout=io.StringIO(), stderr=err
    )
    assert code == 2
    assert "--image-url" in err.getvalue()
    assert api.snapshot()["total_requests"] == 0


async def unknown_outcome(key: str, prompt: str) -> None:
    """A key whose submit may have reached NanoPhoto: ``sending``, its run gone."""
    store = await SubmissionStore.default()
    job = VideoRequest(prompt=prompt)
    await store.write(SubmissionStore.new(key, "sending", fingerprint(job), job))


def sora2(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), stdout=out, stderr=err)
    decoder, text, documents = json.JSONDecoder(), out.getvalue().strip(), []
    while text:
        document, end = decoder.raw_decode(text)
        documents.append(document)
        text = text[end:].strip()
    return code, documents, err.getvalue()


def test_submissions_resolve_and_release_a_batch_items_unknown_outcome_from_the_cli(
    api: Simulator, tmp_path: Path
) -> None:
    batch = f"cli-batch-{uuid.uuid4().hex[:8]}"
    found, given_up = f"{batch}:a1b2c3d4e5f6", f"{batch}:0f9e8d7c6b5a"
    asyncio.run(unknown_outcome(found, "A heron in fog"))
    asyncio.run(unknown_outcome(given_up, "A kite over dunes"))
    code, documents, stderr = sora2("submissions", "list")
    assert code == 0, stderr
    listed = {d["response"]["key"]: d["response"] for d in documents}
    assert listed[found]["state"] == "sending"
    assert "resolve" in listed[found]["what_to_do"]
    assert "unknown outcome" in stderr
    # The person finds the video in their NanoPhoto account (here: the simulator's).
    code, submitted, stderr = sora2("submit", "--prompt", "A heron in fog")
    assert code == 0, stderr
    task_id = submitted[0]["response"]["taskId"]
    requests_before = api.snapshot()["submits"]

    code, documents, stderr = sora2(
        "submissions", "resolve", "--key", found, "--task-id", task_id, *FAST,
        "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, stderr
    assert documents[-1]["response"]["state"] == "completed"
    assert documents[-1]["response"]["task_id"] == task_id
    assert (tmp_path / f"{task_id}.mp4").read_bytes()[4:8] == b"ftyp"

    code, documents, stderr = sora2("submissions", "release", "--key", given_up)
    assert code == 0, stderr
    assert documents[-1]["response"]["state"] == "released"
    assert api.snapshot()["submits"] == requests_before  # neither way out submits anything
    # A key with nothing unknown cannot be released.
    code, _, stderr = sora2("submissions", "release", "--key", found)
    assert code == 1
    assert "not an unknown outcome" in stderr
