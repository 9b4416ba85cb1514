"""OpenAI-compatible HTTP API over the sampling engine (FastAPI), built to hold up under load.

Endpoints:
- POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events, one
  chunk per token), GET /v1/models: OpenAI's shapes (protocol.py parses, responses.py answers).
- POST /tokenize, POST /detokenize, GET /version, GET /health, GET /metrics (Prometheus text).
- Reward scoring when the app has a reward model (reward.py): POST /v1/reward, and NVIDIA's
  reward API shape through /v1/chat/completions with the reward model's name.

Holding up:
- `api_key`: every /v1 route and /tokenize, /detokenize need `Authorization: Bearer <key>`
  (401 otherwise); /health, /metrics and /version stay open for probes and scrapers.
- A bounded queue: at most `max_slots + max_queue` samples are accepted at once; beyond that a
  request gets 429 with Retry-After (and a request larger than that capacity, 400).
- `request_timeout`: a request not finished in time is cancelled (504; a stream gets an error
  event), freeing its slots.
- A client that disconnects (streaming or not) has its samples cancelled at once.
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
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nemojax
from nemojax.inference.engine import Engine
from nemojax.inference.requests import Completion
from nemojax.serve.metrics import Metrics
from nemojax.serve.protocol import APIError, Job, Parser, bad, parse_json_body
from nemojax.serve.responses import StreamState, TokenTexts, sse, whole_response
from nemojax.serve.worker import EngineWorker, Event, Failure, Progress, WorkerStopped

log = logging.getLogger("nemojax.serve")

OPEN_PATHS = ("/health", "/metrics", "/version")  # no API key needed


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class Server:
    """State shared by the handlers: engine worker, parser, limits, metrics, reward model."""

    def __init__(self, worker: EngineWorker | None, tokenizer: Any, model_name: str, bos: bool, *,
                 api_key: str | None = None, max_queue: int | None = None,
                 request_timeout: float | None = None, reward: Any = None, reward_name: str | None = None) -> None:
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
        self.reward, self.reward_name = reward, reward_name
        self.outstanding = 0  # samples accepted and not finished (event-loop thread only)
        self.draining = False
        self._done_times: list[float] = []  # completion times of recent requests (Retry-After)
        self.metrics = Metrics(self.queue_depth, self.running, self.engine_stats)

    # ----------------------------------------------------------------- state for metrics
    def running(self) -> float:
        return float(self.engine.running()) if self.engine is not None else 0.0

    def queue_depth(self) -> float:
        return float(max(0, self.outstanding - self.running()))

    def engine_stats(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        stats = dict(self.engine.stats)
        stats.update({k: v for k, v in self.engine.compile_stats().items() if k != "by_name"})
        return stats

    @property
    def capacity(self) -> int | None:
        if self.max_queue is None or self.engine is None:
            return None
        return self.engine.max_slots + self.max_queue

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: queued samples over the recent finish rate."""
        now = time.monotonic()
        recent = [t for t in self._done_times if now - t < 60]
        self._done_times = recent[-200:]
        if len(recent) < 2:
            return 1
        rate = len(recent) / max(now - recent[0], 1e-3)
        return int(min(60, max(1, math.ceil(self.queue_depth() / rate))))

    # ----------------------------------------------------------------- running a job
    async def events(self, job: Job, http: HTTPRequest | None = None, stream: bool = False,
                     ) -> AsyncIterator[Event]:
        """Submit the job's requests and yield their events until all samples finish.

        Raises APIError 429 when the queue is full, 504 after the request timeout; leaving early
        (client gone, timeout, error) cancels whatever is still queued or running.
        """
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error")
        if self.worker is None or not self.worker.alive:
            why = self.worker.why_unavailable() if self.worker is not None else "no generation model"
            raise APIError(503, why, type="server_error")
        cap = self.capacity
        if cap is not None:
            if job.samples > cap:
                raise bad("n", f"{job.samples} samples (prompts x n) exceed this server's capacity of {cap} "
                               f"(slots + queue); split the request")
            if self.outstanding + job.samples > cap:
                raise APIError(429, f"the server is at capacity ({self.outstanding} samples in flight, "
                                    f"{self.engine.max_slots} slots, queue of {self.max_queue}); retry later",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.retry_after())})
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(ev: Event) -> None:  # runs on the worker thread
            loop.call_soon_threadsafe(inbox.put_nowait, ev)

        remaining: dict[str, int] = {}
        self.outstanding += job.samples
        watcher = None
        try:
            for r in job.requests:
                self.worker.submit(r, deliver, stream=True)
                remaining[r.id] = r.params.n
                self.metrics.prompt_tokens.inc(len(r.prompt_ids))
            if http is not None and not stream:
                watcher = asyncio.create_task(_wait_for_disconnect(http, inbox))
            deadline = None if not self.request_timeout else loop.time() + self.request_timeout
            while remaining:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    ev = await asyncio.wait_for(inbox.get(), timeout)
                except asyncio.TimeoutError:
                    raise APIError(504, f"the request did not finish within the server's request timeout "
                                        f"({self.request_timeout:g} s) and was cancelled",
                                   type="timeout_error", code="request_timeout") from None
                if isinstance(ev, _ClientGone):
                    raise ev
                if isinstance(ev, Failure):
                    remaining.pop(ev.request_id, None)
                elif isinstance(ev, Completion):
                    remaining[ev.request_id] -= 1
                    if remaining[ev.request_id] == 0:
                        del remaining[ev.request_id]
                    self.metrics.completion_tokens.inc(ev.completion_tokens)
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
            self.outstanding -= job.samples
            self._done_times.append(time.monotonic())


async def _wait_for_disconnect(http: HTTPRequest, inbox: asyncio.Queue[Any]) -> None:
    """Put a _ClientGone into `inbox` when the client disconnects (the body is already read,
    so the next ASGI message can only be the disconnect)."""
    while True:
        message = await http.receive()
        if message.get("type") == "http.disconnect":
            inbox.put_nowait(_ClientGone())
            return


def _failure_error(ev: Failure, job: Job) -> APIError:
    if ev.client_error:
        return APIError(400, ev.message, param="messages" if job.kind == "chat" else "prompt")
    return APIError(503 if "shutting down" in ev.message else 500, ev.message, type="server_error")


async def _respond(server: Server, job: Job, http: HTTPRequest, started: float, endpoint: str) -> dict[str, Any]:
    completions: list[Completion] = []
    first = True
    async with contextlib.aclosing(server.events(job, http)) as events:
        async for ev in events:
            if first and isinstance(ev, (Progress, Completion)):
                server.metrics.ttft.labels(endpoint).observe(time.monotonic() - started)
                first = False
            if isinstance(ev, Failure):
                raise _failure_error(ev, job)
            if isinstance(ev, Completion):
                completions.append(ev)
    return whole_response(job, completions, server.texts, server.model_name)


async def _stream(server: Server, job: Job, started: float, endpoint: str) -> AsyncIterator[bytes]:
    state = StreamState(job, server.texts, server.model_name)
    for chunk in state.opening():
        yield chunk
    first = True
    try:
        async with contextlib.aclosing(server.events(job, stream=True)) as events:
            async for ev in events:
                if first and isinstance(ev, (Progress, Completion)):
                    server.metrics.ttft.labels(endpoint).observe(time.monotonic() - started)
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


class _Guard:
    """ASGI middleware: API key check, request counts by status, latency histograms.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streams and hide
    client disconnects from the handlers.
    """

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path.startswith(("/v1/", "/tokenize", "/detokenize", *OPEN_PATHS)) else "other"
        started = time.monotonic()
        scope.setdefault("state", {})["started"] = started
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            await send(message)

        try:
            key = self.server.api_key
            if key and not path.startswith(OPEN_PATHS):
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"
                                   if given or auth else "missing API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                    await JSONResponse(err.body(), status_code=401,
                                       headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_wrapper)
                    return
            await self.app(scope, receive, send_wrapper)
        finally:
            self.server.metrics.requests.labels(endpoint, str(status["code"])).inc()


def create_app(engine: Engine | EngineWorker | None, tokenizer: Any, *, model_name: str = "nemojax",
               bos: bool = True, api_key: str | None = None, max_queue: int | None = None,
               request_timeout: float | None = None, reward: Any = None, reward_model_name: str | None = None,
               ) -> FastAPI:
    """The FastAPI app serving `engine` (or an already built `EngineWorker` over one).

    The worker thread starts with the app (its lifespan) and stops with it; use the app in a
    `with TestClient(app)` block, or run it with uvicorn (`nemojax serve`).
    `tokenizer` needs encode(text), decode(ids), bos_id and special_id("<extra_id_1>").
    engine None: a reward-only server (`reward` must be given). reward: a
    `nemojax.inference.reward.RewardScorer` (or anything with `attributes` and `score`).
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
                    request_timeout=request_timeout, reward=reward, reward_name=reward_name if reward else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await asyncio.to_thread(worker.stop)

    app = FastAPI(title="nemojax", summary="OpenAI-compatible API over the nemojax sampling engine",
                  lifespan=lifespan, version=nemojax.__version__)
    app.state.server = server
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(_ClientGone)
    async def client_gone(_: HTTPRequest, e: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the samples are already cancelled

    @app.exception_handler(Exception)
    async def internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError(500, f"internal server error ({type(e).__name__}); see the server log", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def json_body(request: HTTPRequest) -> dict[str, Any]:
        return parse_json_body(await request.body())

    def parser() -> Parser:
        if server.parser is None:
            raise APIError(404, f"this server serves only the reward model {server.reward_name!r} "
                                f"(POST /v1/reward, or chat completions with that model)",
                           param="model", code="model_not_found")
        return server.parser

    async def answer(job: Job, request: HTTPRequest, endpoint: str) -> Any:
        started = request.scope.get("state", {}).get("started", time.monotonic())
        if job.stream:
            if job.echo and job.logprobs:
                raise bad("echo", "echo with logprobs is not supported with stream: true; use stream: false")
            if server.draining or worker is None or not worker.alive:
                raise APIError(503, "the server is shutting down" if server.draining
                               else worker.why_unavailable(), type="server_error")
            cap = server.capacity
            if cap is not None and server.outstanding + job.samples > cap:  # answer 429 before streaming
                if job.samples > cap:
                    raise bad("n", f"{job.samples} samples exceed this server's capacity of {cap}")
                raise APIError(429, "the server is at capacity; retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(server.retry_after())})
            return StreamingResponse(_stream(server, job, started, endpoint), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _respond(server, job, request, started, endpoint))

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
        return await answer(parser().completion(await json_body(request)), request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        body = await json_body(request)
        if reward is not None and (body.get("model") == server.reward_name or worker is None):
            from nemojax.serve.reward import chat_reward

            return JSONResponse(await chat_reward(server, body))
        return await answer(parser().chat(body), request, "/v1/chat/completions")

    @app.post("/v1/reward")
    async def reward_scores(request: HTTPRequest) -> Any:
        if reward is None:
            raise APIError(404, "this server has no reward model (start it with --reward-checkpoint)",
                           code="model_not_found")
        from nemojax.serve.reward import native_reward

        return JSONResponse(await native_reward(server, await json_body(request)))

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest) -> dict[str, Any]:
        from nemojax.data.chat import prompt_ids

        body = await json_body(request)
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
            ids = prompt_ids(server.tokenizer, body["prompt"], bos=special)
        else:
            saved, p.bos = p.bos, special
            try:
                ids = p.chat_prompt(body["messages"]) if body["messages"] else []
            finally:
                p.bos = saved
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_len}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest) -> dict[str, Any]:
        body = await json_body(request)
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

    app.add_middleware(_Guard, server=server)
    return app
