"""The typed async client of the NanoPhoto Sora 2 API.

One method per endpoint. Retries live here, in ``_call``, and follow the
contract's safety rules: a prompt or a status check is retried on a transient
error; a paid submit is retried only when the request surely did not start
(no connection was made, or the server refused it with a 429).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr, ValidationError

from nanophoto.contract import FAILED, PROMPT_PATH, STATUS_PATH, SUBMIT_PATH
from nanophoto.errors import (
    ConnectError,
    ConnectionDroppedError,
    GatewayError,
    GenerationFailedError,
    NanoPhotoError,
    RequestTimeoutError,
    SubmitOutcomeUnknownError,
    TransportError,
    error_from_response,
)
from nanophoto.models import PromptRequest, VideoRequest, VideoStatus
from nanophoto.retry import RetryPolicy
from nanophoto.settings import NanoPhotoSettings, resolve_api_key

_logger = logging.getLogger("nanophoto")

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class _BearerAuth(httpx.Auth):
    """Adds the key to requests for the API's own origin, and nowhere else.

    The video URL lives on another host: the key must never travel there.
    """

    def __init__(self, key: SecretStr, origin: httpx.URL) -> None:
        self._key = key
        self._origin = (origin.scheme, origin.host, origin.port)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, Any, None]:
        if (request.url.scheme, request.url.host, request.url.port) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._key.get_secret_value()}"
        yield request


@dataclass(frozen=True)
class DownloadedVideo:
    """A video saved to disk, with what proves it is whole."""

    path: Path
    size: int
    sha256: str


class NanoPhotoClient:
    """Async client for prompts, submits, status checks and downloads.

    Example:
        ```python
        async with NanoPhotoClient() as client:
            status = await client.submit(VideoRequest(prompt="A fox at dawn"))
        ```
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        settings: NanoPhotoSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.settings = settings or NanoPhotoSettings()
        self._logger = logger or _logger
        key = resolve_api_key(api_key, settings=self.settings)
        base_url = httpx.URL(self.settings.base_url.rstrip("/"))
        self.retry = retry or RetryPolicy(
            max_retries=self.settings.max_retries,
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
            max_retry_after=self.settings.retry_after_max,
        )
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url,
            auth=_BearerAuth(key, base_url),
            transport=transport,
            timeout=httpx.Timeout(
                connect=self.settings.connect_timeout,
                read=self.settings.read_timeout,
                write=self.settings.write_timeout,
                pool=self.settings.connect_timeout,
            ),
            headers={"User-Agent": "sora2-flows"},
        )

    def __repr__(self) -> str:
        return f"NanoPhotoClient(base_url={self.settings.base_url!r})"

    async def __aenter__(self) -> NanoPhotoClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # --- endpoints -------------------------------------------------------------

    async def stream_prompt(self, request: PromptRequest) -> AsyncIterator[str]:
        """Yield the prompt's text as the server writes it (one attempt).

        A stream cannot be retried without repeating text, so this makes one
        attempt; ``generate_prompt`` retries the whole stream.
        """
        with _mapped_transport_errors():
            async with self._http.stream("POST", PROMPT_PATH, json=request.to_wire()) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    raise error_from_response(response.status_code, body, response.headers)
                if "json" in response.headers.get("content-type", ""):
                    # A 200 with an error document instead of a stream.
                    raise error_from_response(500, await response.aread(), response.headers)
                # httpx's incremental decoder keeps a character that is split
                # across chunks whole.
                async for text in response.aiter_text():
                    if text:
                        yield text

    async def generate_prompt(
        self,
        request: PromptRequest,
        *,
        on_text: Callable[[str], None] | None = None,
        on_restart: Callable[[NanoPhotoError], None] | None = None,
    ) -> str:
        """The whole prompt, streamed; restarted from scratch on a transient error.

        A failed prompt is refunded, so a restart costs nothing extra.
        ``on_text`` sees each piece as it arrives; ``on_restart`` is told
        when text already seen is being thrown away.
        """

        async def attempt() -> str:
            pieces: list[str] = []
            try:
                async for text in self.stream_prompt(request):
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)
            except NanoPhotoError as error:
                if pieces and on_restart is not None and error.retryable:
                    on_restart(error)
                raise
            prompt = "".join(pieces).strip()
            if not prompt:
                raise ConnectionDroppedError("the prompt stream ended with no text")
            return prompt

        return await self._call("generate-prompt", attempt, retry_if=_transient)

    async def submit(self, request: VideoRequest) -> VideoStatus:
        """Start a video; its ``task_id`` is what to watch.

        Retried only if the request surely did not start (no connection, or
        a 429). Any other transport failure raises
        ``SubmitOutcomeUnknownError``: sending it again could charge twice.
        """

        async def attempt() -> VideoStatus:
            document = await self._post_json(SUBMIT_PATH, request.to_wire())
            try:
                return VideoStatus.model_validate(document)
            except ValidationError as error:
                raise GatewayError(
                    f"submit answer has no taskId: {error.errors()[0]['msg']}"
                ) from None

        try:
            return await self._call("generate", attempt, retry_if=_surely_not_started)
        except NanoPhotoError as error:
            if error.may_have_started:
                raise SubmitOutcomeUnknownError(
                    f"the submit may have reached NanoPhoto before it failed ({error}); "
                    "it was not sent again, to avoid paying twice. If a video task "
                    "appears in your NanoPhoto account, resume it by its taskId.",
                    status=error.status,
                ) from error
            raise

    async def check_status(self, task_id: str) -> VideoStatus:
        """The video task's state; a failed generation is a status, not an error."""
        if not task_id or not task_id.strip():
            raise ValueError("task_id: must be a non-empty NanoPhoto task id")

        async def attempt() -> VideoStatus:
            try:
                document = await self._post_json(STATUS_PATH, {"taskId": task_id})
            except GenerationFailedError as error:
                # The contract leaves open whether a failure is HTTP 200 or 500.
                return VideoStatus(
                    task_id=task_id, status=FAILED, error=error.message, error_code=error.code
                )
            document.setdefault("taskId", task_id)
            try:
                return VideoStatus.model_validate(document)
            except ValidationError as error:
                raise GatewayError(f"malformed status answer: {error.errors()[0]['msg']}") from None

        return await self._call("check-status", attempt, retry_if=_transient)

    async def download(self, url: str, destination: Path) -> DownloadedVideo:
        """Stream the video at ``url`` to ``destination``, atomically."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.{os.getpid()}.part")
        digest, size = hashlib.sha256(), 0

        async def attempt() -> DownloadedVideo:
            nonlocal digest, size
            digest, size = hashlib.sha256(), 0
            with _mapped_transport_errors():
                async with self._http.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise error_from_response(
                            response.status_code, await response.aread(), response.headers
                        )
                    with partial.open("wb") as file:
                        async for chunk in response.aiter_bytes():
                            file.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
            partial.replace(destination)
            return DownloadedVideo(destination, size, digest.hexdigest())

        try:
            return await self._call("download", attempt, retry_if=_transient)
        finally:
            partial.unlink(missing_ok=True)

    # --- plumbing ----------------------------------------------------------------

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with _mapped_transport_errors():
            response = await self._http.post(path, json=body)
        try:
            document = response.json()
        except ValueError:
            document = None
        if (
            response.status_code != 200
            or not isinstance(document, dict)
            or (document.get("success") is False and document.get("status") != FAILED)
        ):
            raise error_from_response(response.status_code, response.content, response.headers)
        if document.get("status") == FAILED and document.get("errorCode") == "GENERATION_FAILED":
            raise error_from_response(500, response.content, response.headers)
        return document

    async def _call(
        self,
        name: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        retry_if: Callable[[NanoPhotoError], bool],
    ) -> T:
        """Run ``attempt``, retrying errors that ``retry_if`` allows."""
        retry = 0
        while True:
            try:
                return await attempt()
            except NanoPhotoError as error:
                if retry >= self.retry.max_retries or not retry_if(error):
                    raise
                delay = self.retry.delay(retry, error)
                retry += 1
                self._logger.warning(
                    "%s failed with %s; retry %d of %d in %.1f s",
                    name,
                    error.code,
                    retry,
                    self.retry.max_retries,
                    delay,
                )
                await self._sleep(delay)


def _transient(error: NanoPhotoError) -> bool:
    return error.retryable


def _surely_not_started(error: NanoPhotoError) -> bool:
    return error.retryable and not error.may_have_started


class _mapped_transport_errors:
    """Turn httpx's transport exceptions into our retryable errors."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, httpx.TransportError):
            return
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        error: TransportError
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            error = ConnectError(f"could not connect: {detail}")
        elif isinstance(exc, httpx.TimeoutException):
            error = RequestTimeoutError(f"no answer in time: {detail}")
        elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            error = ConnectionDroppedError(f"connection dropped: {detail}")
        else:
            error = TransportError(f"transport failure: {detail}", code="TRANSPORT_ERROR")
        raise error from exc
