"""``sora2`` side by side with NanoPhoto's published tools, and odd answers from the field.

The published tools' documented invocations against the simulator with its
edge on: the same headers on the wire, the same exit codes for the same
outcomes. Then the odd answers users met, replayed: each ends without a
traceback, naming the task id and what to do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from nanophoto.contract import (
    ACCEPT,
    DEFAULT_USER_AGENT,
    ORIGIN,
    PROMPT_COST,
    PROMPT_TIMEOUT_S,
    REFERER,
)
from nanophoto.settings import PROMPT_SKILL, VIDEO_SKILL
from nanophoto_simulator import DEFAULT_KEY, Simulator
from sora2.arguments import settings_from
from sora2.cli import build_parser
from tests.helpers import MakeSimulator, use_simulator
from tests.unit.test_cli import FAST, sora2

PUBLISHED_HEADERS = (DEFAULT_USER_AGENT, ORIGIN, REFERER, ACCEPT)


@pytest.fixture
def edge(make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """The simulator behind its edge, as the sandbox and the demo run it: 130 s videos."""
    simulator = make_simulator(edge=True, generation_seconds=(130, 130))
    use_simulator(simulator, monkeypatch)
    return simulator


def headers_seen(simulator: Simulator) -> set[tuple[str, str, str, str]]:
    return {
        (h["user_agent"], h["origin"], h["referer"], h["accept"])
        for h in simulator.snapshot()["headers"]
    }


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


# --- the published tools' invocations, behind the edge ---------------------------------


def test_the_published_invocations_pass_the_edge_with_the_published_headers(
    edge: Simulator,
) -> None:
    code, documents, stderr = sora2("submit", "--prompt", "A fox", "--follow", *FAST)
    assert code == 0, stderr
    task_id = documents[0]["response"]["taskId"]
    assert sora2("status", "--task-id", task_id)[0] == 0
    assert sora2("status", "--task-id", task_id, "--json-only")[0] == 0
    assert sora2("prompt", "--topic", "A fox", "--json")[0] == 0
    assert edge.snapshot()["edge_refused"] == 0
    assert headers_seen(edge) == {PUBLISHED_HEADERS}


@pytest.mark.parametrize("command", ["submit", "status", "prompt"])
def test_user_agent_is_accepted_where_the_published_tools_take_it(
    edge: Simulator, command: str
) -> None:
    argv = {
        "submit": ["submit", "--prompt", "A fox"],
        "status": ["status", "--task-id", "task_none"],
        "prompt": ["prompt", "--topic", "A fox", "--json"],
    }[command]
    browser = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 Safari/605.1"
    code, _, stderr = sora2(*argv, "--user-agent", browser)
    assert code == (1 if command == "status" else 0), stderr  # task_none: TASK_NOT_FOUND
    assert {h[0] for h in headers_seen(edge)} == {browser}


def test_a_user_agent_the_edge_refuses_exits_1_at_once_saying_nothing_was_charged(
    edge: Simulator,
) -> None:
    code, documents, stderr = sora2("submit", "--prompt", "A fox", "--user-agent", "curl/8.0")
    assert code == 1
    assert documents == []
    assert "blocked at NanoPhoto's edge" in stderr
    assert "Nothing was started or charged" in stderr
    no_traceback(stderr)
    ledger = edge.snapshot()
    assert ledger["edge_refused"] == 1  # refused once, not retried
    assert ledger["submits"] == 0


def test_user_agent_also_comes_from_the_environment(
    edge: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOPHOTO_USER_AGENT", "python-requests/2.32")
    code, _, stderr = sora2("submit", "--prompt", "A fox")
    assert code == 1
    assert "NANOPHOTO_USER_AGENT" in stderr


def test_status_of_a_failed_task_exits_0_with_either_http_status(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for http_status in (200, 500):
        sim = make_simulator(edge=True, generation_seconds=(130, 130))
        sim.config.failed_http_status = http_status
        use_simulator(sim, monkeypatch)
        sim.queue_fault("generate", "generation_failed")
        code, documents, _ = sora2("submit", "--prompt", "A fox", "--follow", *FAST)
        assert code == 1  # a followed video that failed: a failure, as the published tool
        task_id = documents[0]["response"]["taskId"]
        code, status, stderr = sora2("status", "--task-id", task_id)
        assert code == 0, stderr  # status reports; it does not judge
        assert status[0]["response"]["status"] == "failed"
        assert status[0]["response"]["errorCode"] == "GENERATION_FAILED"


def test_each_command_reads_the_openclaw_entry_its_published_counterpart_reads(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sim = make_simulator(keys={"video-key": 100, "prompt-key": 100}, edge=True)
    use_simulator(sim, monkeypatch)
    monkeypatch.delenv("NANOPHOTO_API_KEY")
    openclaw = tmp_path / "openclaw.json"
    entries = {
        VIDEO_SKILL: {"env": {"NANOPHOTO_API_KEY": "video-key"}},
        PROMPT_SKILL: {"env": {"NANOPHOTO_API_KEY": "prompt-key"}},
    }
    openclaw.write_text(json.dumps({"skills": {"entries": entries}}))
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(openclaw))
    assert sora2("prompt", "--topic", "A fox", "--json")[0] == 0
    assert sora2("submit", "--prompt", "A fox")[0] == 0
    requests = sim.snapshot()["requests"]
    assert requests["prompt-key"] == {"generate-prompt": 1}
    assert requests["video-key"] == {"generate": 1}


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_timeouts_come_from_the_environment_unless_the_flag_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NANOPHOTO_READ_TIMEOUT", "33")
    assert settings_from(parsed("submit", "--prompt", "A fox")).read_timeout == 33
    assert settings_from(parsed("prompt", "--topic", "A fox", "--json")).read_timeout == 33
    flagged = settings_from(parsed("submit", "--prompt", "A fox", "--timeout", "7"))
    assert (flagged.read_timeout, flagged.connect_timeout) == (7, 7)
    monkeypatch.delenv("NANOPHOTO_READ_TIMEOUT")
    assert (
        settings_from(parsed("prompt", "--topic", "A fox", "--json")).read_timeout
        == PROMPT_TIMEOUT_S
    )
    assert PROMPT_TIMEOUT_S == 120  # the published prompt tool's default


def test_a_long_prompt_that_keeps_sending_is_never_abandoned_nor_paid_twice(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 400 NanoPhoto seconds of streaming (4 s here) in 16 chunks: a call twice as long as
    # its time limit, never idle for long. The limit runs from the last piece of text.
    sim = make_simulator(prompt_seconds=400, prompt_chunks=16)
    use_simulator(sim, monkeypatch)
    monkeypatch.setenv("NANOPHOTO_CALL_TIMEOUT", "2")
    code, _, stderr = sora2("prompt", "--topic", "A fox", "--json", "--timeout", "1")
    assert code == 0, stderr
    ledger = sim.snapshot()
    assert ledger["prompts"]["started"] == 1
    assert ledger["prompt_charges"] == {"A fox": PROMPT_COST}


def test_help_says_bad_arguments_exit_2_before_any_request() -> None:
    assert "2 bad arguments (refused before any request)" in build_parser().format_help()


# --- odd answers, replayed ---------------------------------------------------------------

LOGIN_REQUIRED = {
    "success": False,
    "error": "Authentication required",
    "errorCode": "LOGIN_REQUIRED",
}


def submitted(simulator: Simulator) -> str:
    code, documents, stderr = sora2("submit", "--prompt", "A fox")
    assert code == 0, stderr
    task_id: str = documents[0]["response"]["taskId"]
    return task_id


def test_a_401_mid_watch_names_the_task_and_how_to_pick_it_up(edge: Simulator) -> None:
    task_id = submitted(edge)
    edge.queue_answer("check-status", 401, LOGIN_REQUIRED)
    code, _, stderr = sora2("status", "--task-id", task_id, "--follow", *FAST)
    assert code == 1
    assert "LOGIN_REQUIRED" in stderr
    assert f"sora2 status --task-id {task_id} --follow" in stderr
    no_traceback(stderr)


def test_completed_without_a_url_exits_1_as_paid_and_resumable(
    edge: Simulator, tmp_path: Path
) -> None:
    task_id = submitted(edge)
    no_url: dict[str, Any] = {"success": True, "status": "completed", "taskId": task_id}
    for _ in range(3):
        edge.queue_answer("check-status", 200, no_url)
    code, _, stderr = sora2(
        "resume", "--task-id", task_id, "--output-dir", str(tmp_path), *FAST[2:]
    )
    assert code == 1
    assert "completed (and charged) but gave no video URL" in stderr
    assert f"sora2 resume --task-id {task_id}" in stderr
    assert "not refunded" in stderr
    no_traceback(stderr)
    # Asked again once a URL is given: downloaded, nothing submitted again.
    code, _, stderr = sora2(
        "resume", "--task-id", task_id, "--output-dir", str(tmp_path), *FAST[2:]
    )
    assert code == 0, stderr
    assert (tmp_path / f"{task_id}.mp4").exists()
    assert edge.snapshot()["submits"] == 1


def test_a_retry_after_is_announced_on_stderr_with_when_the_next_check_is(
    edge: Simulator,
) -> None:
    task_id = submitted(edge)
    edge.queue_answer(
        "check-status",
        429,
        {"success": False, "error": "slow down", "errorCode": "API_KEY_RATE_LIMIT_EXCEEDED"},
        {"Retry-After": "40"},
    )
    code, _, stderr = sora2("status", "--task-id", task_id, "--follow", *FAST[2:])
    assert code == 0, stderr
    assert f"rate limited (429): the next check of {task_id} waits 40 s, until" in stderr


def test_a_url_that_answers_404_at_first_is_fetched_again_by_resume(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sim = make_simulator(edge=True, generation_seconds=(130, 130), video_url_delay_seconds=15)
    use_simulator(sim, monkeypatch)
    task_id = submitted(sim)
    code, _, stderr = sora2("resume", "--task-id", task_id, "--output-dir", str(tmp_path), *FAST)
    assert code == 0, stderr
    assert (tmp_path / f"{task_id}.mp4").read_bytes()[4:8] == b"ftyp"
    assert sim.snapshot()["media"]["downloads"] == 1


def test_no_credits_says_nothing_was_charged_and_where_to_top_up(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_simulator(keys={DEFAULT_KEY: 3}, edge=True)
    use_simulator(sim, monkeypatch)
    code, _, stderr = sora2("submit", "--prompt", "A fox")
    assert code == 1
    assert "Nothing was charged: top up at https://nanophoto.ai/settings" in stderr
    no_traceback(stderr)
