"""``sora2`` against the simulator: the published tool's invocations, and more."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanophoto.contract import DEFAULT_USER_AGENT, ORIGIN, Locale, Technique
from nanophoto.storage import OUTPUT_ROOT_VARIABLE
from nanophoto_simulator import DEFAULT_KEY, Simulator
from nanophoto_simulator.prompts import write_prompt
from sora2.cli import main
from sora2.commands import output_folder_for_flow
from tests.helpers import MakeSimulator, free_port, use_simulator

# NanoPhoto's seconds, as a user types them: NANOPHOTO_TIME_SCALE compresses them.
FAST = ["--initial-status-delay", "120", "--status-check-interval", "20", "--max-wait", "1200"]
SUBMIT_KEYS = {"success", "status", "taskId", "message"}
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def sora2(*argv: str, stderr: io.StringIO | None = None) -> tuple[int, list[Any], str]:
    """Run ``sora2 argv``: exit code, the JSON documents on stdout, and stderr."""
    out, err = io.StringIO(), stderr or io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    documents = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return code, documents, err.getvalue()


@pytest.fixture
def api(make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """A simulator with 130 s videos (1.3 s here), reachable through the environment."""
    simulator = make_simulator(generation_seconds=(130, 130))
    use_simulator(simulator, monkeypatch)
    return simulator


# --- the published tool's documented invocations -------------------------------------


def test_submit_prints_the_submitted_document(api: Simulator) -> None:
    code, documents, _ = sora2("submit", "--prompt", "A red fox at dawn")
    assert code == 0
    assert [d["stage"] for d in documents] == ["submitted"]
    assert set(documents[0]["response"]) == SUBMIT_KEYS
    assert documents[0]["response"]["taskId"] == api.snapshot()["tasks"][0]["task_id"]


def test_submit_json_only_prints_the_raw_response(api: Simulator) -> None:
    code, documents, _ = sora2("submit", "--prompt", "A red fox", "--json-only")
    assert code == 0
    assert len(documents) == 1
    assert set(documents[0]) == SUBMIT_KEYS


def test_submit_follow_watches_to_completion(api: Simulator) -> None:
    code, documents, stderr = sora2("submit", "--prompt", "A red fox", "--follow", *FAST)
    assert code == 0
    # A 130 s video, checks from 120 s every 20 s: one check per document, each the
    # ledger saw; every one but the last found it still processing.
    checks = api.snapshot()["requests"][DEFAULT_KEY]["check-status"]
    assert [d["stage"] for d in documents] == ["submitted"] + ["progress"] * checks
    assert [d["response"]["status"] for d in documents[1:-1]] == ["processing"] * (checks - 1)
    final = documents[-1]["response"]
    assert final["status"] == "completed"
    assert {"videoUrl", "taskId", "generationTime", "creditsUsed"} <= set(final)
    assert not CONTROL.search(stderr)  # not a terminal: no progress line
    assert api.snapshot()["requests"][DEFAULT_KEY]["generate"] == 1


def test_submit_follow_json_only_prints_raw_responses(api: Simulator) -> None:
    code, documents, _ = sora2("submit", "--prompt", "A fox", "--follow", "--json-only", *FAST)
    assert code == 0
    assert "stage" not in documents[0]
    assert documents[0]["status"] == "processing"
    assert documents[-1]["status"] == "completed"


def test_submit_with_every_option(api: Simulator) -> None:
    code, _, _ = sora2(
        "submit",
        "--prompt",
        "A fox",
        "--mode",
        "imageToVideo",
        "--image-url",
        "https://example.com/a.png",
        "--image-url",
        "https://example.com/b.png",
        "--model-tier",
        "sora2-pro-standard",
        "--aspect-ratio",
        "landscape",
        "--video-duration",
        "15",
        "--timeout",
        "30",
    )
    assert code == 0
    task = api.snapshot()["tasks"][0]
    assert (task["tier"], task["duration"], task["aspect_ratio"]) == (
        "sora2-pro-standard",
        15,
        "landscape",
    )
    assert task["cost"] == 100


def test_status_prints_one_status_document(api: Simulator) -> None:
    _, submitted, _ = sora2("submit", "--prompt", "A fox")
    task_id = submitted[0]["response"]["taskId"]
    code, documents, _ = sora2("status", "--task-id", task_id)
    assert code == 0
    assert documents == [
        {
            "stage": "status",
            "response": {"success": True, "status": "processing", "taskId": task_id},
        }
    ]
    code, raw, _ = sora2("status", "--task-id", task_id, "--json-only")
    assert raw == [documents[0]["response"]]


def test_explicit_api_key_flag_is_used(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_simulator(keys={"flag-key": 100})
    monkeypatch.setenv("NANOPHOTO_BASE_URL", sim.base_url)
    code, _, _ = sora2("submit", "--prompt", "A fox", "--api-key", "flag-key")
    assert code == 0
    assert list(sim.snapshot()["requests"]) == ["flag-key"]


# --- failures -------------------------------------------------------------------------


def test_a_bad_key_exits_1_with_the_error_code(api: Simulator) -> None:
    code, documents, stderr = sora2("submit", "--prompt", "A fox", "--api-key", "wrong")
    assert code == 1
    assert documents == []
    assert "LOGIN_REQUIRED" in stderr


def test_no_credits_exits_1(make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = make_simulator(keys={DEFAULT_KEY: 3})
    use_simulator(sim, monkeypatch)
    code, _, stderr = sora2("submit", "--prompt", "A fox", "--follow", *FAST)
    assert code == 1
    assert "INSUFFICIENT_CREDITS" in stderr
    assert sim.snapshot()["submits"] == 0


@pytest.mark.parametrize(
    "faults",
    [
        ["rate_limited"],
        ["dropped_connection"] * 4,  # more than the client's 3 retries of one check
        ["gateway_error", "dropped_connection_after", "rate_limited", "internal_error"] * 2,
    ],
    ids=["429", "dropped-connection", "mixed"],
)
def test_follow_rides_out_transient_failures_to_a_completed_video(
    api: Simulator, faults: list[str]
) -> None:
    api.queue_fault("check-status", *faults)
    code, documents, stderr = sora2("submit", "--prompt", "A fox", "--follow", *FAST)
    assert code == 0, stderr
    assert documents[-1]["response"]["status"] == "completed"
    assert "still watching" in stderr
    assert api.snapshot()["submits"] == 1


def test_a_video_not_done_by_max_wait_exits_1_and_says_how_to_resume(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_simulator(generation_seconds=(900, 900))
    use_simulator(sim, monkeypatch)
    code, documents, stderr = sora2(
        "submit",
        "--prompt",
        "A fox",
        "--follow",
        "--initial-status-delay",
        "120",
        "--status-check-interval",
        "20",
        "--max-wait",
        "160",
    )
    assert code == 1
    # Checks at 120, 140 and 160 s; one a loaded machine delays past the next slot is
    # skipped, not crowded in: every check the ledger saw is a document, none after 160 s.
    checks = sim.snapshot()["requests"][DEFAULT_KEY]["check-status"]
    assert 1 <= checks <= 3
    assert [d["stage"] for d in documents] == ["submitted"] + ["progress"] * checks
    assert "WAIT_TIMEOUT" in stderr
    assert documents[0]["response"]["taskId"] in stderr


def test_a_failed_video_exits_1_when_followed_and_status_reports_it_with_0(
    api: Simulator,
) -> None:
    api.queue_fault("generate", "generation_failed")
    code, documents, stderr = sora2("submit", "--prompt", "A fox", "--follow", *FAST)
    assert code == 1
    assert documents[-1]["response"]["status"] == "failed"
    assert "GENERATION_FAILED" in stderr
    task_id = documents[0]["response"]["taskId"]
    code, status, _ = sora2("status", "--task-id", task_id)
    assert code == 0  # as the published tool: status reports, it does not judge
    assert status[0]["response"]["errorCode"] == "GENERATION_FAILED"


def test_a_lost_submit_answer_is_not_resent(api: Simulator) -> None:
    api.queue_fault("generate", "dropped_connection_after")
    code, documents, stderr = sora2("submit", "--prompt", "A fox", "--follow", *FAST)
    assert code == 1
    assert documents == []
    assert "SUBMIT_OUTCOME_UNKNOWN" in stderr
    assert api.snapshot()["requests"][DEFAULT_KEY]["generate"] == 1


# --- bad arguments: exit 2, nothing sent ------------------------------------------------

BAD_ARGUMENTS = [
    (["submit", "--prompt", "A fox", "--video-duration", "12"], "--video-duration"),
    (["submit", "--prompt", "A fox", "--model-tier", "sora3"], "--model-tier"),
    (["submit", "--prompt", "A fox", "--aspect-ratio", "square"], "--aspect-ratio"),
    (["submit", "--prompt", "A fox", "--image-url", "/home/me/cat.png"], "--image-url"),
    (["submit", "--prompt", "A fox", "--image-url", "data:image/png;base64,AA"], "--image-url"),
    (["submit", "--prompt", "A fox", *["--image-url", "https://e.com/a.png"] * 4], "--image-url"),
    (["submit", "--prompt", "A fox", "--mode", "imageToVideo"], "--image-url"),
    (["submit", "--prompt", "   "], "--prompt"),
    (["submit"], "--prompt"),
    (
        ["submit", "--prompt", "A fox", "--follow", "--status-check-interval", "0"],
        "--status-check-interval",
    ),
    (["submit", "--prompt", "A fox", "--follow", "--max-wait", "-5"], "--max-wait"),
    (["submit", "--prompt", "A fox", "--initial-status-delay", "-1"], "--initial-status-delay"),
    (["submit", "--prompt", "A fox", "--max-wait", "soon"], "--max-wait"),
    (["submit", "--prompt", "A fox", "--timeout", "0"], "--timeout"),
    (["prompt", "--topic", "x" * 501], "--topic"),
    (["prompt", "--topic", "fox", "--technique", "dolly"], "--technique"),
    (["prompt", "--topic", "fox", "--locale", "it"], "--locale"),
    (["status"], "--task-id"),
    (["status", "--task-id", "  "], "--task-id"),
    (["submit", "--prompt", "A fox", "--follow", "--max-wait", "inf"], "--max-wait"),
    (["submit", "--prompt", "A fox", "--initial-status-delay", "nan"], "--initial-status-delay"),
    (["resume", "--task-id", "../etc"], "--task-id"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_naming_the_flag_before_any_request(
    api: Simulator, argv: list[str], flag: str
) -> None:
    code, documents, stderr = sora2(*argv)
    assert code == 2
    assert documents == []
    assert flag in stderr
    assert api.snapshot()["total_requests"] == 0


# --- for people and for scripts --------------------------------------------------------


def test_on_a_terminal_a_live_progress_line_shows_status_elapsed_and_next_check(
    api: Simulator,
) -> None:
    terminal = Terminal()
    code, documents, stderr = sora2(
        "submit", "--prompt", "A fox", "--follow", *FAST, stderr=terminal
    )
    assert code == 0
    assert re.search(r"processing · \ds elapsed · next check in \ds", stderr)
    assert all("\x1b" not in json.dumps(d) for d in documents)  # stdout stays clean


def test_prompt_streams_the_text(api: Simulator) -> None:
    out = io.StringIO()
    code = main(
        ["prompt", "--topic", "Un phare", "--locale", "fr", "--technique", "pov"],
        stdout=out,
        stderr=io.StringIO(),
    )
    assert code == 0
    assert out.getvalue() == write_prompt("Un phare", Technique.POV, 10, Locale.FR)
    code, documents, _ = sora2("prompt", "--topic", "Un phare", "--json")
    assert code == 0
    assert documents[0]["response"]["prompt"].startswith("Un phare")


@pytest.mark.parametrize("command", ["submit", "status", "resume", "prompt", "video", "sandbox"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = io.StringIO()
    code = main([command, "--help"], stdout=out, stderr=io.StringIO())
    assert code == 0
    assert "Example" in out.getvalue()


def test_quick_commands_do_not_import_prefect() -> None:
    probe = "import sys, sora2.cli; print('prefect' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def test_sandbox_serves_the_contract_until_stopped(tmp_path: Any) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sora2.cli", "sandbox", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{port}/api/sora-2/check-status"
        while True:
            try:
                bare = httpx.post(
                    url, json={"taskId": "t"}, headers={"Authorization": "Bearer sim-key"}
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # The sandbox's edge is on: a client without the published tools' headers is refused.
        assert bare.status_code == 403
        assert bare.headers["content-type"].startswith("text/html")
        browser = {
            "Authorization": "Bearer sim-key",
            "User-Agent": DEFAULT_USER_AGENT,
            "Origin": ORIGIN,
        }
        assert httpx.post(url, json={"taskId": "t"}, headers=browser).status_code == 404
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert f"NANOPHOTO_BASE_URL=http://127.0.0.1:{port}" in stderr


def test_the_flow_commands_output_folder_is_the_root_a_remote_url_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert output_folder_for_flow("") == ""  # no download, as for the flows
    assert output_folder_for_flow("s3://bucket/videos") == "s3://bucket/videos"
    for given in ("out", f"file://{tmp_path}/out"):
        assert output_folder_for_flow(given) == str(tmp_path / "out")
        assert os.environ[OUTPUT_ROOT_VARIABLE] == str(tmp_path / "out")
