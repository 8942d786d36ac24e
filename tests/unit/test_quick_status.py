"""``sora2 status`` in its plain form: answered with the standard library, as the full way would.

The quick lane (``sora2.quick``, ``nanophoto.lite``) must print the same
documents and exit codes as the full client, retry what it retries, and step
aside whenever a setting or an answer is one only the full client handles.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

import sora2.quick
from nanophoto import lite
from nanophoto.lite import LiteSettings
from nanophoto_simulator import DEFAULT_KEY, Fault, Simulator
from sora2.cli import main
from tests.helpers import MakeSimulator

HEAVY = ("httpx", "pydantic", "pydantic_settings", "prefect")


@pytest.fixture
def sim(make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """A simulator, and an environment with only its URL and the key: the plain case."""
    simulator = make_simulator(generation_seconds=(130, 130))
    for name in list(os.environ):
        if name.startswith("NANOPHOTO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NANOPHOTO_BASE_URL", simulator.base_url)
    monkeypatch.setenv("NANOPHOTO_API_KEY", DEFAULT_KEY)
    return simulator


@pytest.fixture
def quick_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task ids the quick lane checked (it records each call)."""
    calls: list[str] = []
    real = lite.check_status

    def spy(settings: LiteSettings, task_id: str, **options: Any) -> dict[str, Any] | None:
        calls.append(task_id)
        return real(settings, task_id, **options)

    monkeypatch.setattr(sora2.quick, "check_status", spy)
    return calls


def sora2_status(*argv: str) -> tuple[int, list[Any], str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["status", *argv], stdout=out, stderr=err)
    documents = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return code, documents, err.getvalue()


def submitted(sim: Simulator) -> str:
    out = io.StringIO()
    assert main(["submit", "--prompt", "A fox"], stdout=out, stderr=io.StringIO()) == 0
    task_id: str = json.loads(out.getvalue())["response"]["taskId"]
    return task_id


def both_ways(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[Any, Any]:
    """The same command, quick then full (a setting only the full client reads)."""
    quick = sora2_status(*argv)
    with monkeypatch.context() as patch:
        patch.setenv("NANOPHOTO_MAX_RETRIES", "3")  # the default, set: the full way
        full = sora2_status(*argv)
    return quick, full


def test_the_plain_case_imports_neither_httpx_nor_pydantic(sim: Simulator) -> None:
    task_id = submitted(sim)
    probe = (
        "import sys\nfrom sora2.cli import main\ncode = main(sys.argv[1:])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), code, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "status", "--task-id", task_id],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
        check=True,
    )
    assert done.stderr.strip() == "[] 0", done.stderr
    assert json.loads(done.stdout)["response"]["taskId"] == task_id


@pytest.mark.parametrize("state", ["processing", "completed", "failed-200", "failed-500"])
def test_quick_and_full_print_the_same_document_and_exit_code(
    sim: Simulator, quick_calls: list[str], monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    if state.startswith("failed"):
        sim.config.failed_http_status = int(state.split("-")[1])
        sim.queue_fault("generate", "generation_failed")
    if state == "processing":  # 12 s here: still running when the second way asks, in CI too
        sim.config.generation_seconds = (1200, 1200)
    task_id = submitted(sim)
    if state != "processing":
        deadline = time.monotonic() + 30
        while sim.snapshot()["tasks"][-1]["status"] == "processing":  # 1.3 s here
            assert time.monotonic() < deadline, "the video never ended"
            time.sleep(0.2)
    quick, full = both_ways(monkeypatch, "--task-id", task_id)
    assert quick_calls == [task_id]  # the first went the quick way, the second did not
    assert quick[0] == full[0] == 0
    assert quick[1] == full[1]
    assert quick[1][0]["response"]["taskId"] == task_id
    quick_raw, full_raw = both_ways(monkeypatch, "--task-id", task_id, "--json-only")
    assert quick_raw[1] == full_raw[1] == [quick[1][0]["response"]]


def test_an_unknown_task_exits_1_with_the_same_note(
    sim: Simulator, quick_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    quick, full = both_ways(monkeypatch, "--task-id", "task_none")
    assert quick_calls == ["task_none"]
    assert quick[0] == full[0] == 1
    assert quick[1] == full[1] == []
    assert "TASK_NOT_FOUND" in quick[2]
    assert quick[2] == full[2]


def test_a_gateway_error_is_retried_with_a_note_and_a_429_is_not(
    sim: Simulator, quick_calls: list[str]
) -> None:
    task_id = submitted(sim)
    sim.queue_fault("check-status", Fault.GATEWAY_ERROR)
    code, documents, stderr = sora2_status("--task-id", task_id)
    assert code == 0, stderr
    assert "check-status failed with GATEWAY_ERROR; retry 1 of 3" in stderr
    assert documents[0]["response"]["taskId"] == task_id
    before = sim.snapshot()["requests"][DEFAULT_KEY]["check-status"]
    sim.queue_fault("check-status", Fault.RATE_LIMITED)
    code, documents, stderr = sora2_status("--task-id", task_id)
    assert (code, documents) == (1, [])
    assert "API_KEY_RATE_LIMIT_EXCEEDED" in stderr
    # One request: the hourly budget is spent, asking again would spend more of it.
    assert sim.snapshot()["requests"][DEFAULT_KEY]["check-status"] == before + 1
    assert quick_calls == [task_id, task_id]


def test_a_setting_only_the_full_client_reads_sends_the_command_the_full_way(
    sim: Simulator, quick_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = submitted(sim)
    monkeypatch.setenv("NANOPHOTO_MAX_RETRIES", "0")
    sim.queue_fault("check-status", Fault.GATEWAY_ERROR)
    code, _, stderr = sora2_status("--task-id", task_id)
    assert code == 1, stderr  # no retry: the quick lane, retrying 3 times, would exit 0
    assert quick_calls == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--follow", "--max-wait", "1"],  # watching: the full way
        ["--api-key", "with a space"],  # a refusal, in the full way's words
        ["--task", "abbreviated"],  # argparse's abbreviations: the full parser's call
    ],
)
def test_anything_but_the_plain_case_goes_the_full_way(
    sim: Simulator, quick_calls: list[str], argv: list[str]
) -> None:
    task_id = submitted(sim)
    argv = [a if a != "abbreviated" else task_id for a in argv]
    if argv[0] != "--task":
        argv = ["--task-id", task_id, *argv]
    sora2_status(*argv)
    assert quick_calls == []


def test_the_settings_never_show_the_key() -> None:
    settings = LiteSettings.from_environment(
        {"NANOPHOTO_API_KEY": "sk-secret-123", "NANOPHOTO_BASE_URL": "http://127.0.0.1:9"}
    )
    assert settings is not None
    assert "sk-secret-123" not in repr(settings)
    assert LiteSettings.from_environment({"NANOPHOTO_BASE_URL": "http://127.0.0.1:9"}) is None
    plain_http = {"NANOPHOTO_API_KEY": "k", "NANOPHOTO_BASE_URL": "http://example.com"}
    assert LiteSettings.from_environment(plain_http) is None  # the full way refuses it
