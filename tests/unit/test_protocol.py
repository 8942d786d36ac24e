"""Protocol edge cases, faked at the HTTP boundary with httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanophoto.client import NanoPhotoClient
from nanophoto.contract import ERROR_SPECS
from nanophoto.errors import (
    APIError,
    AuthenticationError,
    ConnectionDroppedError,
    EdgeBlockedError,
    GatewayError,
    InsufficientCreditsError,
    InvalidRequestError,
    NanoPhotoError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    SubmitOutcomeUnknownError,
    TaskNotFoundError,
    VideoUnavailableError,
)
from nanophoto.models import PromptRequest, VideoRequest
from nanophoto.retry import RetryPolicy
from nanophoto.settings import NanoPhotoSettings

SECRET = "np-test-secret-abcdef"
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A mock API: answers from a script and remembers every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(handler: Handler, sleeps: list[float] | None = None) -> NanoPhotoClient:
    async def record_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return NanoPhotoClient(
        SECRET,
        settings=NanoPhotoSettings(base_url="https://api.test"),
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(max_retries=3),
        sleep=record_sleep,
    )


def error_answer(http_status: int, code: str, **extra: Any) -> httpx.Response:
    body = {"success": False, "error": f"message for {code}", "errorCode": code, **extra}
    return httpx.Response(http_status, json=body)


def gateway_page(status: int) -> httpx.Response:
    html = f"<html><head><title>{status}</title></head><body>cloudflare</body></html>"
    return httpx.Response(status, text=html, headers={"content-type": "text/html"})


PROCESSING = httpx.Response(200, json={"success": True, "status": "processing", "taskId": "t1"})

EXPECTED_CLASS: dict[str, type[APIError]] = {
    "INVALID_INPUT": InvalidRequestError,
    "PROMPT_REQUIRED": InvalidRequestError,
    "IMAGE_REQUIRED": InvalidRequestError,
    "IMAGE_URLS_REQUIRED": InvalidRequestError,
    "TASK_ID_REQUIRED": InvalidRequestError,
    "LOGIN_REQUIRED": AuthenticationError,
    "INSUFFICIENT_CREDITS": InsufficientCreditsError,
    "TASK_NOT_FOUND": TaskNotFoundError,
    "API_KEY_RATE_LIMIT_EXCEEDED": RateLimitError,
    "INTERNAL_ERROR": ServerError,
}


@pytest.mark.parametrize("code", sorted(EXPECTED_CLASS))
async def test_each_error_code_maps_to_its_error(code: str) -> None:
    spec = ERROR_SPECS[code]
    recorder = Recorder(error_answer(spec.http_status, code))
    async with make_client(recorder) as client:
        with pytest.raises(EXPECTED_CLASS[code]) as caught:
            await client.check_status("t1")
    error = caught.value
    assert (error.code, error.status, error.retryable) == (code, spec.http_status, spec.retryable)
    assert f"message for {code}" in error.message
    # A status check retries what is retryable, except a 429: the watch's
    # next scheduled check is its retry.
    retried = spec.retryable and code != "API_KEY_RATE_LIMIT_EXCEEDED"
    assert len(recorder.requests) == (1 + 3 if retried else 1)


@pytest.mark.parametrize("status", [502, 503, 504, 524])
async def test_gateway_pages_become_retryable_gateway_errors(status: int) -> None:
    recorder = Recorder(gateway_page(status), PROCESSING)
    sleeps: list[float] = []
    async with make_client(recorder, sleeps) as client:
        result = await client.check_status("t1")
    assert result.is_running
    assert len(recorder.requests) == 2
    assert len(sleeps) == 1


async def test_gateway_page_error_carries_code_status_and_no_traceback_noise() -> None:
    recorder = Recorder(gateway_page(524))
    async with make_client(recorder) as client:
        with pytest.raises(GatewayError) as caught:
            await client.check_status("t1")
    assert caught.value.status == 524
    assert caught.value.retryable
    assert "not an API answer" in str(caught.value)
    assert "cloudflare" in str(caught.value)


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (httpx.RemoteProtocolError("Server disconnected"), ConnectionDroppedError),
        (httpx.ReadError("connection reset"), ConnectionDroppedError),
        (httpx.ReadTimeout("timed out"), RequestTimeoutError),
    ],
)
async def test_dropped_connections_and_timeouts_are_retryable(
    exception: Exception, expected: type[NanoPhotoError]
) -> None:
    recorder = Recorder(exception)
    async with make_client(recorder) as client:
        with pytest.raises(expected) as caught:
            await client.check_status("t1")
    assert caught.value.retryable
    assert len(recorder.requests) == 4


async def test_a_submit_that_may_have_started_is_never_sent_twice() -> None:
    for answer in (
        gateway_page(524),
        httpx.RemoteProtocolError("Server disconnected"),
        httpx.ReadTimeout("timed out"),
        error_answer(500, "INTERNAL_ERROR"),
    ):
        recorder = Recorder(answer)
        async with make_client(recorder) as client:
            with pytest.raises(SubmitOutcomeUnknownError) as caught:
                await client.submit(VideoRequest(prompt="a fox"))
        assert len(recorder.requests) == 1, answer
        assert "not sent again" in str(caught.value)
        assert isinstance(caught.value.__cause__, NanoPhotoError)


async def test_a_submit_that_surely_did_not_start_is_retried() -> None:
    submitted = httpx.Response(
        200, json={"success": True, "status": "processing", "taskId": "t9", "message": "ok"}
    )
    recorder = Recorder(
        httpx.ConnectError("refused"), error_answer(429, "API_KEY_RATE_LIMIT_EXCEEDED"), submitted
    )
    async with make_client(recorder) as client:
        status = await client.submit(VideoRequest(prompt="a fox"))
    assert status.task_id == "t9"
    assert len(recorder.requests) == 3


async def test_a_submit_refused_for_credits_is_not_retried() -> None:
    recorder = Recorder(error_answer(402, "INSUFFICIENT_CREDITS"))
    async with make_client(recorder) as client:
        with pytest.raises(InsufficientCreditsError):
            await client.submit(VideoRequest(prompt="a fox"))
    assert len(recorder.requests) == 1


async def test_retry_after_is_honoured_and_capped() -> None:
    limited = error_answer(429, "API_KEY_RATE_LIMIT_EXCEEDED")
    limited.headers["Retry-After"] = "7"
    too_long = error_answer(429, "API_KEY_RATE_LIMIT_EXCEEDED")
    too_long.headers["Retry-After"] = "3600"
    submitted = httpx.Response(200, json={"success": True, "status": "processing", "taskId": "t"})
    recorder = Recorder(limited, too_long, submitted)
    sleeps: list[float] = []
    async with make_client(recorder, sleeps) as client:
        await client.submit(VideoRequest(prompt="a fox"))
    assert sleeps == [7.0, 60.0]


async def test_a_429_without_retry_after_backs_off_for_the_hourly_budget() -> None:
    limited = error_answer(429, "API_KEY_RATE_LIMIT_EXCEEDED")
    sleeps: list[float] = []
    async with make_client(Recorder(limited), sleeps) as client:
        with pytest.raises(RateLimitError):
            await client.submit(VideoRequest(prompt="a fox"))
    assert sleeps == [15.0, 30.0, 60.0]


async def test_a_cdn_429_page_is_a_rate_limit_not_a_final_error() -> None:
    page = gateway_page(429)
    async with make_client(Recorder(page)) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.check_status("t1")
    assert caught.value.retryable


async def test_a_non_json_200_while_checking_is_transient() -> None:
    recorder = Recorder(gateway_page(200), PROCESSING)
    async with make_client(recorder) as client:
        result = await client.check_status("t1")
    assert result.is_running
    assert len(recorder.requests) == 2


@pytest.mark.parametrize("status", [401, 403, 406])
async def test_an_html_refusal_of_the_edge_is_its_own_error_never_an_unknown(status: int) -> None:
    """The CDN refused the client: nothing started, and the same request would be refused."""
    for call in ("check", "submit"):
        recorder = Recorder(gateway_page(status), PROCESSING)
        async with make_client(recorder) as client:
            request = (
                client.check_status("t1")
                if call == "check"
                else client.submit(VideoRequest(prompt="a fox"))
            )
            with pytest.raises(EdgeBlockedError) as caught:
                await request
        assert not caught.value.may_have_started
        assert "NANOPHOTO_USER_AGENT" in str(caught.value)
        assert len(recorder.requests) == 1  # not retried


async def test_a_submit_answered_200_with_a_cut_body_may_have_started() -> None:
    cut = httpx.Response(200, content=b'{"success": true, "status": "proc')
    recorder = Recorder(cut)
    async with make_client(recorder) as client:
        with pytest.raises(SubmitOutcomeUnknownError):
            await client.submit(VideoRequest(prompt="a fox"))
    assert len(recorder.requests) == 1


async def test_a_failed_document_is_final_whatever_its_code() -> None:
    failed = httpx.Response(500, json={"success": False, "status": "failed", "error": "x"})
    recorder = Recorder(failed)
    async with make_client(recorder) as client:
        status = await client.check_status("t1")
    assert status.is_failed
    assert status.error_code == "GENERATION_FAILED"
    assert len(recorder.requests) == 1


async def test_odd_cosmetic_fields_do_not_hide_a_finished_video() -> None:
    answer = httpx.Response(
        200,
        json={
            "success": True,
            "status": "completed",
            "taskId": 12345,
            "videoUrl": "https://video.test/x.mp4",
            "creditsUsed": 4.5,
            "generationTime": "120s",
        },
    )
    async with make_client(Recorder(answer)) as client:
        status = await client.check_status("12345")
    assert status.is_completed
    assert status.task_id == "12345"
    assert status.generation_time is None


async def test_a_400_code_in_a_500_answer_is_still_final() -> None:
    recorder = Recorder(error_answer(500, "INVALID_INPUT"))
    async with make_client(recorder) as client:
        with pytest.raises(InvalidRequestError):
            await client.check_status("t1")
    assert len(recorder.requests) == 1


async def test_a_key_with_a_line_break_is_refused_without_echoing_it() -> None:
    from nanophoto.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as caught:
        NanoPhotoClient("np-abc\nX-Injected: 1", settings=NanoPhotoSettings())
    assert "np-abc" not in str(caught.value)
    assert caught.value.__cause__ is None


async def test_a_request_httpx_refuses_to_build_never_quotes_it() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value {request.headers['authorization']}")

    async with make_client(handler) as client:
        with pytest.raises(NanoPhotoError) as caught:
            await client.check_status("t1")
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None
    assert not caught.value.retryable


async def test_downloads_follow_redirects_and_stop_on_an_expired_url(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old.mp4":
            return httpx.Response(302, headers={"location": "https://cdn.test/new.mp4"})
        if request.url.path == "/new.mp4":
            return httpx.Response(200, content=b"video-bytes")
        return httpx.Response(404, text="Not Found")

    async with make_client(handler) as client:
        video = await client.download("https://video.test/old.mp4", tmp_path / "a.mp4")
        assert Path(video.path).read_bytes() == b"video-bytes"
        with pytest.raises(VideoUnavailableError):
            await client.download("https://video.test/gone.mp4", tmp_path / "b.mp4")
    assert not (tmp_path / "b.mp4").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


async def test_backoff_grows_and_is_capped_with_jitter() -> None:
    recorder = Recorder(error_answer(500, "INTERNAL_ERROR"))
    sleeps: list[float] = []
    async with make_client(recorder, sleeps) as client:
        with pytest.raises(ServerError):
            await client.check_status("t1")
    assert len(sleeps) == 3
    for retry, delay in enumerate(sleeps):
        ceiling = min(0.5 * 2**retry, 8.0)
        assert 0.75 * ceiling <= delay <= ceiling


async def test_utf8_split_across_chunks_comes_out_whole() -> None:
    text = "狐狸在黎明 — café ☕ 🦊\n"
    data = text.encode()
    # Cut every multi-byte character in the middle.
    chunks = [data[i : i + 1] for i in range(len(data))]

    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=stream(), headers={"content-type": "text/plain; charset=utf-8"}
        )

    pieces: list[str] = []
    async with make_client(handler) as client:
        prompt = await client.generate_prompt(PromptRequest(topic="fox"), on_text=pieces.append)
    assert "".join(pieces) == text
    assert prompt.text == text.strip()
    assert "\ufffd" not in "".join(pieces)


async def test_a_prompt_stream_cut_midway_starts_again_from_scratch() -> None:
    calls = 0

    async def broken() -> AsyncIterator[bytes]:
        yield b"first half of a prompt"
        raise httpx.RemoteProtocolError("peer closed connection")

    async def whole() -> AsyncIterator[bytes]:
        yield b"the whole prompt"

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, content=broken() if calls == 1 else whole())

    discarded: list[tuple[str, int]] = []
    async with make_client(handler) as client:
        prompt = await client.generate_prompt(
            PromptRequest(topic="fox"),
            on_discard=lambda error, chars: discarded.append((error.code, chars)),
        )
    assert prompt.text == "the whole prompt"
    assert calls == 2
    assert discarded == [("CONNECTION_DROPPED", len("first half of a prompt"))]
    # A stream the server cut is a failed generation: refunded, not counted.
    assert prompt.streams_charged == 1


async def test_unknown_status_value_means_still_running() -> None:
    answer = httpx.Response(200, json={"success": True, "status": "queued", "taskId": "t1"})
    async with make_client(Recorder(answer)) as client:
        status = await client.check_status("t1")
    assert status.is_running
    assert status.status == "queued"


async def test_completed_straight_from_submit_is_returned_as_completed() -> None:
    answer = httpx.Response(
        200,
        json={
            "success": True,
            "status": "completed",
            "taskId": "t1",
            "videoUrl": "https://video.test/t1.mp4",
        },
    )
    async with make_client(Recorder(answer)) as client:
        status = await client.submit(VideoRequest(prompt="a fox"))
    assert status.is_completed
    assert status.video_url == "https://video.test/t1.mp4"


@pytest.mark.parametrize("http_status", [200, 500])
async def test_failed_generation_is_a_status_whatever_the_http_code(http_status: int) -> None:
    answer = error_answer(http_status, "GENERATION_FAILED", status="failed", taskId="t1")
    recorder = Recorder(answer)
    async with make_client(recorder) as client:
        status = await client.check_status("t1")
    assert status.is_failed
    assert status.error_code == "GENERATION_FAILED"
    assert len(recorder.requests) == 1  # final: not retried


async def test_the_key_goes_to_the_api_host_only(tmp_path: Path) -> None:
    recorder = Recorder(httpx.Response(200, content=b"\x00\x00\x00\x18ftypmp42"))
    async with make_client(recorder) as client:
        with pytest.raises(NanoPhotoError):
            await client.check_status("t1")  # answered with non-JSON: a gateway error
        recorder.requests.clear()
        await client.download("https://video.test/sora/t1.mp4", tmp_path / "t1.mp4")
    assert recorder.requests[0].url.host == "video.test"
    assert "authorization" not in recorder.requests[0].headers


async def test_the_key_is_sent_as_a_bearer_token_and_never_in_errors() -> None:
    recorder = Recorder(error_answer(401, "LOGIN_REQUIRED"))
    async with make_client(recorder) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.check_status("t1")
    assert recorder.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert json.loads(recorder.requests[0].content) == {"taskId": "t1"}
    for text in (str(caught.value), repr(caught.value), repr(recorder.requests[0].headers)):
        assert SECRET not in text


async def test_an_empty_task_id_is_refused_before_any_request() -> None:
    recorder = Recorder(PROCESSING)
    async with make_client(recorder) as client:
        with pytest.raises(ValueError, match="task_id"):
            await client.check_status(" ")
    assert recorder.requests == []


HYGIENE_ANSWERS: list[httpx.Response | Exception] = [
    *(error_answer(spec.http_status, code) for code, spec in ERROR_SPECS.items()),
    gateway_page(524),
    httpx.Response(200, content=b"{cut"),
    httpx.RemoteProtocolError("Server disconnected"),
    httpx.ReadTimeout("timed out"),
    httpx.ConnectError("refused"),
]


@pytest.mark.parametrize(
    "answer",
    HYGIENE_ANSWERS,
    ids=lambda a: (getattr(a, "status_code", None) and str(a.status_code)) or type(a).__name__,
)
async def test_no_error_path_carries_the_key(answer: httpx.Response | Exception) -> None:
    import traceback

    for call in ("check", "submit"):
        async with make_client(Recorder(answer)) as client:
            try:
                if call == "check":
                    await client.check_status("t1")
                else:
                    await client.submit(VideoRequest(prompt="a fox"))
            except NanoPhotoError as error:
                texts = traceback.format_exception(error)  # the whole chain
                texts += [repr(error), str(error.__dict__)]
                assert not any(SECRET in text for text in texts), call
