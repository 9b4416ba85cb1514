"""OpenAI-compatible HTTP API over the sampling engine (FastAPI), built to hold up under load.

Endpoints:
- POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events, one
  chunk per token), GET /v1/models: OpenAI's shapes (protocol.py parses, responses.py answers).
- POST /tokenize, POST /detokenize, GET /version, GET /health, GET /metrics (Prometheus text).
- Reward scoring when the app has a reward model (reward.py): POST /v1/reward, and NVIDIA's
  reward API shape through /v1/chat/completions with the reward model's name.

Holding up:
- `api_key`: every route except /health, /metrics and /version (open for probes and
  scrapers) needs `Authorization: Bearer <key>` (401 otherwise), checked before the body is read.
- `max_body_bytes`: a larger body gets 413 at once: from its Content-Length before any of it is
  read, or, without one (chunked), as soon as the bytes read pass the limit.
- The event loop never does heavy work: big bodies are parsed, and every prompt tokenized, on
  worker threads, after the cheap limits (protocol.py) have been checked.
- One bounded queue for all work: at most `max_slots + max_queue` samples (generation) and
  conversations (reward scoring) are accepted at once; beyond that a request gets 429 with
  Retry-After (a request larger than that capacity, 400). A streaming request reserves its
  place before its 200 and headers are sent, so a burst never turns into errors inside streams.
- `request_timeout`: a request not finished in time is cancelled (504; a stream gets an error
  event), freeing its place. A client that disconnects (streaming or not) has its work
  cancelled at once.
- Every error is OpenAI's error shape with a 4xx/5xx status, never a traceback.
- `draining` (set on SIGTERM by `nemojax serve`): new requests get 503 while in-flight ones
  finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from typing import Any, AsyncIterator, Awaitable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import nemojax
from nemojax.inference.engine import Engine
from nemojax.inference.requests import Completion
from nemojax.serve.metrics import UNMATCHED, Metrics
from nemojax.serve.protocol import APIError, Job, Parser, bad, parse_json_body
from nemojax.serve.responses import StreamState, TokenTexts, sse, whole_response
from nemojax.serve.worker import EngineWorker, Event, Failure, Progress, WorkerStopped

log = logging.getLogger("nemojax.serve")

OPEN_PATHS = ("/health", "/metrics", "/version")  # no API key needed
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
INLINE_JSON_BYTES = 64 * 2**10  # smaller bodies are parsed on the event loop (a thread hop costs more)


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class BodyTooLarge(Exception):
    """The request body passed the server's limit while it was being read."""


class Ticket:
    """A place in the server's queue for `size` samples or conversations; `release` gives it back
    (once, however often it is called)."""

    def __init__(self, server: "Server", size: int) -> None:
        self.server, self.size = server, size
        server.outstanding += size

    def release(self) -> None:
        if self.size:
            self.server.outstanding -= self.size
            self.server._done_times.append(time.monotonic())
            self.size = 0


class Server:
    """State shared by the handlers: engine worker, parser, limits, metrics, reward model."""

    def __init__(self, worker: EngineWorker | None, tokenizer: Any, model_name: str, bos: bool, *,
                 api_key: str | None = None, max_queue: int | None = None,
                 request_timeout: float | None = None, reward: Any = None, reward_name: str | None = None,
                 max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES) -> None:
        from nemojax.serve.reward import ScoringQueue

        self.worker = worker
        self.engine: Engine | None = worker.engine if worker is not None else None
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.max_len = self.engine.max_len if self.engine is not None else 0
        self.parser = Parser(tokenizer, model_name, self.max_len, self.engine.cfg.vocab_size, bos) \
            if self.engine is not None else None
        self.texts = TokenTexts(tokenizer)
        self.api_key = api_key or None
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.reward, self.reward_name = reward, reward_name
        self.scoring = ScoringQueue(reward) if reward is not None else None
        self.outstanding = 0  # samples / conversations accepted and not finished (event-loop thread only)
        self.draining = False
        self._done_times: list[float] = []  # completion times of recent requests (Retry-After)
        self.metrics = Metrics(model_name, self.live_state)

    # ----------------------------------------------------------------- state for metrics
    def running(self) -> float:
        return float(self.engine.running()) if self.engine is not None else 0.0

    def queue_depth(self) -> float:
        return float(max(0, self.outstanding - self.running()))

    def live_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"queue_depth": self.queue_depth(), "running": self.running()}
        if self.engine is not None:
            state.update(self.engine.stats)
            state.update({k: v for k, v in self.engine.compile_stats().items() if k != "by_name"})
            usage = self.engine.kv_cache_usage()
            state["kv_reserved"], state["kv_filled"] = usage["reserved"], usage["filled"]
        return state

    # ----------------------------------------------------------------- admission
    @property
    def capacity(self) -> int | None:
        """Samples (and conversations) accepted at once: the slots (or a reward batch) + the queue."""
        if self.max_queue is None:
            return None
        if self.engine is not None:
            return self.engine.max_slots + self.max_queue
        return getattr(self.reward, "batch_size", 1) + self.max_queue

    def retry_after(self) -> int:
        """Seconds until a place is likely free: queued work over the recent finish rate."""
        now = time.monotonic()
        recent = [t for t in self._done_times if now - t < 60]
        self._done_times = recent[-200:]
        if len(recent) < 2:
            return 1
        rate = len(recent) / max(now - recent[0], 1e-3)
        return int(min(60, max(1, math.ceil(self.queue_depth() / rate))))

    def _full(self) -> APIError:
        return APIError(429, f"the server is at capacity ({self.outstanding} samples in flight, capacity "
                             f"{self.capacity}: slots + queue of {self.max_queue}); retry later",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after())})

    def refuse_early(self) -> None:
        """503 when draining, 429 when not even one more sample fits: before a body is parsed."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error")
        cap = self.capacity
        if cap is not None and self.outstanding >= cap:
            raise self._full()

    def admit(self, size: int, what: str = "samples (prompts x n)") -> Ticket:
        """Reserve `size` places in the queue, or raise 503 (draining), 400 (larger than the
        capacity: could never run) or 429 (full now). Synchronous: no await between the check
        and the reservation, so concurrent requests cannot overbook."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error")
        cap = self.capacity
        if cap is not None:
            if size > cap:
                raise bad("n" if what.startswith("samples") else "conversations",
                          f"{size} {what} exceed this server's capacity of {cap} (slots + queue); split the request")
            if self.outstanding + size > cap:
                raise self._full()
        return Ticket(self, size)

    def admit_generation(self, job: Job) -> Ticket:
        """`admit` for a generation job, and 503 when the engine cannot run it."""
        if not self.draining and (self.worker is None or not self.worker.alive):
            why = self.worker.why_unavailable() if self.worker is not None else "no generation model"
            raise APIError(503, why, type="server_error")
        return self.admit(job.samples)

    # ----------------------------------------------------------------- running a job
    def deadline(self) -> float | None:
        return None if not self.request_timeout else asyncio.get_running_loop().time() + self.request_timeout

    def timeout_error(self) -> APIError:
        return APIError(504, f"the request did not finish within the server's request timeout "
                             f"({self.request_timeout:g} s) and was cancelled",
                        type="timeout_error", code="request_timeout")

    async def events(self, job: Job, ticket: Ticket, http: HTTPRequest | None = None, stream: bool = False,
                     ) -> AsyncIterator[Event]:
        """Submit the job's requests (its places already reserved by `ticket`) and yield their
        events until all samples finish.

        Raises APIError 504 after the request timeout; leaving early (client gone, timeout,
        error) cancels whatever is still queued or running. The ticket is released at the end.
        """
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(ev: Event) -> None:  # runs on the worker thread
            loop.call_soon_threadsafe(inbox.put_nowait, ev)

        remaining: dict[str, int] = {}
        watcher = None
        try:
            for r in job.requests:
                self.worker.submit(r, deliver, stream=True)
                remaining[r.id] = r.params.n
                self.metrics.prompt_tokens.labels(self.model_name).inc(len(r.prompt_ids))
            if http is not None and not stream:
                watcher = asyncio.create_task(_wait_for_disconnect(http, inbox))
            deadline = self.deadline()
            while remaining:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    ev = await asyncio.wait_for(inbox.get(), timeout)
                except asyncio.TimeoutError:
                    raise self.timeout_error() from None
                if isinstance(ev, _ClientGone):
                    raise ev
                if isinstance(ev, Failure):
                    remaining.pop(ev.request_id, None)
                elif isinstance(ev, Completion):
                    remaining[ev.request_id] -= 1
                    if remaining[ev.request_id] == 0:
                        del remaining[ev.request_id]
                    self.metrics.sample_done(ev)
                yield ev
                if isinstance(ev, Failure):
                    return
        except WorkerStopped as e:
            raise APIError(503, str(e), type="server_error") from None
        finally:
            if watcher is not None:
                watcher.cancel()
            for rid in remaining:
                self.worker.cancel(rid)
            self.metrics.samples_aborted(sum(remaining.values()))
            ticket.release()

    async def until_done(self, work: Awaitable[Any], http: HTTPRequest | None) -> Any:
        """`work`'s result, or 504 at the request timeout, or _ClientGone when the client leaves
        first (the caller cancels the work). For requests whose body is already read."""
        task = asyncio.ensure_future(work)
        watch = [asyncio.create_task(_disconnected(http))] if http is not None else []
        deadline = self.deadline()
        try:
            timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
            done, _ = await asyncio.wait([task, *watch], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if not done:
                raise self.timeout_error()
            raise _ClientGone()
        finally:
            for t in (task, *watch):
                t.cancel()


async def _disconnected(http: HTTPRequest) -> None:
    """Return once the client has disconnected (the body is already read, so the next ASGI
    message can only be the disconnect)."""
    while (await http.receive()).get("type") != "http.disconnect":
        pass


async def _wait_for_disconnect(http: HTTPRequest, inbox: asyncio.Queue[Any]) -> None:
    """Put a _ClientGone into `inbox` when the client disconnects."""
    await _disconnected(http)
    inbox.put_nowait(_ClientGone())


def _failure_error(ev: Failure, job: Job) -> APIError:
    if ev.client_error:
        return APIError(400, ev.message, param="messages" if job.kind == "chat" else "prompt")
    return APIError(503 if "shutting down" in ev.message else 500, ev.message, type="server_error")


async def _respond(server: Server, job: Job, ticket: Ticket, http: HTTPRequest, started: float,
                   endpoint: str) -> dict[str, Any]:
    completions: list[Completion] = []
    first = True
    async with contextlib.aclosing(server.events(job, ticket, http)) as events:
        async for ev in events:
            if first and isinstance(ev, (Progress, Completion)):
                server.metrics.ttft.labels(endpoint, server.model_name).observe(time.monotonic() - started)
                first = False
            if isinstance(ev, Failure):
                raise _failure_error(ev, job)
            if isinstance(ev, Completion):
                completions.append(ev)
    return whole_response(job, completions, server.texts, server.model_name)


async def _stream(server: Server, job: Job, ticket: Ticket, started: float, endpoint: str) -> AsyncIterator[bytes]:
    state = StreamState(job, server.texts, server.model_name)
    for chunk in state.opening():
        yield chunk
    first = True
    try:
        async with contextlib.aclosing(server.events(job, ticket, stream=True)) as events:
            async for ev in events:
                if first and isinstance(ev, (Progress, Completion)):
                    server.metrics.ttft.labels(endpoint, server.model_name).observe(time.monotonic() - started)
                    first = False
                if isinstance(ev, Failure):
                    yield sse(_failure_error(ev, job).body())
                    return
                if isinstance(ev, Progress):
                    for d in ev.deltas:
                        yield state.token(d)
                elif isinstance(ev, Completion):
                    yield state.finish(ev)
        for chunk in state.closing():
            yield chunk
    except APIError as e:
        yield sse(e.body())


class _ReservedStream(StreamingResponse):
    """A stream whose queue places were reserved before its headers: they are given back when
    the response ends, also when its body never started (the client left at once).

    It watches for the client's disconnect itself (whatever the ASGI server's spec version), so a
    stream whose client left while it waited in the queue, sending nothing, is cancelled at once."""

    def __init__(self, content: Any, ticket: Ticket, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.ticket = ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import anyio

        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.ticket.release()


def route_template(scope: dict) -> str:
    """The path template of the route `scope` goes to (also when only its method is wrong), or
    UNMATCHED: the endpoint label of the HTTP metrics, so arbitrary paths add no series."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


def _error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, **(headers or {})})


class _Guard:
    """ASGI middleware: API key check, body-size limit, request counts by status, latency.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streams and hide
    client disconnects from the handlers.
    """

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = route_template(scope)
        started = time.monotonic()
        scope.setdefault("state", {})["started"] = started
        scope["state"]["endpoint"] = endpoint
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            key = self.server.api_key
            if key and path not in OPEN_PATHS:
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"
                                   if given or auth else "missing API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                    await _error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send_wrapper)
                    return
            limit = self.server.max_body_bytes
            if limit is not None:
                length = headers.get(b"content-length", b"")
                if length.isdigit() and int(length) > limit:  # refused before a byte of it is read
                    await _error_response(_too_large(int(length), limit), {"Connection": "close"})(
                        scope, receive, send_wrapper)
                    return
                receive = _limited(receive, limit)
            await self.app(scope, receive, send_wrapper)
        finally:
            self.server.metrics.requests.labels(endpoint, str(status["code"])).inc()


def _too_large(size: int | None, limit: int) -> APIError:
    what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return APIError(413, f"the request body has {what}; this server accepts at most {limit} "
                         f"(--max-body-mb); split the request", code="request_too_large")


def _limited(receive: Any, limit: int) -> Any:
    """`receive` that raises BodyTooLarge once the body read so far passes `limit` bytes."""
    seen = 0

    async def receive_limited() -> dict:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


def create_app(engine: Engine | EngineWorker | None, tokenizer: Any, *, model_name: str = "nemojax",
               bos: bool = True, api_key: str | None = None, max_queue: int | None = None,
               request_timeout: float | None = None, reward: Any = None, reward_model_name: str | None = None,
               max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `engine` (or an already built `EngineWorker` over one).

    The worker thread starts with the app (its lifespan) and stops with it; use the app in a
    `with TestClient(app)` block, or run it with uvicorn (`nemojax serve`).
    `tokenizer` needs encode(text), decode(ids), bos_id and special_id("<extra_id_1>").
    engine None: a reward-only server (`reward` must be given). reward: a
    `nemojax.inference.reward.RewardScorer` (or anything with `attributes` and `score`).
    max_body_bytes: the largest request body accepted (None: no limit).
    """
    worker = None
    if engine is not None:
        worker = engine if isinstance(engine, EngineWorker) else EngineWorker(engine)
        if worker.engine.tokenizer is None:
            worker.engine.tokenizer = tokenizer  # stop strings and `text` need it
    elif reward is None:
        raise ValueError("create_app needs an engine, a reward model, or both")
    reward_name = reward_model_name or (f"{model_name}-reward" if engine is not None else model_name)
    server = Server(worker, tokenizer, model_name, bos, api_key=api_key, max_queue=max_queue,
                    request_timeout=request_timeout, reward=reward, reward_name=reward_name if reward else None,
                    max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await asyncio.to_thread(worker.stop)
            if server.scoring is not None:
                server.scoring.close()

    app = FastAPI(title="nemojax", summary="OpenAI-compatible API over the nemojax sampling engine",
                  lifespan=lifespan, version=nemojax.__version__)
    app.state.server = server
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: HTTPRequest, e: BodyTooLarge) -> JSONResponse:
        return _error_response(_too_large(None, e.args[0]), {"Connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(_ClientGone)
    async def client_gone(_: HTTPRequest, e: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the work is already cancelled

    @app.exception_handler(Exception)
    async def internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError(500, f"internal server error ({type(e).__name__}); see the server log", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def json_body(request: HTTPRequest) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) <= INLINE_JSON_BYTES:
            return parse_json_body(raw)
        return await asyncio.to_thread(parse_json_body, raw)

    def parser() -> Parser:
        if server.parser is None:
            raise APIError(404, f"this server serves only the reward model {server.reward_name!r} "
                                f"(POST /v1/reward, or chat completions with that model)",
                           param="model", code="model_not_found")
        return server.parser

    async def answer(job: Job, request: HTTPRequest) -> Any:
        state = request.scope.get("state", {})
        started, endpoint = state.get("started", time.monotonic()), state.get("endpoint", UNMATCHED)
        if job.stream and job.echo and job.logprobs:
            raise bad("echo", "echo with logprobs is not supported with stream: true; use stream: false")
        ticket = server.admit_generation(job)  # 503 / 400 / 429 here, before any header is sent
        if job.stream:
            return _ReservedStream(_stream(server, job, ticket, started, endpoint), ticket,
                                   media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await _respond(server, job, ticket, request, started, endpoint))
        finally:
            ticket.release()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = (worker is None or worker.alive) and not server.draining
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "model": model_name,
                                "active_requests": worker.stats["active_requests"] if worker else 0,
                                "steps": worker.stats["steps"] if worker else 0}
        if not ok:
            body["reason"] = "draining: the server is shutting down" if server.draining else worker.why_unavailable()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        import jax

        return {"version": nemojax.__version__, "jax": jax.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = []
        if worker is not None:
            data.append({"id": model_name, "object": "model", "created": server.created, "owned_by": "nemojax",
                         "max_model_len": server.max_len})
        if reward is not None:
            data.append({"id": server.reward_name, "object": "model", "created": server.created,
                         "owned_by": "nemojax", "attributes": list(reward.attributes)})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        server.refuse_early()
        body = await json_body(request)
        return await answer(await asyncio.to_thread(parser().completion, body), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        server.refuse_early()
        body = await json_body(request)
        if reward is not None and (body.get("model") == server.reward_name or worker is None):
            from nemojax.serve.reward import chat_reward

            return JSONResponse(await chat_reward(server, body, request))
        return await answer(await asyncio.to_thread(parser().chat, body), request)

    @app.post("/v1/reward")
    async def reward_scores(request: HTTPRequest) -> Any:
        if reward is None:
            raise APIError(404, "this server has no reward model (start it with --reward-checkpoint)",
                           code="model_not_found")
        from nemojax.serve.reward import native_reward

        server.refuse_early()
        return JSONResponse(await native_reward(server, await json_body(request), request))

    def tokenize_body(body: dict[str, Any]) -> dict[str, Any]:
        """/tokenize's answer (runs on a worker thread: it tokenizes)."""
        from nemojax.data.chat import prompt_ids

        p = parser()
        for name in body:
            if name not in ("model", "prompt", "messages", "add_special_tokens"):
                raise bad(name, "unrecognized request argument")
        p.check_model(body)
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise bad("add_special_tokens", "must be true or false")
        if ("prompt" in body) == ("messages" in body):
            raise bad("prompt", "give exactly one of prompt (text) or messages (a chat)")
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise bad("prompt", "must be a string")
            ids = prompt_ids(server.tokenizer, p.check_text(body["prompt"], "prompt"), bos=special)
        else:
            ids = p.chat_prompt(body["messages"], bos=special) if body["messages"] else []
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_len}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest) -> dict[str, Any]:
        return await asyncio.to_thread(tokenize_body, await json_body(request))

    def detokenize_body(body: dict[str, Any]) -> dict[str, Any]:
        p = parser()
        for name in body:
            if name not in ("model", "tokens"):
                raise bad(name, "unrecognized request argument")
        p.check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("tokens", "must be a list of token ids")
        outside = [t for t in tokens if not 0 <= t < p.vocab_size]
        if outside:
            raise bad("tokens", f"token ids {outside[:5]} outside the vocabulary [0, {p.vocab_size})")
        return {"prompt": server.tokenizer.decode(tokens)}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest) -> dict[str, Any]:
        return await asyncio.to_thread(detokenize_body, await json_body(request))

    app.add_middleware(_Guard, server=server)
    return app
