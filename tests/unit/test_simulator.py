"""The simulator on its own: contract answers, ledger, refunds, limits, time scale."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from nanophoto.contract import PROMPT_PATH, STATUS_PATH, SUBMIT_PATH, Locale, Technique
from nanophoto_simulator import DEFAULT_KEY, Faults, Simulator, SimulatorConfig, SimulatorThread
from nanophoto_simulator.cli import config_from, parse_args
from nanophoto_simulator.prompts import write_prompt
from sora2.demo import demo_config
from sora2.demo import parse_args as demo_args
from tests.helpers import MakeSimulator

AUTH = {"Authorization": f"Bearer {DEFAULT_KEY}"}
SUBMIT = {"prompt": "a fox", "mode": "textToVideo"}


def post(
    sim: Simulator, path: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    with httpx.Client(base_url=sim.base_url, timeout=10) as http:
        return http.post(path, json=body, headers=AUTH if headers is None else headers)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_requests_without_a_valid_key_get_401(simulator: Simulator) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        answer = post(simulator, SUBMIT_PATH, SUBMIT, headers)
        assert answer.status_code == 401
        assert answer.json()["errorCode"] == "LOGIN_REQUIRED"
    assert simulator.snapshot()["submits"] == 0


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (PROMPT_PATH, {}, "INVALID_INPUT"),
        (PROMPT_PATH, {"topic": "x" * 501}, "INVALID_INPUT"),
        (PROMPT_PATH, {"topic": "fox", "technique": "zoom"}, "INVALID_INPUT"),
        (PROMPT_PATH, {"topic": "fox", "duration": "10"}, "INVALID_INPUT"),
        (PROMPT_PATH, {"topic": "fox", "mode": "imageToVideo"}, "IMAGE_REQUIRED"),
        (SUBMIT_PATH, {"mode": "textToVideo"}, "PROMPT_REQUIRED"),
        (SUBMIT_PATH, {**SUBMIT, "videoDuration": "12"}, "INVALID_INPUT"),
        (SUBMIT_PATH, {**SUBMIT, "modelTier": "sora3"}, "INVALID_INPUT"),
        (SUBMIT_PATH, {**SUBMIT, "mode": "imageToVideo"}, "IMAGE_REQUIRED"),
        (SUBMIT_PATH, {**SUBMIT, "imageUrls": ["data:image/png;base64,AA"]}, "IMAGE_URLS_REQUIRED"),
        (STATUS_PATH, {}, "TASK_ID_REQUIRED"),
    ],
)
def test_invalid_input_gets_the_documented_code(
    simulator: Simulator, path: str, body: dict[str, Any], code: str
) -> None:
    answer = post(simulator, path, body)
    assert answer.status_code == 400
    assert answer.json() == {"success": False, "error": answer.json()["error"], "errorCode": code}
    assert simulator.snapshot()["credits"][DEFAULT_KEY]["charged"] == 0


def test_a_video_runs_through_processing_to_completed_on_the_scaled_clock(
    make_simulator: MakeSimulator,
) -> None:
    # Margins of seconds, not fractions: a loaded machine may be slow between calls.
    sim = make_simulator(time_scale=0.01, generation_seconds=(300, 300))
    task_id = post(sim, SUBMIT_PATH, SUBMIT).json()["taskId"]
    assert post(sim, STATUS_PATH, {"taskId": task_id}).json()["status"] == "processing"
    time.sleep(3.05)  # 305 simulated seconds
    done = post(sim, STATUS_PATH, {"taskId": task_id}).json()
    assert done["status"] == "completed"
    assert done["generationTime"] == 300
    assert done["creditsUsed"] == 4
    video = httpx.get(done["videoUrl"], timeout=10)
    assert video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"
    assert task_id.encode() in video.content  # unique per task
    ledger = sim.snapshot()
    assert ledger["tasks"][0]["status_checks"] == 2
    # Seen by the second check, after it was ready (how long after depends on the machine).
    assert ledger["tasks"][0]["detection_delay"] > 0


def test_credits_are_charged_by_tier_and_duration_and_402_when_short(
    make_simulator: MakeSimulator,
) -> None:
    sim = make_simulator(keys={"poor": 70})
    auth = {"Authorization": "Bearer poor"}
    body = {**SUBMIT, "modelTier": "sora2-pro-standard", "videoDuration": "10"}
    assert post(sim, SUBMIT_PATH, body, auth).status_code == 200  # 60 credits
    refused = post(sim, SUBMIT_PATH, body, auth)
    assert refused.status_code == 402
    assert refused.json()["errorCode"] == "INSUFFICIENT_CREDITS"
    prompt = post(sim, PROMPT_PATH, {"topic": "fox"}, auth)  # 2 credits: 10 left, fine
    assert prompt.status_code == 200
    credits = sim.snapshot()["credits"]["poor"]
    assert credits == {"start": 70, "charged": 62, "refunded": 0, "balance": 8}


def test_prompt_402_says_how_many_credits_it_needs(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(keys={"broke": 1})
    answer = post(sim, PROMPT_PATH, {"topic": "fox"}, {"Authorization": "Bearer broke"})
    assert answer.status_code == 402
    assert answer.json()["requiredCredits"] == 2


def test_a_failed_video_is_refunded_and_reported_failed(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(generation_seconds=(10, 10))
    sim.queue_fault("generate", "generation_failed")
    task_id = post(sim, SUBMIT_PATH, SUBMIT).json()["taskId"]
    time.sleep(0.15)
    answer = post(sim, STATUS_PATH, {"taskId": task_id})
    assert answer.status_code == 200
    assert answer.json()["errorCode"] == "GENERATION_FAILED"
    assert answer.json()["status"] == "failed"
    credits = sim.snapshot()["credits"][DEFAULT_KEY]
    assert (credits["charged"], credits["refunded"], credits["balance"]) == (4, 4, 1000)
    assert httpx.get(f"{sim.media_url}/sora/{task_id}.mp4").status_code == 404


def test_a_cut_prompt_stream_is_refunded(simulator: Simulator) -> None:
    simulator.queue_fault("generate-prompt", "truncated_stream")
    with pytest.raises(httpx.RemoteProtocolError):
        post(simulator, PROMPT_PATH, {"topic": "fox"})
    credits = simulator.snapshot()["credits"][DEFAULT_KEY]
    assert (credits["charged"], credits["refunded"]) == (2, 2)


def test_another_keys_task_is_not_found(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(keys={"alice": 100, "bob": 100})
    task_id = post(sim, SUBMIT_PATH, SUBMIT, {"Authorization": "Bearer alice"}).json()["taskId"]
    answer = post(sim, STATUS_PATH, {"taskId": task_id}, {"Authorization": "Bearer bob"})
    assert answer.status_code == 404
    assert answer.json()["errorCode"] == "TASK_NOT_FOUND"


def test_rate_limit_per_key_and_window_on_the_scaled_clock(make_simulator: MakeSimulator) -> None:
    # 5 requests per 500 simulated seconds = 5 real seconds at this scale: room for a
    # loaded machine to send the first 7 inside one window.
    sim = make_simulator(rate_limit=5, rate_window_seconds=500, keys={"a": 100, "b": 100})
    codes = [
        post(sim, STATUS_PATH, {"taskId": "x"}, {"Authorization": "Bearer a"}).status_code
        for _ in range(7)
    ]
    assert codes == [404] * 5 + [429] * 2
    other = post(sim, STATUS_PATH, {"taskId": "x"}, {"Authorization": "Bearer b"})
    assert other.status_code == 404  # another key has its own budget
    time.sleep(5.1)
    assert post(sim, STATUS_PATH, {"taskId": "x"}, {"Authorization": "Bearer a"}).status_code == 404
    ledger = sim.snapshot()
    assert ledger["rate_limited"] == {"a": 2}
    assert ledger["requests"]["a"]["check-status"] == 8


def test_gateway_faults_answer_with_html_pages(simulator: Simulator) -> None:
    simulator.queue_fault("check-status", "gateway_error")
    answer = post(simulator, STATUS_PATH, {"taskId": "x"})
    assert answer.status_code in (502, 503, 504, 524)
    assert answer.headers["content-type"].startswith("text/html")
    assert "<html>" in answer.text


def test_a_submit_lost_after_processing_still_starts_and_charges(simulator: Simulator) -> None:
    simulator.queue_fault("generate", "dropped_connection_after")
    with pytest.raises(httpx.RemoteProtocolError):
        post(simulator, SUBMIT_PATH, SUBMIT)
    ledger = simulator.snapshot()
    assert ledger["submits"] == 1
    assert ledger["credits"][DEFAULT_KEY]["charged"] == 4


def test_a_submit_dropped_at_the_edge_does_not_start(simulator: Simulator) -> None:
    simulator.queue_fault("generate", "dropped_connection", "internal_error")
    with pytest.raises(httpx.RemoteProtocolError):
        post(simulator, SUBMIT_PATH, SUBMIT)
    assert post(simulator, SUBMIT_PATH, SUBMIT).json()["errorCode"] == "INTERNAL_ERROR"
    assert simulator.snapshot()["submits"] == 0


def test_random_faults_follow_their_rates(make_simulator: MakeSimulator) -> None:
    sim = make_simulator(faults=Faults(internal_error=0.3), rate_limit=10_000)
    codes = [post(sim, STATUS_PATH, {"taskId": "x"}).status_code for _ in range(200)]
    assert 40 <= codes.count(500) <= 80
    assert sim.snapshot()["faults"]["internal_error"] == codes.count(500)


def test_running_statuses_are_configurable(make_simulator: MakeSimulator) -> None:
    # 4 s here: "pending" for the first 2 s, "generating" for the next 2 s.
    sim = make_simulator(running_statuses=("pending", "generating"), generation_seconds=(400, 400))
    task_id = post(sim, SUBMIT_PATH, SUBMIT).json()["taskId"]
    assert post(sim, STATUS_PATH, {"taskId": task_id}).json()["status"] == "pending"
    time.sleep(2.7)
    assert post(sim, STATUS_PATH, {"taskId": task_id}).json()["status"] == "generating"


def test_the_prompt_streams_in_chunks_honouring_its_inputs(simulator: Simulator) -> None:
    body = {"topic": "狐狸", "technique": "time-lapse", "duration": 15, "locale": "zh"}
    chunks: list[bytes] = []
    with (
        httpx.Client(base_url=simulator.base_url) as http,
        http.stream("POST", PROMPT_PATH, json=body, headers=AUTH) as answer,
    ):
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        chunks = list(answer.iter_raw())
    text = b"".join(chunks).decode()
    assert len(chunks) >= 4
    assert text == write_prompt("狐狸", Technique.TIME_LAPSE, 15, Locale.ZH)
    assert "time-lapse" in text
    assert "[12.0s–15.0s]" in text
    assert text.count("镜头") == 5  # five shots for 15 s


def test_the_ledger_is_readable_over_http(simulator: Simulator) -> None:
    post(simulator, SUBMIT_PATH, SUBMIT)
    ledger = httpx.get(f"{simulator.base_url}/_simulator/ledger").json()
    assert ledger["submits"] == 1
    assert ledger["requests"] == {DEFAULT_KEY: {"generate": 1}}
    answer = httpx.post(f"{simulator.base_url}/_simulator/faults", json={"internal_error": 1})
    assert answer.status_code == 200
    assert post(simulator, STATUS_PATH, {"taskId": "x"}).status_code == 500


def test_stop_ends_a_stalled_stream_and_returns_promptly() -> None:
    thread = SimulatorThread(SimulatorConfig(time_scale=1.0, faults=Faults(stall_seconds=60)))
    sim = thread.__enter__()
    sim.queue_fault("generate-prompt", "slow_stream")
    outcome: list[BaseException] = []

    def read_stream() -> None:
        try:
            post(sim, PROMPT_PATH, {"topic": "fox"})
        except BaseException as error:
            outcome.append(error)

    reader = threading.Thread(target=read_stream)
    reader.start()
    wait_until(lambda: sim.snapshot()["faults"].get("slow_stream") == 1)
    started = time.monotonic()
    thread.__exit__(None, None, None)
    reader.join(timeout=10)
    assert time.monotonic() - started < 5  # not the 60 s stall
    assert not reader.is_alive()
    assert outcome
    assert isinstance(outcome[0], httpx.TransportError)


def test_unknown_tokens_are_never_recorded(simulator: Simulator) -> None:
    post(simulator, STATUS_PATH, {"taskId": "x"}, {"Authorization": "Bearer np-real-key"})
    ledger = json.dumps(simulator.snapshot())
    assert "np-real-key" not in ledger
    assert simulator.snapshot()["requests"] == {"<invalid>": {"check-status": 1}}


@pytest.mark.parametrize(
    "body",
    [{"prompt": "x", "mode": ["a"]}, {"prompt": "x", "mode": "textToVideo", "imageUrls": "u"}],
)
def test_odd_json_gets_a_400_not_a_dropped_connection(
    simulator: Simulator, body: dict[str, Any]
) -> None:
    answer = post(simulator, SUBMIT_PATH, body)
    assert answer.status_code == 400


def test_faults_are_only_queued_where_they_can_strike(simulator: Simulator) -> None:
    with pytest.raises(ValueError, match="cannot strike"):
        simulator.queue_fault("generate-prompt", "generation_failed")
    with pytest.raises(ValueError, match="cannot strike"):
        simulator.queue_fault("check-status", "truncated_stream")


def test_a_lost_status_answer_does_not_count_as_seen(
    make_simulator: MakeSimulator,
) -> None:
    sim = make_simulator(generation_seconds=(1, 1))
    task_id = post(sim, SUBMIT_PATH, SUBMIT).json()["taskId"]
    time.sleep(0.05)
    sim.queue_fault("check-status", "dropped_connection_after")
    with pytest.raises(httpx.RemoteProtocolError):
        post(sim, STATUS_PATH, {"taskId": task_id})
    task = sim.snapshot()["tasks"][0]
    assert (task["status_checks"], task["reported_at"]) == (0, None)
    post(sim, STATUS_PATH, {"taskId": task_id})
    assert sim.snapshot()["tasks"][0]["status_checks"] == 1


BROWSER = "Mozilla/5.0 (X11; Linux x86_64) Chrome/133.0.0.0"


def test_the_edge_refuses_what_does_not_look_like_a_browser_with_an_html_page(
    make_simulator: MakeSimulator,
) -> None:
    sim = make_simulator(edge=True)
    for headers in (
        {"User-Agent": "python-httpx/0.27", "Origin": "https://nanophoto.ai"},  # not a browser
        {"User-Agent": BROWSER},  # a browser's agent, without an Origin
    ):
        answer = post(sim, SUBMIT_PATH, SUBMIT, {**AUTH, **headers})
        assert answer.status_code == 403
        assert answer.headers["content-type"].startswith("text/html")
    assert sim.snapshot()["edge_refused"] == 2
    assert sim.snapshot()["submits"] == 0  # the API never saw them: nothing charged
    passed = post(sim, SUBMIT_PATH, SUBMIT, {**AUTH, "User-Agent": BROWSER, "Origin": "x"})
    assert passed.status_code == 200
    # Without the edge (the tests' default), the API answers whatever the headers.
    plain = make_simulator()
    assert post(plain, SUBMIT_PATH, SUBMIT, {**AUTH, "User-Agent": "curl/8"}).status_code == 200


def test_the_command_line_sets_the_edge_the_failed_status_and_the_url_delay() -> None:
    default = config_from(parse_args([]))
    assert default.edge  # the sandbox's path is the one the real edge would see
    assert default.failed_http_status == 200
    chosen = config_from(
        parse_args(["--no-edge", "--failed-http-status", "500", "--video-url-delay", "30"])
    )
    assert (chosen.edge, chosen.failed_http_status, chosen.video_url_delay_seconds) == (
        False,
        500,
        30.0,
    )
    with pytest.raises(SystemExit):
        parse_args(["--failed-http-status", "404"])  # the contract allows 200 or 500


def test_the_demo_runs_behind_the_edge() -> None:
    assert demo_config(demo_args([])).edge
