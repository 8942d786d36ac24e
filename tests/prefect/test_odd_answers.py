"""Odd answers from the field, replayed through the flows: each ends as a user expects.

A check that fails for now is a warning, not a red task run; an ending names
the task id and how to pick the video up; NanoPhoto's edge, with its browser
check, lets our requests through; bad input is refused by Prefect's own
parameter validation before any request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import State, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler

from flows.batch import BatchItem, batch_of_videos
from flows.pipeline import MAX_RUN_COUNT
from flows.submissions import submissions
from flows.video import prompt_to_video, resume_video, topic_to_video
from nanophoto.contract import ACCEPT, DEFAULT_USER_AGENT, ORIGIN, REFERER
from nanophoto_simulator import DEFAULT_KEY, Fault, Simulator
from tests.helpers import MakeSimulator, exception_text, use_simulator

# Answers the contract does not describe, as they were seen.
LOGIN_REQUIRED = {
    "success": False,
    "error": "Authentication required",
    "errorCode": "LOGIN_REQUIRED",
}


def completed_without_url(task_id: str) -> dict[str, Any]:
    return {"success": True, "status": "completed", "taskId": task_id, "creditsUsed": 4}


def flow_run_id(state: State[Any]) -> UUID:
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return run_id


async def task_run_states(state: State[Any]) -> dict[str, list[str]]:
    """Each task run's name and final state type, for the run ``state`` ended."""
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))
        )
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run.state_type.value if run.state_type else "?", []).append(run.name)
    return found


async def run_logs(state: State[Any]) -> str:
    """The run's log lines as the API has them, once this process has shipped them all."""
    await APILogHandler.aflush()  # logs go out in batches: the last ones may still be queued
    async with get_client() as client:
        logs = await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id(state)]))
        )
    return "\n".join(log.message for log in logs)


async def test_a_check_rate_limited_past_the_clients_retries_is_a_warning_not_a_red_task(
    api: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOPHOTO_MAX_RETRIES", "1")
    api.queue_fault("check-status", Fault.RATE_LIMITED, Fault.RATE_LIMITED, Fault.GATEWAY_ERROR)
    api.queue_fault("check-status", Fault.GATEWAY_ERROR)
    state = await prompt_to_video(prompt="a fox", output_dir=str(tmp_path), return_state=True)
    assert state.is_completed(), await exception_text(state)
    states = await task_run_states(state)
    assert set(states) == {"COMPLETED"}, states  # no failed task run, though two checks failed
    logs = await run_logs(state)
    assert "rate limited (429): the next check of" in logs
    assert "status check failed" in logs


async def test_a_401_in_the_middle_of_a_watch_names_the_task_and_how_to_resume(
    api: Simulator, tmp_path: Path
) -> None:
    api.queue_answer("check-status", 401, LOGIN_REQUIRED)
    state = await prompt_to_video(prompt="a fox", output_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    task_id = api.snapshot()["tasks"][0]["task_id"]
    message = await exception_text(state)
    assert "LOGIN_REQUIRED" in message
    assert task_id in message
    assert f"resume-video with task_id={task_id}" in message
    assert "may still finish" in message
    # Resumed once the key works: the same video, downloaded, paid once.
    resumed = await resume_video(task_id=task_id, output_dir=str(tmp_path))
    assert resumed.video_path is not None
    assert Path(resumed.video_path).exists()
    assert api.snapshot()["submits"] == 1


async def test_completed_without_a_url_is_reported_as_paid_and_resumable_never_refunded(
    api: Simulator, tmp_path: Path
) -> None:
    result = await prompt_to_video(prompt="a fox", output_dir="")  # a task id to replay with
    for _ in range(3):
        api.queue_answer("check-status", 200, completed_without_url(result.task_id))
    state = await resume_video(task_id=result.task_id, output_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    message = await exception_text(state)
    assert "completed (and charged) but gave no video URL" in message
    assert result.task_id in message
    assert "not refunded" in message
    assert "refunds" not in message
    assert "resume" in message
    assert not list(tmp_path.glob("*.mp4"))


async def test_a_retry_after_past_the_watch_says_how_long_and_when(
    api: Simulator, tmp_path: Path
) -> None:
    api.queue_answer(
        "check-status",
        429,
        {"success": False, "error": "slow down", "errorCode": "API_KEY_RATE_LIMIT_EXCEEDED"},
        {"Retry-After": "3600"},
    )
    state = await prompt_to_video(
        prompt="a fox",
        schedule={"initial_delay": 120, "interval": 20, "max_wait": 300},
        output_dir=str(tmp_path),
        return_state=True,
    )
    logs = await run_logs(state)
    assert "the next check of" in logs
    assert "waits 3600 s, past the" in logs
    assert "one last check at" in logs
    assert "resume-video" in logs


async def test_a_url_that_answers_404_at_first_is_downloaded_with_a_fresh_status(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = make_simulator(video_url_delay_seconds=15)  # the CDN catches up 15 s late
    use_simulator(api, monkeypatch)
    result = await prompt_to_video(prompt="a fox", output_dir=str(tmp_path))
    assert result.video_path is not None
    assert Path(result.video_path).read_bytes()[4:8] == b"ftyp"
    ledger = api.snapshot()
    assert ledger["media"]["downloads"] == 1
    assert ledger["submits"] == 1


@pytest.mark.parametrize("http_status", [200, 500])
async def test_a_failed_video_is_final_and_refunded_with_either_http_status(
    make_simulator: MakeSimulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    http_status: int,
) -> None:
    api = make_simulator(failed_http_status=http_status)
    use_simulator(api, monkeypatch)
    api.config.faults = api.config.faults.model_copy(update={"generation_failed": 1.0})
    state = await prompt_to_video(prompt="a fox", output_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    message = await exception_text(state)
    task = api.snapshot()["tasks"][0]
    assert f"video {task['task_id']} failed" in message
    assert "refunds its 4 credits" in message
    assert task["status_checks"] >= 1
    ledger = api.snapshot()
    assert ledger["credits"][DEFAULT_KEY]["refunded"] == 4
    assert ledger["submits"] == 1


async def test_the_edge_lets_through_the_headers_nanophotos_own_tools_send(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = make_simulator(edge=True)
    use_simulator(api, monkeypatch)
    result = await topic_to_video(topic="A fox at dawn", output_dir=str(tmp_path))
    assert result.video_path is not None
    ledger = api.snapshot()
    assert ledger["edge_refused"] == 0
    sent = {(h["user_agent"], h["origin"], h["referer"], h["accept"]) for h in ledger["headers"]}
    assert sent == {(DEFAULT_USER_AGENT, ORIGIN, REFERER, ACCEPT)}


async def test_a_user_agent_the_edge_refuses_fails_at_once_and_costs_nothing(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = make_simulator(edge=True)
    use_simulator(api, monkeypatch)
    monkeypatch.setenv("NANOPHOTO_USER_AGENT", "python-httpx/0.28")
    state = await prompt_to_video(prompt="a fox", output_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    message = await exception_text(state)
    assert "blocked at NanoPhoto's edge" in message
    assert "Nothing was started" in message
    ledger = api.snapshot()
    assert ledger["edge_refused"] == 1  # not retried, and never an unknown outcome
    assert ledger["submits"] == 0
    assert ledger["total_requests"] == 0


# --- harmful input: Prefect's own parameter validation refuses it, 0 requests ---------

HARMFUL: list[tuple[dict[str, Any], str]] = [
    ({"output_dir": "../../etc"}, "output_dir"),
    ({"output_dir": "/etc"}, "output_dir"),
    ({"output_dir": "file:///etc"}, "output_dir"),
    ({"output_dir": "simplecache::file:///etc"}, "output_dir"),
    ({"output_dir": "dir:///etc"}, "output_dir"),
    ({"schedule": {"interval": 1e-6}}, "interval"),
    ({"schedule": {"interval": 4.9}}, "interval"),
]


@pytest.mark.parametrize(("harm", "field"), HARMFUL)
async def test_harmful_input_is_refused_by_parameter_validation_before_any_request(
    api: Simulator, harm: dict[str, Any], field: str
) -> None:
    flows: list[tuple[Any, dict[str, Any]]] = [
        (topic_to_video, {"topic": "A fox"}),
        (prompt_to_video, {"prompt": "a fox"}),
        (batch_of_videos, {"items": [{"prompt": "a fox"}]}),
    ]
    if "output_dir" in harm:
        flows += [
            (resume_video, {"task_id": "task_1"}),
            (submissions, {"action": "resolve", "idempotency_key": "k", "task_id": "task_1"}),
        ]
    for flow, needed in flows:
        state = await flow(**needed, **harm, return_state=True)
        assert state.is_failed(), flow.name
        assert "Validation of flow parameters failed" in (state.message or ""), flow.name
        assert field in await exception_text(state), flow.name
    assert api.snapshot()["total_requests"] == 0


async def test_an_output_folder_inside_the_root_and_remote_urls_are_kept(
    api: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SORA2_OUTPUT_ROOT", str(tmp_path))
    validated = prompt_to_video.validate_parameters({"prompt": "a fox"})
    assert validated["output_dir"] == str(tmp_path)  # the default "." is the root itself
    inside = prompt_to_video.validate_parameters({"prompt": "a fox", "output_dir": "a/../b"})
    assert inside["output_dir"] == str(tmp_path / "b")
    for url in ("s3://bucket/videos", "memory://renders", ""):
        kept = prompt_to_video.validate_parameters({"prompt": "a fox", "output_dir": url})
        assert kept["output_dir"] == url
    result = await prompt_to_video(prompt="a fox", output_dir="nested")
    assert result.video_path == str(tmp_path / "nested" / f"{result.task_id}.mp4")


async def test_a_symlink_inside_the_root_cannot_lead_out_of_it(
    api: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    monkeypatch.setenv("SORA2_OUTPUT_ROOT", str(root))
    state = await prompt_to_video(prompt="a fox", output_dir="escape", return_state=True)
    assert state.is_failed()
    assert "outside the output folder" in await exception_text(state)
    assert api.snapshot()["total_requests"] == 0


async def test_a_run_started_too_often_stops_at_its_first_line_sending_nothing(
    api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry-crashed-video-runs automation schedules a crashed run again; one that
    keeps crashing must not loop for ever."""
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__RUN_COUNT", str(MAX_RUN_COUNT + 1))
    for run in (
        prompt_to_video(prompt="A fox", return_state=True),
        batch_of_videos(items=[BatchItem(prompt="A fox")], return_state=True),
        resume_video(task_id="task_abc123", return_state=True),
    ):
        state = await run
        assert state.is_failed()
        assert f"started {MAX_RUN_COUNT + 1} times" in await exception_text(state)
    assert api.snapshot()["total_requests"] == 0
