"""One status check with the standard library alone, for a command that must answer at once.

``sora2 status`` asks one question and prints one document: it should start
as fast as a plain script does, not after importing httpx and pydantic
(about 0.2 s). This module does that one call over ``http.client``, for the
plain case only: the key in ``--api-key`` or ``NANOPHOTO_API_KEY``, and no
``NANOPHOTO_*`` setting besides those in ``LITE_VARIABLES``. Anything else
(a key in the OpenClaw file, a tuned time-out or retry, an unusual answer)
is left to the full client: ``from_environment`` and ``check_status`` then
return None, and the caller goes the usual way.

The facts it shares with the full client live in one place each: the
headers in ``contract``, the reading of an answer in
``errors.answer_document``, the back-off in ``retry``, the URL and key
rules here (the settings model calls them).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from nanophoto.contract import (
    ACCEPT,
    DEFAULT_BASE_URL,
    DEFAULT_USER_AGENT,
    ORIGIN,
    REFERER,
    STATUS_PATH,
    TIMEOUT_S,
)
from nanophoto.errors import (
    ConnectError,
    ConnectionDroppedError,
    NanoPhotoError,
    RateLimitError,
    RequestTimeoutError,
    answer_document,
)
from nanophoto.retry import RetryPolicy, retry_note

# The settings a one-shot check reads itself; the rate ones do not matter to one request.
LITE_VARIABLES: Final = frozenset(
    {
        "NANOPHOTO_API_KEY",
        "NANOPHOTO_BASE_URL",
        "NANOPHOTO_USER_AGENT",
        "NANOPHOTO_TIME_SCALE",
        "NANOPHOTO_RATE_LIMIT",
        "NANOPHOTO_RATE_WINDOW",
    }
)
CONNECT_TIMEOUT_S: Final = 10.0
_TEXT_FIELDS: Final = ("videoUrl", "message", "error", "errorCode")


def check_base_url(url: str) -> str:
    """The key travels in a header: only over https, or to this machine (loopback)."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    local = host == "localhost" or _is_loopback_address(host)
    if parts.scheme != "https" and not (parts.scheme == "http" and local):
        raise ValueError(
            f"must be an https URL, or http to this machine (localhost, 127.x.x.x, ::1), "
            f"not {url!r}: the API key would travel in clear text"
        )
    if not host:
        raise ValueError(f"must name a host, not {url!r}")
    return url.strip()


def _is_loopback_address(host: str) -> bool:
    """An IP address of this machine (127.0.0.0/8, ::1); never a name such as 127.evil.com."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_header_text(value: str) -> bool:
    """Printable ASCII on one line: what may be sent as a header value."""
    return value.isascii() and value.isprintable()


def is_key_text(value: str) -> bool:
    """A key that can be sent as a bearer token: header text, and no spaces."""
    return is_header_text(value) and not any(c.isspace() for c in value)


class LiteSettings:
    """Where to ask, as whom, and how long to wait for one answer."""

    __slots__ = ("api_key", "base_url", "timeout", "user_agent")

    def __init__(self, base_url: str, api_key: str, user_agent: str, timeout: float) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.user_agent = user_agent
        self.timeout = timeout

    def __repr__(self) -> str:  # never the key
        return f"LiteSettings(base_url={self.base_url!r}, timeout={self.timeout:g})"

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str],
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        user_agent: str | None = None,
    ) -> LiteSettings | None:
        """The plain case's settings (flags over the environment); None for any other case.

        Every refusal the full settings would give (a bad URL, a key or
        User-Agent with odd characters, no key here) is None too: the full
        path then says what is wrong, in its own words.
        """
        if any(name.startswith("NANOPHOTO_") and name not in LITE_VARIABLES for name in environ):
            return None
        key = (api_key or "").strip() or environ.get("NANOPHOTO_API_KEY", "").strip()
        agent = user_agent if user_agent is not None else environ.get("NANOPHOTO_USER_AGENT")
        agent = DEFAULT_USER_AGENT if agent is None else agent.strip()
        try:
            base_url = check_base_url(environ.get("NANOPHOTO_BASE_URL", DEFAULT_BASE_URL))
        except ValueError:
            return None
        if not (key and is_key_text(key) and agent and is_header_text(agent)):
            return None
        if timeout is not None and not timeout > 0:
            return None
        return cls(base_url.rstrip("/"), key, agent, TIMEOUT_S if timeout is None else timeout)


def check_status(
    settings: LiteSettings,
    task_id: str,
    *,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """``task_id``'s status document as NanoPhoto sent it, retried as the full client does
    (``on_retry`` is told of each retry).

    Raises the ``NanoPhotoError`` of an answer no retry can fix (401, 404, a
    429: the hourly budget is spent, asking again spends more). Returns None
    for a document the full client must judge (a field of an unexpected type).
    """
    retry = retry or RetryPolicy()
    attempt = 0
    while True:
        try:
            document = _post(settings, STATUS_PATH, {"taskId": task_id})
        except NanoPhotoError as error:
            if not error.retryable or isinstance(error, RateLimitError):
                raise
            if attempt >= retry.max_retries:
                raise
            delay = retry.delay(attempt, error)
            attempt += 1
            if on_retry is not None:
                on_retry(retry_note("check-status", error, attempt, retry.max_retries, delay))
            sleep(delay)
            continue
        return document if _plain_status(document) else None


def _plain_status(document: dict[str, Any]) -> bool:
    """A status document with nothing the full client's model would refuse or reshape."""
    task_id = document.get("taskId", "given")
    return (
        isinstance(document.get("status"), str)
        and isinstance(task_id, str)
        and bool(task_id)
        and all(isinstance(document.get(name, ""), str) for name in _TEXT_FIELDS)
    )


def _post(settings: LiteSettings, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` as JSON; the answer's document, or the error it maps to."""
    parts = urlsplit(settings.base_url)
    connect_timeout = min(settings.timeout, CONNECT_TIMEOUT_S)  # as the full client's
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname or "",
            parts.port,
            timeout=connect_timeout,
            context=ssl.create_default_context(),
        )
    else:
        connection = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=connect_timeout
        )
    headers = {
        "User-Agent": settings.user_agent,
        "Accept": ACCEPT,
        "Origin": ORIGIN,
        "Referer": REFERER,
        "Content-Type": "application/json",
        "Authorization": f"Bearer {settings.api_key}",
    }
    try:
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as error:
            raise ConnectError(f"could not connect: {_describe(error)}") from None
        if connection.sock is not None:
            connection.sock.settimeout(settings.timeout)
        try:
            connection.request("POST", parts.path + path, json.dumps(body), headers)
            response = connection.getresponse()
            content = response.read()
        except TimeoutError as error:  # socket.timeout
            raise RequestTimeoutError(f"no answer in time: {_describe(error)}") from None
        except (OSError, http.client.HTTPException) as error:
            raise ConnectionDroppedError(f"connection dropped: {_describe(error)}") from None
    finally:
        connection.close()
    return answer_document(
        response.status, content, {k.lower(): v for k, v in response.getheaders()}
    )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
