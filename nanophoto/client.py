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
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx

try:  # what httpx itself reads from the environment (private: a later httpx may move it)
    from httpx._utils import get_environment_proxies
except ImportError:  # pragma: no cover - then httpx reads the environment for each client
    get_environment_proxies = None  # type: ignore[assignment]
from pydantic import SecretStr, ValidationError

from nanophoto.contract import (
    ACCEPT,
    FAILED,
    ORIGIN,
    PROMPT_PATH,
    REFERER,
    STATUS_PATH,
    SUBMIT_PATH,
)
from nanophoto.errors import (
    ConfigurationError,
    ConnectError,
    ConnectionDroppedError,
    GatewayError,
    NanoPhotoError,
    RateLimitError,
    RequestTimeoutError,
    SubmitOutcomeUnknownError,
    TransportError,
    VideoUnavailableError,
    answer_document,
    error_from_response,
)
from nanophoto.models import GeneratedPrompt, PromptRequest, VideoRequest, VideoStatus
from nanophoto.ratelimit import Priority, RequestLimiter
from nanophoto.retry import RetryPolicy, retry_note
from nanophoto.settings import (
    PROMPT_SKILL,
    VIDEO_SKILL,
    NanoPhotoSettings,
    current_settings,
    resolve_api_key,
)
from nanophoto.storage import VideoStore

_logger = logging.getLogger("nanophoto")

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
# A finished video's URL answering 404 (a CDN not caught up yet): asked for again this many
# times, after 5, 10, 20, 40 of NanoPhoto's seconds.
VIDEO_URL_RETRIES = 4
VIDEO_URL_BACKOFF_S = 5.0


def _tls_context() -> ssl.SSLContext:
    """One TLS context per CA setting for every client of this process.

    Loading the CA bundle costs about 20 ms of CPU, and a batch opens a client
    for every call it makes: hundreds per video batch, most of its CPU.
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured as httpx does.
    """
    where = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _TLS_CONTEXTS.get(where)
    if context is None:
        context = _TLS_CONTEXTS[where] = httpx.create_ssl_context()
    return context


_TLS_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}

# What urllib's getproxies() reads for the proxies httpx uses (http, https, all, no).
_PROXY_VARIABLES = (
    *(f"{scheme}_proxy" for scheme in ("http", "https", "all", "no")),
    *(f"{scheme}_PROXY" for scheme in ("HTTP", "HTTPS", "ALL", "NO")),
    "REQUEST_METHOD",
)


def _connections(transport: httpx.AsyncBaseTransport | None) -> dict[str, Any]:
    """The transport options of a client: ``transport``, or the environment's proxies
    (``HTTPS_PROXY``, ``NO_PROXY``, ...) as httpx would honour them, read once per setting.

    httpx finds them for each client by decoding every variable of the process
    (urllib's ``getproxies``), a few percent of a batch's CPU: a batch opens
    clients for each call.
    """
    if transport is not None:
        return {"transport": transport}
    if get_environment_proxies is None:
        return {}
    where = tuple(os.environ.get(name) for name in _PROXY_VARIABLES)
    proxies = _PROXIES.get(where)
    if proxies is None:
        proxies = _PROXIES[where] = get_environment_proxies()
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {
        pattern: None if url is None else httpx.AsyncHTTPTransport(verify=_tls_context(), proxy=url)
        for pattern, url in proxies.items()
    }
    return {"trust_env": False, "mounts": mounts}


_PROXIES: dict[tuple[str | None, ...], dict[str, str | None]] = {}


class _BearerAuth(httpx.Auth):
    """Adds the key to requests for the API's own origin, and nowhere else."""

    def __init__(self, key: SecretStr, origin: httpx.URL) -> None:
        self._key = key
        self._origin = (origin.scheme, origin.host, origin.port)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, Any, None]:
        if (request.url.scheme, request.url.host, request.url.port) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._key.get_secret_value()}"
        yield request


@dataclass(frozen=True)
class DownloadedVideo:
    """A video saved whole: where (a path or URL), its size and checksum."""

    path: str
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
        extra_key_sources: tuple[tuple[str, SecretStr | None], ...] = (),
        limiter: RequestLimiter | None = None,
        skills: tuple[str, ...] = (VIDEO_SKILL, PROMPT_SKILL),
    ) -> None:
        self.settings = settings or current_settings()
        # Every attempt at an API endpoint takes a slot; None: no throttling.
        self.limiter = limiter
        self._logger = logger or _logger
        key = resolve_api_key(
            api_key, settings=self.settings, extra_sources=extra_key_sources, skills=skills
        )
        base_url = httpx.URL(self.settings.base_url.rstrip("/"))
        self.retry = retry or RetryPolicy(
            max_retries=self.settings.max_retries,
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
            max_retry_after=self.settings.retry_after_max,
            rate_limit_delay=self.settings.retry_rate_limit_delay,
        )
        self._sleep = sleep
        timeout = httpx.Timeout(
            connect=self.settings.connect_timeout,
            read=self.settings.read_timeout,
            write=self.settings.write_timeout,
            pool=self.settings.connect_timeout,
        )
        self._http = httpx.AsyncClient(
            base_url=base_url,
            auth=_BearerAuth(key, base_url),
            verify=_tls_context(),
            **_connections(transport),
            timeout=timeout,
            # As NanoPhoto's published tools send them: its edge may refuse other clients.
            headers={
                "User-Agent": self.settings.user_agent,
                "Accept": ACCEPT,
                "Origin": ORIGIN,
                "Referer": REFERER,
            },
        )
        # Videos live on another host: no key there, and redirects are followed.
        self._media = httpx.AsyncClient(
            verify=_tls_context(),
            **_connections(transport),
            timeout=timeout,
            follow_redirects=True,
            headers={"User-Agent": self.settings.user_agent},
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
        """Close the connection pools."""
        await self._http.aclose()
        await self._media.aclose()

    # --- endpoints -------------------------------------------------------------

    async def stream_prompt(self, request: PromptRequest) -> AsyncGenerator[str, None]:
        """Yield the prompt's text as the server writes it (one attempt).

        A stream cannot be retried without repeating text, so this makes one
        attempt; ``generate_prompt`` retries the whole stream. It takes one
        slot of the request budget.
        """
        async with self._slot(Priority.PROMPT):
            with _mapped_transport_errors():
                async with self._http.stream(
                    "POST", PROMPT_PATH, json=request.to_wire()
                ) as response:
                    if response.status_code != 200 or "json" in response.headers.get(
                        "content-type", ""
                    ):
                        # An error, or a 200 carrying an error document instead of a stream.
                        body = await response.aread()
                        raise error_from_response(
                            response.status_code if response.status_code != 200 else 500,
                            body,
                            response.headers,
                        )
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
        on_discard: Callable[[NanoPhotoError, int], None] | None = None,
    ) -> GeneratedPrompt:
        """The whole prompt, streamed; started again from scratch on a transient error.

        ``on_text`` sees each piece as it arrives; ``on_discard`` is told when
        text already seen is thrown away. A stream the server cuts counts as a
        failed generation, which NanoPhoto refunds; a stream *we* abandon after
        our read time-out may still be charged, so it is counted in
        ``streams_charged``. An attempt that failed before any text, in a way
        that may have reached NanoPhoto (a gateway page, a dropped
        connection), may have been charged too: ``streams_at_risk`` counts
        those. When every attempt fails, the error carries both counts.
        """
        abandoned = at_risk = 0
        quiet_for = self.settings.call_timeout

        async def attempt() -> str:
            nonlocal abandoned, at_risk
            pieces: list[str] = []
            loop = asyncio.get_running_loop()
            try:
                # A stream still sending text is never abandoned for being long: the
                # call's time limit runs from its last piece of text, not from its start.
                try:
                    async with asyncio.timeout(quiet_for) as idle:
                        async with aclosing(self.stream_prompt(request)) as stream:
                            async for text in stream:
                                idle.reschedule(loop.time() + quiet_for)
                                pieces.append(text)
                                if on_text is not None:
                                    on_text(text)
                except TimeoutError:
                    raise RequestTimeoutError(
                        f"the prompt stream sent nothing for {quiet_for:g} s"
                    ) from None
            except NanoPhotoError as error:
                if pieces:
                    abandoned += isinstance(error, RequestTimeoutError)
                    if on_discard is not None:
                        on_discard(error, sum(map(len, pieces)))
                elif error.may_have_started:
                    at_risk += 1
                error.prompt_streams_charged, error.prompt_streams_at_risk = abandoned, at_risk
                raise
            prompt = "".join(pieces).strip()
            if not prompt:
                raise ConnectionDroppedError("the prompt stream ended with no text")
            return prompt

        text = await self._call(
            "generate-prompt", attempt, retry_if=_transient, attempt_timeout=None
        )
        return GeneratedPrompt(text=text, streams_charged=1 + abandoned, streams_at_risk=at_risk)

    async def submit(
        self,
        request: VideoRequest,
        *,
        before_send: Callable[[], Awaitable[None]] | None = None,
        after_unsent: Callable[[NanoPhotoError], Awaitable[None]] | None = None,
    ) -> VideoStatus:
        """Start a video; its ``task_id`` is what to watch.

        Retried only if the request surely did not start (no connection, or
        a 429). Any other failure that may have reached the server raises
        ``SubmitOutcomeUnknownError``: sending it again could charge twice.
        ``before_send`` runs before each attempt's bytes leave, once its slot
        of the request budget is granted: the moment to record "sending".
        ``after_unsent`` runs after an attempt that surely did not start (no
        connection, a 429), before any retry waits: the moment to record that
        nothing is on the wire any more.
        """

        async def attempt() -> VideoStatus:
            document = await self._post(SUBMIT_PATH, request.to_wire())
            try:
                return VideoStatus.from_answer(document)
            except ValidationError as error:
                raise GatewayError(f"submit answer without a task: {_first(error)}") from None

        try:
            return await self._call(
                "generate",
                attempt,
                retry_if=_surely_not_started,
                priority=Priority.SUBMIT,
                before_attempt=before_send,
                after_unsent=after_unsent,
            )
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
        """The video task's state; a failed generation is a status, not an error.

        A 429 is not retried here: the next scheduled check is the retry, and
        retrying sooner spends more of an hourly budget that is already spent.
        """
        if not task_id or not task_id.strip():
            raise ValueError("task_id: must be a non-empty NanoPhoto task id")

        async def attempt() -> VideoStatus:
            document = await self._post(STATUS_PATH, {"taskId": task_id})
            parsed = {"taskId": task_id, **document}
            if parsed.get("status") == FAILED:
                parsed.setdefault("errorCode", "GENERATION_FAILED")
            try:
                status = VideoStatus.model_validate(parsed)
                status._raw = document
                return status
            except ValidationError as error:
                raise GatewayError(f"malformed status answer: {_first(error)}") from None

        return await self._call(
            "check-status", attempt, retry_if=_transient_not_rate_limit, priority=Priority.CHECK
        )

    async def download_finished(
        self, task_id: str, url: str, destination: Path | str | VideoStore
    ) -> DownloadedVideo:
        """Download a finished video; a URL that answers 404 (a CDN that has not caught
        up) is asked for again, with a fresh status, before giving up.

        Whole file or none, as ``download``. Gives up after ``VIDEO_URL_RETRIES``
        tries, spaced 5, 10, 20, 40 of NanoPhoto's seconds, with a message that
        says how to pick the video up later.
        """
        for retry in range(VIDEO_URL_RETRIES + 1):
            try:
                return await self.download(url, destination, task_id)
            except VideoUnavailableError as error:
                if retry == VIDEO_URL_RETRIES:
                    raise VideoUnavailableError(
                        f"video {task_id} is completed but its URL answered HTTP {error.status} "
                        f"{retry + 1} times, with a fresh URL each time. It was paid for: pick "
                        f"it up later, without paying again (sora2 resume --task-id {task_id}, "
                        f"or resume-video with task_id={task_id})",
                        status=error.status,
                    ) from error
                delay = VIDEO_URL_BACKOFF_S * 2**retry  # NanoPhoto's seconds
                self._logger.warning(
                    "the video of %s answered HTTP %s; asking for it again in %.0f s",
                    task_id,
                    error.status,
                    delay,
                )
                await self._sleep(delay * self.settings.time_scale)
                try:
                    fresh = await self.check_status(task_id)
                except NanoPhotoError as checking:
                    if not checking.retryable:
                        raise
                    continue  # a 429 or gateway page: the URL we have is tried again
                if fresh.is_completed and fresh.video_url:
                    url = fresh.video_url
        raise AssertionError("unreachable")  # the loop returns or raises

    async def download(
        self, url: str, destination: Path | str | VideoStore, task_id: str | None = None
    ) -> DownloadedVideo:
        """Stream the video at ``url`` into a store, whole or not at all.

        ``destination`` is a file path (the CLI's way) or a ``VideoStore``
        (a folder or fsspec URL), in which the file is named by ``task_id``.
        """
        if isinstance(destination, VideoStore):
            if task_id is None:
                raise ValueError("task_id: needed to name the file in a video store")
            store, name = destination, task_id
        else:
            path = Path(destination)
            store, name = VideoStore(str(path.parent)), path.name.removesuffix(".mp4")

        async def attempt() -> DownloadedVideo:
            digest, size = hashlib.sha256(), 0
            partial, file = await asyncio.to_thread(store.open_partial, name)
            try:
                with file, _mapped_transport_errors():
                    async with self._media.stream("GET", url) as response:
                        if response.status_code in (403, 404, 410):
                            raise VideoUnavailableError(
                                f"the video host refused {url} (expired or unknown)",
                                status=response.status_code,
                            )
                        if response.status_code != 200:
                            body = await response.aread()
                            raise error_from_response(response.status_code, body, response.headers)
                        async for chunk in response.aiter_bytes():
                            file.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                saved = await asyncio.to_thread(store.publish, partial, name)
            except BaseException:
                await asyncio.to_thread(store.discard, partial)
                raise
            return DownloadedVideo(saved, size, digest.hexdigest())

        return await self._call("download", attempt, retry_if=_transient)

    # --- plumbing ----------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST; the answer's JSON document, or the error it maps to (``answer_document``)."""
        with _mapped_transport_errors():
            response = await self._http.post(path, json=body)
        return answer_document(response.status_code, response.content, response.headers)

    def _slot(self, priority: Priority | None) -> AbstractAsyncContextManager[None]:
        """A slot of the key's request budget, held while the request is under way (none
        for a call that makes no API request)."""
        if priority is None or self.limiter is None:
            return nullcontext()
        return self.limiter.slot(priority)

    async def _call(
        self,
        name: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        retry_if: Callable[[NanoPhotoError], bool],
        priority: Priority | None = None,
        before_attempt: Callable[[], Awaitable[None]] | None = None,
        after_unsent: Callable[[NanoPhotoError], Awaitable[None]] | None = None,
        attempt_timeout: float | Literal["default"] | None = "default",
    ) -> T:
        """Run ``attempt``, each within the call time limit, retrying what ``retry_if`` allows.

        An API call (``priority`` set) waits for a slot of the key's request
        budget before each attempt: a retry is a request too.
        """
        limit = self.settings.call_timeout if attempt_timeout == "default" else attempt_timeout
        retry = 0
        while True:
            try:
                async with self._slot(priority):
                    if before_attempt is not None:
                        await before_attempt()
                    try:
                        async with asyncio.timeout(limit):
                            return await attempt()
                    except TimeoutError:
                        raise RequestTimeoutError(f"{name} took longer than {limit:g} s") from None
            except NanoPhotoError as error:
                if isinstance(error, RateLimitError) and error.retry_after is not None:
                    # Retry-After counts NanoPhoto's seconds; a compressed simulator's are short.
                    error.retry_after *= self.settings.time_scale
                if after_unsent is not None and not error.may_have_started:
                    await after_unsent(error)
                if retry >= self.retry.max_retries or not retry_if(error):
                    raise
                delay = self.retry.delay(retry, error)
                retry += 1
                self._logger.warning(
                    "%s", retry_note(name, error, retry, self.retry.max_retries, delay)
                )
                await self._sleep(delay)


def _transient(error: NanoPhotoError) -> bool:
    return error.retryable


def _transient_not_rate_limit(error: NanoPhotoError) -> bool:
    return error.retryable and not isinstance(error, RateLimitError)


def _surely_not_started(error: NanoPhotoError) -> bool:
    return error.retryable and not error.may_have_started


def _first(error: ValidationError) -> str:
    detail = error.errors()[0]
    return f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}"


@contextmanager
def _mapped_transport_errors() -> Generator[None, None, None]:
    """Turn httpx's exceptions into ours.

    A request httpx refused to build (for example a header with a line break)
    never left this machine; its message may quote the header, so it is not
    repeated and not chained.
    """
    try:
        yield
    except (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise ConfigurationError(
            f"the request could not be built ({type(exc).__name__}); "
            "check NANOPHOTO_BASE_URL and the API key for stray characters"
        ) from None
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise ConnectError(f"could not connect: {_describe(exc)}") from exc
    except httpx.TimeoutException as exc:
        raise RequestTimeoutError(f"no answer in time: {_describe(exc)}") from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise ConnectionDroppedError(f"connection dropped: {_describe(exc)}") from exc
    except httpx.DecodingError as exc:
        raise GatewayError(f"undecodable answer: {_describe(exc)}") from exc
    except httpx.HTTPError as exc:
        raise TransportError(
            f"transport failure: {_describe(exc)}", code="TRANSPORT_ERROR"
        ) from exc


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
