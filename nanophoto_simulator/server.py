"""A local server that speaks the NanoPhoto Sora 2 contract.

It is a small HTTP/1.1 server on asyncio streams rather than a web framework,
because faithful faults need the socket: a connection dropped mid-answer, a
gateway's HTML page, a prompt stream that stalls or is cut off.

The API and the video files are served on two ports, as the real service
serves them from two hosts, so a test can prove the key never reaches the
video host.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
import ssl
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from nanophoto.contract import (
    COMPLETED,
    DURATIONS,
    FAILED,
    GATEWAY_STATUSES,
    MAX_IMAGE_URLS,
    PROCESSING,
    PROMPT_COST,
    PROMPT_PATH,
    STATUS_PATH,
    SUBMIT_PATH,
    TOPIC_MAX_CHARS,
    AspectRatio,
    Locale,
    Mode,
    ModelTier,
    Technique,
    video_cost,
)
from nanophoto_simulator.config import (
    ANY_CALL_FAULTS,
    LOST_ANSWER_FAULTS,
    STREAM_FAULTS,
    Fault,
    Faults,
    SimulatorConfig,
)
from nanophoto_simulator.ledger import Ledger, VideoTask
from nanophoto_simulator.prompts import write_prompt

ENDPOINTS = {PROMPT_PATH: "generate-prompt", SUBMIT_PATH: "generate", STATUS_PATH: "check-status"}
# Which faults can strike which endpoint.
FAULTS_BY_ENDPOINT: dict[str, tuple[Fault, ...]] = {
    "generate-prompt": (*ANY_CALL_FAULTS, *STREAM_FAULTS),
    "generate": (*ANY_CALL_FAULTS, Fault.GENERATION_FAILED),
    "check-status": ANY_CALL_FAULTS,
}
_GATEWAY_PAGES = {
    502: "Bad gateway",
    503: "Service temporarily unavailable",
    504: "Gateway time-out",
    524: "A timeout occurred",
}
assert set(_GATEWAY_PAGES) == GATEWAY_STATUSES


_STRIKES_AFTER = {
    Fault.GATEWAY_ERROR: Fault.GATEWAY_ERROR_AFTER,
    Fault.DROPPED_CONNECTION: Fault.DROPPED_CONNECTION_AFTER,
}


class _Cut(Exception):
    """Raised inside a stream to cut the connection without finishing it."""


@dataclass
class Reply:
    """An answer to write back, or an instruction to drop the connection."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    stream: AsyncIterator[bytes] | None = None
    drop: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _json(status: int, document: dict[str, Any]) -> Reply:
    return Reply(status=status, body=json.dumps(document).encode())


def _error(http_status: int, code: str, message: str, **extra: Any) -> Reply:
    return _json(http_status, {"success": False, "error": message, "errorCode": code, **extra})


def _gateway_page(status: int) -> Reply:
    title = _GATEWAY_PAGES[status]
    page = (
        f"<!DOCTYPE html><html><head><title>{status} {title}</title></head>"
        f"<body><h1>{status} {title}</h1><p>cdn edge</p></body></html>"
    )
    return Reply(status=status, body=page.encode(), content_type="text/html; charset=UTF-8")


def _load_video(aspect_ratio: str) -> bytes:
    return (
        resources.files("nanophoto_simulator").joinpath(f"assets/{aspect_ratio}.mp4").read_bytes()
    )


def _with_task_id(mp4: bytes, task_id: str) -> bytes:
    """Append a ``free`` box naming the task: still a valid MP4, unique per task."""
    payload = f"nanophoto-simulator task {task_id}".encode()
    return mp4 + (8 + len(payload)).to_bytes(4, "big") + b"free" + payload


class Simulator:
    """The simulated service: state, rules and the two servers.

    Run it inside an event loop with ``start``/``stop``, or in a thread with
    ``SimulatorThread``.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.ledger = Ledger()
        self.balances = dict(self.config.keys)
        self._starting = dict(self.config.keys)
        self._rng = random.Random(self.config.seed)
        self._occurrences: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        self._windows: dict[str, deque[float]] = defaultdict(deque)
        self._queued: dict[str, deque[Fault]] = defaultdict(deque)
        self._answers: dict[str, deque[Reply]] = defaultdict(deque)
        self._videos = {ratio.value: _load_video(ratio.value) for ratio in AspectRatio}
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._origin = time.monotonic()
        self.base_url = ""
        self.media_url = ""

    # --- lifecycle ---------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        media_port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Listen for API calls on ``port`` and video downloads on ``media_port``; over
        TLS with ``tls`` (a server context), as a host other than this machine must be."""
        api = await asyncio.start_server(self._serve(self._handle_api), host, port, ssl=tls)
        media = await asyncio.start_server(
            self._serve(self._handle_media), host, media_port, ssl=tls
        )
        self._servers = [api, media]
        scheme = "https" if tls else "http"
        self.base_url = f"{scheme}://{host}:{api.sockets[0].getsockname()[1]}"
        self.media_url = f"{scheme}://{host}:{media.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for connection in list(self._connections):
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    # --- what tests and benchmarks use --------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ledger as a JSON-ready dict, with every due video settled."""
        with self._lock:
            now = time.monotonic()
            for task in self.ledger.tasks.values():
                self._settle(task, now)
            return self.ledger.snapshot(
                self.balances, self._starting, self._origin, self.config.time_scale
            )

    def queue_fault(self, endpoint: str, *kinds: Fault | str) -> None:
        """Make the next requests to ``endpoint`` fail in these ways, in order."""
        if endpoint not in FAULTS_BY_ENDPOINT:
            raise ValueError(f"endpoint must be one of {sorted(FAULTS_BY_ENDPOINT)}")
        allowed = FAULTS_BY_ENDPOINT[endpoint]
        faults = []
        for kind in kinds:
            if kind not in allowed:
                names = [str(fault) for fault in allowed]
                raise ValueError(f"fault {kind!r} cannot strike {endpoint}; one of {names}")
            faults.append(Fault(kind))
        with self._lock:
            self._queued[endpoint].extend(faults)

    def queue_answer(
        self,
        endpoint: str,
        status: int,
        document: dict[str, Any] | str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next authorised request to ``endpoint`` with this, once.

        For replaying an answer seen in the field that the contract does not
        describe (a ``completed`` without a ``videoUrl``, a 401 mid-watch, a
        long ``Retry-After``). The request counts against the key's rate
        limit, and the service does nothing else with it: nothing is charged.
        """
        if endpoint not in FAULTS_BY_ENDPOINT:
            raise ValueError(f"endpoint must be one of {sorted(FAULTS_BY_ENDPOINT)}")
        if isinstance(document, str):
            reply = Reply(status=status, body=document.encode(), content_type="text/html")
        else:
            reply = _json(status, document)
        reply.headers.update(headers or {})
        with self._lock:
            self._answers[endpoint].append(reply)

    def set_faults(self, faults: Faults) -> None:
        """Switch the random faults (probabilities per request)."""
        self.config.faults = faults

    # --- HTTP plumbing --------------------------------------------------------------

    def _serve(
        self, handler: Callable[[_Request], Any]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._connections.add(task)
            self._writers.add(writer)
            try:
                while True:
                    try:
                        request = await _read_request(reader)
                    except ValueError:
                        await self._write(writer, _json(400, {"error": "malformed request"}))
                        break
                    if request is None:
                        break
                    try:
                        reply = await handler(request)
                    except Exception as error:  # a bug here must not look like a dropped line
                        reply = _error(500, "INTERNAL_ERROR", f"simulator error: {error!r}")
                    if not await self._write(writer, reply):
                        break
                    if request.headers.get("connection", "").lower() == "close":
                        break
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            except asyncio.CancelledError:
                pass  # stopping
            finally:
                self._writers.discard(writer)
                writer.close()
                if task is not None:
                    self._connections.discard(task)

        return connection

    async def _write(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        """Write ``reply``; False when the connection must not be reused."""
        if reply.drop:
            writer.transport.abort()
            return False
        head = [
            f"HTTP/1.1 {reply.status} {_reason(reply.status)}",
            f"Content-Type: {reply.content_type}",
        ]
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        if reply.stream is None:
            head.append(f"Content-Length: {len(reply.body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)
            await writer.drain()
            return True
        head.append("Transfer-Encoding: chunked")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        try:
            async for chunk in reply.stream:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
        except _Cut:
            writer.transport.abort()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    # --- the API ----------------------------------------------------------------------

    async def _handle_api(self, request: _Request) -> Reply:
        if request.path.startswith("/_simulator/"):
            return self._control(request)
        endpoint = ENDPOINTS.get(request.path)
        if endpoint is None or request.method != "POST":
            return _json(404, {"success": False, "error": "Not found"})
        key = _bearer(request.headers)
        headers = request.headers
        with self._lock:
            seen = (
                headers.get("user-agent", ""),
                headers.get("origin", ""),
                headers.get("referer", ""),
                headers.get("accept", ""),
            )
            self.ledger.headers[seen] += 1
            if self.config.edge and not _looks_like_a_browser(headers):
                self.ledger.edge_refused += 1
                return _challenge_page()  # the CDN's: the API never sees the request
            # Unknown tokens are never stored: they may be someone's real key.
            known = key if key in self.balances else ("<none>" if key is None else "<invalid>")
            self.ledger.requests[(known, endpoint)] += 1
            if endpoint == "generate":
                self.ledger.submit_requests[_head(request.body, "prompt")] += 1
            rng = self._request_rng(endpoint, known, request.body)
            fault = self._draw_fault(endpoint, rng)
            if fault and fault not in STREAM_FAULTS:
                self.ledger.faults[fault.value] += 1
            # Faults at the CDN edge: the origin never sees the request.
            if fault == Fault.GATEWAY_ERROR:
                return _gateway_page(rng.choice(sorted(_GATEWAY_PAGES)))
            if fault == Fault.DROPPED_CONNECTION:
                return Reply(drop=True)
            if key is None or key not in self.balances:
                return _error(401, "LOGIN_REQUIRED", "Please log in or provide a valid API key")
            if fault == Fault.RATE_LIMITED or not self._take_rate_slot(key):
                self.ledger.rate_limited[key] += 1
                return _error(
                    429,
                    "API_KEY_RATE_LIMIT_EXCEEDED",
                    f"API key rate limit exceeded: {self.config.rate_limit} requests per hour",
                )
            if fault == Fault.INTERNAL_ERROR:
                return _error(500, "INTERNAL_ERROR", "Internal server error")
            if self._answers[endpoint]:
                self.ledger.replayed_answers += 1
                return self._answers[endpoint].popleft()
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return _error(400, "INVALID_INPUT", "Request body must be a JSON object")
            if endpoint == "generate-prompt":
                reply = self._prompt(key, body, fault, rng)
            elif endpoint == "generate":
                reply = self._submit(key, body, fault, rng)
            else:
                reply = self._check_status(key, body, delivered=fault not in LOST_ANSWER_FAULTS)
        # Faults after the origin did the work: the answer is late, or lost on the way back.
        if fault == Fault.SLOW_ANSWER:
            await asyncio.sleep(self.config.real(self.config.faults.stall_seconds))
        if fault == Fault.GATEWAY_ERROR_AFTER:
            return _gateway_page(rng.choice(sorted(_GATEWAY_PAGES)))
        if fault == Fault.DROPPED_CONNECTION_AFTER:
            return Reply(drop=True)
        return reply

    def _request_rng(self, endpoint: str, key: str, body: bytes) -> random.Random:
        """The randomness of one request: with a seed, the n-th identical request
        (same key, endpoint and body) always draws the same, however requests
        interleave, so a run's faults can be replayed."""
        if self.config.seed is None:
            return self._rng
        digest = hashlib.sha256(b"%s\0%s\0%s" % (key.encode(), endpoint.encode(), body))
        occurrence = self._occurrences[(endpoint, digest.hexdigest())]
        self._occurrences[(endpoint, digest.hexdigest())] += 1
        return random.Random(f"{self.config.seed}:{digest.hexdigest()}:{occurrence}")

    def _draw_fault(self, endpoint: str, rng: random.Random) -> Fault | None:
        if self._queued[endpoint]:
            return self._queued[endpoint].popleft()
        faults = self.config.faults
        roll = rng.random()
        for kind in (
            Fault.INTERNAL_ERROR,
            Fault.GATEWAY_ERROR,
            Fault.DROPPED_CONNECTION,
            Fault.RATE_LIMITED,
        ):
            chance = faults.chance(kind)
            if roll < chance:
                if kind in _STRIKES_AFTER and rng.random() < faults.after_processing:
                    return _STRIKES_AFTER[kind]
                return kind
            roll -= chance
        return None

    def _take_rate_slot(self, key: str) -> bool:
        now = time.monotonic()
        window = self._windows[key]
        span = self.config.real(self.config.rate_window_seconds)
        while window and window[0] <= now - span:
            window.popleft()
        if len(window) >= self.config.rate_limit:
            return False
        window.append(now)
        return True

    def _prompt(
        self, key: str, body: dict[str, Any], fault: Fault | None, rng: random.Random
    ) -> Reply:
        topic = body.get("topic")
        if not isinstance(topic, str) or not topic.strip() or len(topic.strip()) > TOPIC_MAX_CHARS:
            return _error(
                400, "INVALID_INPUT", f"Topic is required (1-{TOPIC_MAX_CHARS} characters)"
            )
        invalid = (
            _invalid_choice(body, "mode", Mode, Mode.TEXT_TO_VIDEO)
            or _invalid_choice(body, "technique", Technique, Technique.MONTAGE)
            or _invalid_choice(body, "locale", Locale, Locale.EN)
            or _invalid_duration(body.get("duration", 10), numeric=True)
            or _invalid_images(body)
        )
        if invalid:
            return invalid
        if self.balances[key] < PROMPT_COST:
            return _error(
                402, "INSUFFICIENT_CREDITS", "Insufficient credits", requiredCredits=PROMPT_COST
            )
        self.balances[key] -= PROMPT_COST
        self.ledger.charged[key] += PROMPT_COST
        self.ledger.prompts["started"] += 1
        self.ledger.prompt_charges[topic.strip()[:80]] += PROMPT_COST
        text = write_prompt(
            topic.strip(),
            Technique(body.get("technique", Technique.MONTAGE)),
            int(body.get("duration", 10)),
            Locale(body.get("locale", Locale.EN)),
        )
        if fault not in STREAM_FAULTS:
            fault = self._roll_stream_fault(rng)
        return Reply(
            content_type="text/plain; charset=utf-8",
            stream=self._stream_prompt(key, topic.strip()[:80], text.encode(), fault),
        )

    def _roll_stream_fault(self, rng: random.Random) -> Fault | None:
        faults = self.config.faults
        roll = rng.random()
        if roll < faults.truncated_stream:
            return Fault.TRUNCATED_STREAM
        if roll < faults.truncated_stream + faults.slow_stream:
            return Fault.SLOW_STREAM
        return None

    async def _stream_prompt(
        self, key: str, topic: str, text: bytes, fault: Fault | None
    ) -> AsyncIterator[bytes]:
        """Stream ``text`` in chunks cut at byte offsets, splitting characters."""
        count = min(self.config.prompt_chunks, len(text))
        cuts = [len(text) * i // count for i in range(count + 1)]
        pause = self.config.real(self.config.prompt_seconds) / count
        for index in range(count):
            if index == count // 2 and fault:
                with self._lock:
                    self.ledger.faults[fault.value] += 1
                if fault == Fault.TRUNCATED_STREAM:
                    self._refund_prompt(key, topic)
                    raise _Cut
                await asyncio.sleep(self.config.real(self.config.faults.stall_seconds))
            yield text[cuts[index] : cuts[index + 1]]
            await asyncio.sleep(pause)
        with self._lock:
            self.ledger.prompts["completed"] += 1

    def _refund_prompt(self, key: str, topic: str) -> None:
        with self._lock:
            self.balances[key] += PROMPT_COST
            self.ledger.refunded[key] += PROMPT_COST
            self.ledger.prompts["failed"] += 1
            self.ledger.prompt_charges[topic] -= PROMPT_COST

    def _submit(
        self, key: str, body: dict[str, Any], fault: Fault | None, rng: random.Random
    ) -> Reply:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return _error(400, "PROMPT_REQUIRED", "Prompt is required")
        if "mode" not in body:
            return _error(400, "INVALID_INPUT", "mode is required")
        invalid = (
            _invalid_choice(body, "mode", Mode, Mode.TEXT_TO_VIDEO)
            or _invalid_choice(body, "modelTier", ModelTier, ModelTier.SORA2)
            or _invalid_choice(body, "aspectRatio", AspectRatio, AspectRatio.PORTRAIT)
            or _invalid_duration(body.get("videoDuration", "10"), numeric=False)
            or _invalid_images(body)
        )
        if invalid:
            return invalid
        tier = ModelTier(body.get("modelTier", ModelTier.SORA2))
        duration = int(body.get("videoDuration", "10"))
        cost = video_cost(tier, duration)
        if self.balances[key] < cost:
            return _error(402, "INSUFFICIENT_CREDITS", "Insufficient credits")
        self.balances[key] -= cost
        self.ledger.charged[key] += cost
        low, high = self.config.generation_seconds
        generation = rng.uniform(low, high)
        now = time.monotonic()
        will_fail = fault == Fault.GENERATION_FAILED or (
            rng.random() < self.config.faults.generation_failed
        )
        # Seeded: the same id on a replay. Else unpredictable, like the real service's.
        seeded = self.config.seed is not None
        task_id = f"task_{rng.getrandbits(64):016x}" if seeded else f"task_{secrets.token_hex(8)}"
        task = VideoTask(
            task_id=task_id,
            key=key,
            tier=tier.value,
            duration=duration,
            aspect_ratio=AspectRatio(body.get("aspectRatio", AspectRatio.PORTRAIT)).value,
            cost=cost,
            submitted_at=now,
            generation_seconds=generation,
            ready_at=now + self.config.real(generation),
            will_fail=will_fail,
            prompt_head=prompt.strip()[:80],
        )
        self.ledger.tasks[task.task_id] = task
        return _json(
            200,
            {
                "success": True,
                "status": PROCESSING,
                "taskId": task.task_id,
                "message": "Video generation in progress",
            },
        )

    def _check_status(self, key: str, body: dict[str, Any], *, delivered: bool) -> Reply:
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id.strip():
            return _error(400, "TASK_ID_REQUIRED", "taskId is required")
        task = self.ledger.tasks.get(task_id)
        if task is None or task.key != key:
            return _error(404, "TASK_NOT_FOUND", "Task not found")
        now = time.monotonic()
        if delivered:  # an answer lost on the way back was not seen by the client
            task.status_checks += 1
            task.checked_at.append(now)
        self._settle(task, now)
        if task.final_status is None:
            progress = (now - task.submitted_at) / max(task.ready_at - task.submitted_at, 1e-9)
            statuses = self.config.running_statuses
            status = statuses[min(int(progress * len(statuses)), len(statuses) - 1)]
            return _json(200, {"success": True, "status": status, "taskId": task_id})
        if task.reported_at is None and delivered:
            task.reported_at = now
        if task.final_status == FAILED:
            return _error(
                self.config.failed_http_status,
                "GENERATION_FAILED",
                "Video generation failed",
                status=FAILED,
                taskId=task_id,
            )
        return _json(
            200,
            {
                "success": True,
                "status": COMPLETED,
                "videoUrl": f"{self.media_url}/sora/{task_id}.mp4",
                "taskId": task_id,
                "generationTime": round(task.generation_seconds),
                "creditsUsed": task.cost,
            },
        )

    def _settle(self, task: VideoTask, now: float) -> None:
        """Give a due video its final state, refunding a failed one once."""
        if task.final_status is not None or now < task.ready_at:
            return
        task.final_status = FAILED if task.will_fail else COMPLETED
        if task.will_fail:
            self.balances[task.key] += task.cost
            self.ledger.refunded[task.key] += task.cost

    def _control(self, request: _Request) -> Reply:
        """Read the ledger and switch faults from outside the process."""
        try:
            if request.path == "/_simulator/ledger":
                return _json(200, self.snapshot())
            body = json.loads(request.body or b"{}")
            if request.path == "/_simulator/faults" and request.method == "POST":
                self.set_faults(Faults.model_validate(body))
                return _json(200, self.config.faults.model_dump())
            if request.path == "/_simulator/queue" and request.method == "POST":
                self.queue_fault(str(body.get("endpoint")), *body.get("faults", []))
                return _json(200, {"queued": body.get("faults", [])})
            if request.path == "/_simulator/answer" and request.method == "POST":
                document = body.get("document", {})
                self.queue_answer(
                    str(body.get("endpoint")),
                    int(body.get("status", 200)),
                    document if isinstance(document, (dict, str)) else {},
                    {str(k): str(v) for k, v in dict(body.get("headers") or {}).items()},
                )
                return _json(200, {"queued": 1})
        except ValueError as error:
            return _json(400, {"error": str(error)})
        return _json(404, {"error": "unknown control path"})

    # --- the video host ----------------------------------------------------------------

    async def _handle_media(self, request: _Request) -> Reply:
        with self._lock:
            if "authorization" in request.headers:
                self.ledger.media_requests_with_authorization += 1
            name = request.path.rsplit("/", 1)[-1]
            task = self.ledger.tasks.get(name.removesuffix(".mp4"))
            now = time.monotonic()
            if task is not None:
                self._settle(task, now)
            expired = task is not None and now > task.ready_at + self.config.real(
                self.config.video_url_ttl_seconds
            )
            not_yet = task is not None and now < task.ready_at + self.config.real(
                self.config.video_url_delay_seconds
            )
            if (
                request.method != "GET"
                or task is None
                or task.final_status != COMPLETED
                or expired
                or not_yet
            ):
                return Reply(status=404, body=b"Not Found", content_type="text/plain")
            self.ledger.media_downloads += 1
            video = _with_task_id(self._videos[task.aspect_ratio], task.task_id)
        return Reply(body=video, content_type="video/mp4")


def _looks_like_a_browser(headers: dict[str, str]) -> bool:
    """What an edge that screens bots may ask: a browser's User-Agent, and an Origin."""
    return "Mozilla/" in headers.get("user-agent", "") and bool(headers.get("origin"))


def _challenge_page() -> Reply:
    page = (
        "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>"
        "<h1>Checking your browser before accessing nanophoto.ai</h1>"
        "<p>Enable JavaScript and cookies to continue.</p></body></html>"
    )
    return Reply(status=403, body=page.encode(), content_type="text/html; charset=UTF-8")


def _head(body: bytes, field: str) -> str:
    """The first 80 characters of a JSON body's text field: how the ledger names a job."""
    try:
        value = json.loads(body or b"{}").get(field)
    except (ValueError, AttributeError):
        return ""
    return value.strip()[:80] if isinstance(value, str) else ""


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _invalid_choice(body: dict[str, Any], name: str, choices: type, default: Any) -> Reply | None:
    value = body.get(name, default)
    if not isinstance(value, str) or value not in {c.value for c in choices}:  # type: ignore[attr-defined]
        return _error(400, "INVALID_INPUT", f"Invalid {name}: {value!r}")
    return None


def _invalid_duration(value: Any, *, numeric: bool) -> Reply | None:
    # The prompt endpoint takes a number, the video endpoint a string.
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value in DURATIONS
        if numeric
        else str(value) in {str(d) for d in DURATIONS}
    )
    return None if ok else _error(400, "INVALID_INPUT", f"Invalid duration: {value!r}")


def _invalid_images(body: dict[str, Any]) -> Reply | None:
    urls = body.get("imageUrls") or []
    if body.get("mode") == Mode.IMAGE_TO_VIDEO and not urls:
        return _error(400, "IMAGE_REQUIRED", "Image is required for image-to-video")
    if not isinstance(urls, list) or len(urls) > MAX_IMAGE_URLS:
        return _error(400, "INVALID_INPUT", f"At most {MAX_IMAGE_URLS} image URLs")
    if not all(isinstance(u, str) and u.lower().startswith(("http://", "https://")) for u in urls):
        return _error(400, "IMAGE_URLS_REQUIRED", "Images must be public http(s) URLs")
    return None


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ValueError("malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)  # ValueError: malformed
    if length < 0:
        raise ValueError("negative Content-Length")
    body = await reader.readexactly(length) if length else b""
    return _Request(method.upper(), target.split("?", 1)[0], headers, body)


def _reason(status: int) -> str:
    return {
        200: "OK",
        400: "Bad Request",
        401: "Unauthorized",
        402: "Payment Required",
        403: "Forbidden",
        404: "Not Found",
        429: "Too Many Requests",
        500: "Internal Server Error",
    }.get(status, _GATEWAY_PAGES.get(status, "Error"))


class SimulatorThread:
    """Runs a ``Simulator`` on its own event loop in a background thread.

    Example:
        ```python
        with SimulatorThread(SimulatorConfig(time_scale=0.01)) as sim:
            print(sim.base_url, sim.snapshot()["submits"])
        ```
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        media_port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.simulator = Simulator(config)
        self._address = (host, port, media_port, tls)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="nanophoto-simulator", daemon=True)
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        """The API's base URL, for ``NANOPHOTO_BASE_URL``."""
        return self.simulator.base_url

    def snapshot(self) -> dict[str, Any]:
        """The ledger (see ``Simulator.snapshot``)."""
        return self.simulator.snapshot()

    def __enter__(self) -> Simulator:
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._failure is not None:
            raise RuntimeError(f"the simulator did not start: {self._failure!r}")
        return self.simulator

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            try:
                await self.simulator.start(*self._address)
            except BaseException as error:  # reported to the starting thread
                self._failure = error
                raise
            finally:
                self._ready.set()
            await self._stopping.wait()
            await self.simulator.stop()

        try:
            asyncio.run(main())
        except Exception:
            logging.getLogger("nanophoto_simulator").exception(
                "the simulator stopped with an error"
            )
