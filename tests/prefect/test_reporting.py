"""Reporting to Prefect is best-effort: a Prefect hiccup never fails a paid video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import tasks.observe
from flows.video import prompt_to_video
from nanophoto_simulator import Simulator

# Prefect's calls behind every artifact and event we report (not our code: Prefect's API).
PREFECT_REPORTING = (
    "acreate_progress_artifact",
    "aupdate_progress_artifact",
    "acreate_link_artifact",
    "acreate_markdown_artifact",
    "emit_event",
)


async def test_a_prefect_hiccup_while_reporting_never_fails_a_paid_video(
    api: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hiccup(*args: Any, **kwargs: Any) -> Any:
        raise httpx.ConnectError("the Prefect API is restarting")

    async def async_hiccup(*args: Any, **kwargs: Any) -> Any:
        hiccup()

    for name in PREFECT_REPORTING:
        monkeypatch.setattr(tasks.observe, name, hiccup if name == "emit_event" else async_hiccup)
    result = await prompt_to_video(prompt="a fox", output_dir=str(tmp_path))
    assert Path(str(result.video_path)).read_bytes()[4:8] == b"ftyp"
    assert api.snapshot()["submits"] == 1
