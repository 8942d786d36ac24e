"""``sora2 video``: the whole chain through the Prefect flow, from the command line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nanophoto_simulator import DEFAULT_KEY, Simulator
from sora2.cli import main

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
