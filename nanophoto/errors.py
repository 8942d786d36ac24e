"""One error hierarchy for everything that can go wrong talking to NanoPhoto.

Every error carries the API's ``code`` (or one of ours for transport and
configuration problems), the HTTP ``status`` if there was one, a ``message``
for a person, and two flags the retry logic reads:

* ``retryable``: the same call may succeed if made again later;
* ``may_have_started``: the server may have acted on the request, so a paid
  submit must not be sent again blindly (it would be charged twice).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from nanophoto.contract import EDGE_REFUSALS, ERROR_SPECS, FAILED, TOP_UP_URL


class NanoPhotoError(Exception):
    """Base of every error this package raises."""

    code: str = "NANOPHOTO_ERROR"
    retryable: bool = False
    may_have_started: bool = True
    # For a prompt whose every attempt failed: streams surely charged, and maybe charged.
    prompt_streams_charged: int = 0
    prompt_streams_at_risk: int = 0

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
        may_have_started: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status
        if retryable is not None:
            self.retryable = retryable
        if may_have_started is not None:
            self.may_have_started = may_have_started

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"[{self.code}]{where} {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, "
            f"retryable={self.retryable!r}, message={self.message!r})"
        )


# --- the server answered with an error document ------------------------------


class APIError(NanoPhotoError):
    """The API answered with ``success: false`` and an ``errorCode``."""

    may_have_started = False


class InvalidRequestError(APIError):
    """HTTP 400: the request was refused as invalid; fix the input."""


class AuthenticationError(APIError):
    """HTTP 401: the API key is missing or invalid."""

    code = "LOGIN_REQUIRED"


class InsufficientCreditsError(APIError):
    """HTTP 402: the account has too few credits for this call."""

    code = "INSUFFICIENT_CREDITS"
    required_credits: int | None = None


class TaskNotFoundError(APIError):
    """HTTP 404: the task does not exist or belongs to another key."""

    code = "TASK_NOT_FOUND"


class RateLimitError(APIError):
    """HTTP 429: the key's hourly request budget is spent; retry later."""

    code = "API_KEY_RATE_LIMIT_EXCEEDED"
    retryable = True
    retry_after: float | None = None


class GenerationFailedError(APIError):
    """The video generation failed server-side; final (credits are refunded)."""

    code = "GENERATION_FAILED"


class ServerError(APIError):
    """HTTP 5xx with an error document: the server failed handling the call.

    A status check may be retried. A submit may have started before the
    server failed, so it is never sent again blindly.
    """

    code = "INTERNAL_ERROR"
    retryable = True
    may_have_started = True


# --- no usable answer ---------------------------------------------------------


class TransportError(NanoPhotoError):
    """No usable answer: gateway page, dropped connection, time-out, garbage."""

    retryable = True


class GatewayError(TransportError):
    """A CDN gateway error (502/503/504/524) or another non-JSON answer."""

    code = "GATEWAY_ERROR"


class ConnectionDroppedError(TransportError):
    """The connection broke after the request may have been sent."""

    code = "CONNECTION_DROPPED"


class RequestTimeoutError(TransportError):
    """No answer within the read or write time-out."""

    code = "TIMEOUT"


class EdgeBlockedError(NanoPhotoError):
    """NanoPhoto's edge (its CDN) refused the request with an HTML page (401/403/406)
    before it reached the API: nothing was started or charged. Not retried: the same
    request would meet the same refusal."""

    code = "EDGE_BLOCKED"
    may_have_started = False


class ConnectError(TransportError):
    """The connection could not be made: the request surely was not sent."""

    code = "CONNECT_ERROR"
    may_have_started = False


# --- ours ---------------------------------------------------------------------


class MissingAPIKeyError(NanoPhotoError):
    """No API key in any of the places we look."""

    code = "MISSING_API_KEY"
    may_have_started = False


class ConfigurationError(NanoPhotoError):
    """A setting or key that cannot work (e.g. a key with a line break in it)."""

    code = "CONFIGURATION_ERROR"
    may_have_started = False


class CompletedWithoutUrlError(NanoPhotoError):
    """NanoPhoto says the video is completed (and charged) but gives no URL for it."""

    code = "COMPLETED_WITHOUT_URL"


class WaitTimeoutError(NanoPhotoError):
    """The video did not finish within the maximum wait; it may still finish."""

    code = "WAIT_TIMEOUT"


class VideoUnavailableError(NanoPhotoError):
    """The video host refused the download (expired or unknown URL); final."""

    code = "VIDEO_UNAVAILABLE"
    may_have_started = False


class SubmitOutcomeUnknownError(NanoPhotoError):
    """A submit failed in a way that leaves open whether the video started.

    Sending it again could charge twice, so we stop and tell the user.
    """

    code = "SUBMIT_OUTCOME_UNKNOWN"


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    404: TaskNotFoundError,
    429: RateLimitError,
}
_BY_CODE: dict[str, type[APIError]] = {
    "LOGIN_REQUIRED": AuthenticationError,
    "INSUFFICIENT_CREDITS": InsufficientCreditsError,
    "TASK_NOT_FOUND": TaskNotFoundError,
    "API_KEY_RATE_LIMIT_EXCEEDED": RateLimitError,
    "GENERATION_FAILED": GenerationFailedError,
    "INTERNAL_ERROR": ServerError,
}


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def answer_document(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The JSON document an API answer carries, or the error the answer maps to.

    A document whose status is ``failed`` is an answer whatever the HTTP
    code: the contract leaves open whether a failure comes with 200 or 500.
    A 200 that is not JSON is a garbled answer, not a refusal: the call may
    have been carried out.
    """
    document = json_object(body)
    if document is not None and document.get("status") == FAILED:
        return document
    if status == 200:
        if document is None:
            raise GatewayError("HTTP 200 but the answer is not a JSON object", status=200)
        if document.get("success") is not False:
            return document
    raise error_from_response(status, body, headers)


def error_from_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> NanoPhotoError:
    """Map an HTTP error answer (JSON error document or anything else) to an error.

    Anything that is not a JSON error document (a CDN page, a challenge, a
    body cut short) is not an API answer: a retryable ``GatewayError`` that may
    have started, except a 429, which is a rate limit whatever its body.
    """
    document = json_object(body)
    retry_after = parse_retry_after((headers or {}).get("retry-after"))
    if document is None or ("errorCode" not in document and "error" not in document):
        if status == 429:
            error: NanoPhotoError = RateLimitError(
                f"rate limited (not an API answer): {_snippet(body)}", status=status
            )
        elif status in EDGE_REFUSALS:
            error = EdgeBlockedError(
                f"blocked at NanoPhoto's edge: an HTML page, not an API answer "
                f"({_snippet(body, 60)}). Nothing was started or charged. If it lasts, check "
                "NANOPHOTO_USER_AGENT (NanoPhoto's own tools send a desktop Chrome one; so do "
                "we, unless it was changed) and the network between you and NanoPhoto",
                status=status,
            )
        else:
            error = GatewayError(f"not an API answer: {_snippet(body)}", status=status)
    else:
        code = str(document.get("errorCode") or f"HTTP_{status}")
        spec = ERROR_SPECS.get(code)
        message = str(document.get("error") or (spec.meaning if spec else code))
        # The code decides the kind; the HTTP status only when the code is unknown.
        cls = _BY_CODE.get(code) or _BY_STATUS.get(spec.http_status if spec else status)
        if cls is None:
            cls = ServerError if status >= 500 else APIError
        error = cls(message, code=code, status=status)
        if isinstance(error, InsufficientCreditsError):
            required = document.get("requiredCredits")
            error.required_credits = required if isinstance(required, int) else None
            error.message += f". Nothing was charged: top up at {TOP_UP_URL}"
    if isinstance(error, RateLimitError):
        error.retry_after = retry_after
    return error


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None if it is anything else."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _snippet(body: bytes, limit: int = 120) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return (text[:limit] + "…") if len(text) > limit else (text or "<empty body>")
