"""OpenAI-compatible HTTP API over the sampling engine (FastAPI).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events). Requests and responses follow OpenAI's shapes, so
the `openai` client, curl scripts and the SDG pipeline's HTTP client work unchanged.

Why bodies are parsed by hand instead of with pydantic models: every bad request must come back
as a 400 in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) naming the
offending field, including for fields we do not support (an unknown or unsupported argument is
rejected rather than silently ignored, so a typo like `max_token` cannot go unnoticed).

Semantics worth knowing:
- Text prompts and chat prompts get bos prepended (like `nemojax generate`) unless the app is
  built with `bos=False`. Chat messages are rendered with the Nemotron-4 template and
  generation stops at `<extra_id_1>`; the newline the template puts before it is not returned.
- Extensions: `top_k` (0 or -1 = off) and `min_p` (0 = off).
- `max_tokens` is clamped to the room left in the context (finish_reason "length"); a prompt
  that leaves no room at all is a 400. Chat's default is "until the context is full";
  completions' default is 16, as in OpenAI's API.
- Log-probs are those of the model's own distribution for the chosen tokens; alternatives are
  not computed (completions: `top_logprobs` is null; chat: each token's `top_logprobs` is []).
- Usage counts each prompt once (n samples of a prompt share it) and every generated token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemojax.data.chat_template import TURN_TOKEN, ChatFormatError, format_chat
from nemojax.inference.engine import Engine
from nemojax.inference.requests import Completion, Request
from nemojax.inference.sampling import SamplingError, SamplingParams
from nemojax.serve.worker import EngineWorker, Event, Failure, Progress, WorkerStopped

log = logging.getLogger("nemojax.serve")

# Accepted but without effect (bookkeeping fields of OpenAI clients).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
COMMON_FIELDS = {"model", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "stream",
                 "stream_options", "max_tokens", "presence_penalty", "frequency_penalty",
                 "logit_bias", "logprobs", *IGNORED_FIELDS}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                               "tools", "tool_choice", "functions", "function_call"}
MAX_N = 64
MAX_SAMPLES = 256  # prompts x n per HTTP request: one request must not monopolise the engine
MAX_STOPS = 16


class APIError(Exception):
    """An error returned to the client as OpenAI's error body; `param` names the bad field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# --------------------------------------------------------------------------- parsing


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _opt(body: dict[str, Any], name: str, default: Any) -> Any:
    """body[name], with JSON null meaning "use the default" (as OpenAI treats it)."""
    value = body.get(name)
    return default if value is None else value


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise _bad(name, "unrecognized request argument (not supported by this server)")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _opt(body, name, 0)
        if not _is_num(v) or v != 0:
            raise _bad(name, "only 0 is supported")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "not supported")


def _sampling(body: dict[str, Any], max_tokens_default: int, max_tokens_field: str = "max_tokens",
              ) -> SamplingParams:
    """The sampling fields shared by both endpoints, validated; errors name the field."""
    raw: dict[str, Any] = {}
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0)):
        v = _opt(body, name, default)
        if not _is_num(v):
            raise _bad(name, f"must be a number, got {v!r}")
        raw[name] = v
    top_k = _opt(body, "top_k", 0)
    if not _is_int(top_k) or top_k < -1:
        raise _bad("top_k", f"must be an integer >= 0 (0 or -1 = off), got {top_k!r}")
    raw["top_k"] = max(top_k, 0)
    max_tokens = _opt(body, max_tokens_field, max_tokens_default)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(max_tokens_field, f"must be an integer >= 1, got {max_tokens!r}")
    raw["max_tokens"] = max_tokens
    n = _opt(body, "n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad("n", f"must be an integer in [1, {MAX_N}], got {n!r}")
    raw["n"] = n
    stop = _opt(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "must be a string or a list of strings")
    stop = [s for s in stop if s]  # OpenAI ignores empty stop strings
    if len(stop) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings")
    raw["stop"] = stop
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise _bad("seed", f"must be an integer in [0, 2**32) or null, got {seed!r}")
    raw["seed"] = seed
    try:
        return SamplingParams.from_dict(raw)
    except SamplingError as e:  # messages start with "name=value: ..."
        name = str(e).split("=", 1)[0]
        raise APIError(400, str(e), param=name) from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _opt(body, "stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    opts = _opt(body, "stream_options", {})
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise _bad("stream_options", "only {\"include_usage\": bool} is supported")
    if opts and not stream:
        raise _bad("stream_options", "only allowed with stream: true")
    return stream, bool(opts.get("include_usage", False))


@dataclass
class _Job:
    """One parsed HTTP request: the engine requests it becomes and how to answer."""

    id: str  # the response id; engine request ids are derived from it
    kind: str  # "completion" | "chat"
    requests: list[Request]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))


# --------------------------------------------------------------------------- the app


class _Server:
    """State shared by the handlers: tokenizer, engine worker, limits, names."""

    def __init__(self, worker: EngineWorker, tokenizer: Any, model_name: str, bos: bool) -> None:
        self.worker = worker
        self.engine: Engine = worker.engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.bos = bos
        self.created = int(time.time())
        self.max_len = self.engine.max_len
        self.vocab_size = self.engine.cfg.vocab_size
        self.turn_id: int | None = None
        try:
            self.turn_id = int(tokenizer.special_id(TURN_TOKEN))
        except Exception:  # a tokenizer without the chat symbols: stop on the string instead
            self.turn_id = None

    # ----------------------------------------------------------------- parsing
    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _check_prompt_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise _bad(param, "the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(param, f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_len:
            raise _bad(param, f"the prompt has {len(ids)} tokens but this server's context is "
                              f"{self.max_len} tokens (prompt + completion), so at most "
                              f"{self.max_len - 1} prompt tokens fit")
        return ids

    def _logprobs_flag(self, body: dict[str, Any], chat: bool) -> bool:
        v = body.get("logprobs")
        if v is None:
            return False
        if chat:
            if not isinstance(v, bool):
                raise _bad("logprobs", "must be true or false")
            top = _opt(body, "top_logprobs", 0)
            if not _is_int(top) or not 0 <= top <= 20:
                raise _bad("top_logprobs", "must be an integer in [0, 20]")
            return v
        if isinstance(v, bool) or not _is_int(v) or not 0 <= v <= 5:
            raise _bad("logprobs", "must be an integer in [0, 5] or null")
        return True

    def parse_completion(self, body: dict[str, Any]) -> _Job:
        _check_fields(body, COMPLETION_FIELDS)
        self._check_model(body)
        if _opt(body, "echo", False) is not False:
            raise _bad("echo", "not supported")
        if body.get("suffix") is not None:
            raise _bad("suffix", "not supported")
        if "prompt" not in body or body["prompt"] is None:
            raise _bad("prompt", "required")
        params = _sampling(body, 16)
        best_of = body.get("best_of")
        if best_of is not None and best_of != params.n:
            raise _bad("best_of", "only null or equal to n is supported")
        params.logprobs = self._logprobs_flag(body, chat=False)
        stream, include_usage = _stream_flags(body)
        prompts = self._prompts(body["prompt"])
        if len(prompts) * params.n > MAX_SAMPLES:
            raise _bad("prompt", f"{len(prompts)} prompts x n={params.n} samples exceeds the limit of "
                                 f"{MAX_SAMPLES} samples per request; split the request")
        base = f"cmpl-{uuid.uuid4().hex}"
        reqs = [Request(f"{base}-{i}", ids, params) for i, ids in enumerate(prompts)]
        return _Job(base, "completion", reqs, params, stream, include_usage, params.logprobs)

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
        def text(s: str) -> list[int]:
            return self.tokenizer.encode(s, bos=self.bos)

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(_is_int(t) for t in x)

        if isinstance(prompt, str):
            return [self._check_prompt_ids(text(prompt), "prompt")]
        if is_ids(prompt):
            return [self._check_prompt_ids(list(prompt), "prompt")]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [self._check_prompt_ids(text(p), "prompt") for p in prompt]
            if all(is_ids(p) for p in prompt):
                return [self._check_prompt_ids(list(p), "prompt") for p in prompt]
        raise _bad("prompt", "must be a string, a non-empty list of strings, a non-empty list of token "
                             "ids, or a list of such lists")

    def parse_chat(self, body: dict[str, Any]) -> _Job:
        _check_fields(body, CHAT_FIELDS)
        self._check_model(body)
        for name in ("tools", "functions"):
            if body.get(name):
                raise _bad(name, "tool / function calling is not supported")
        for name in ("tool_choice", "function_call"):
            if body.get(name) not in (None, "none"):
                raise _bad(name, "tool / function calling is not supported")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise _bad("response_format", "only {\"type\": \"text\"} is supported")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise _bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = _sampling(body, self.max_len, field_name)
        params.logprobs = self._logprobs_flag(body, chat=True)
        stream, include_usage = _stream_flags(body)
        messages = self._messages(body.get("messages"))
        try:
            text = format_chat(messages, add_generation_prompt=True)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = self._check_prompt_ids(self.tokenizer.encode(text, bos=self.bos), "messages")
        if self.turn_id is not None:
            params.stop_token_ids.append(self.turn_id)
        else:
            params.stop.append(TURN_TOKEN)
        req = Request(f"chatcmpl-{uuid.uuid4().hex}", ids, params)
        return _Job(req.id, "chat", [req], params, stream, include_usage, params.logprobs)

    @staticmethod
    def _messages(messages: Any) -> list[dict[str, str]]:
        if messages is None:
            raise _bad("messages", "required")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise APIError(400, f"{where}: must be an object with role and content", param="messages")
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str):
                raise APIError(400, f"{where}: needs a string 'role'", param="messages")
            if role == "developer":  # OpenAI's newer name for the system message
                role = "system"
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise APIError(400, f"{where}.content: only text parts are supported",
                                       param="messages")
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise APIError(400, f"{where}: needs a string 'content'", param="messages")
            out.append({"role": role, "content": content})
        return out

    # ----------------------------------------------------------------- running
    async def events(self, job: _Job) -> AsyncIterator[Event]:
        """Submit the job's requests to the worker and yield their events until all finish.

        Leaving early (client disconnect, error) cancels what is still running.
        """
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(ev: Event) -> None:  # runs on the worker thread
            loop.call_soon_threadsafe(inbox.put_nowait, ev)

        remaining: dict[str, int] = {}
        try:
            for r in job.requests:
                self.worker.submit(r, deliver, stream=job.stream)
                remaining[r.id] = r.params.n
        except WorkerStopped as e:
            for rid in remaining:
                self.worker.cancel(rid)
            raise APIError(503, str(e), type="server_error") from None
        try:
            while remaining:
                ev = await inbox.get()
                if isinstance(ev, Failure):
                    remaining.pop(ev.request_id, None)
                elif isinstance(ev, Completion):
                    remaining[ev.request_id] -= 1
                    if remaining[ev.request_id] == 0:
                        del remaining[ev.request_id]
                yield ev
                if isinstance(ev, Failure):
                    return
        finally:
            for rid in remaining:
                self.worker.cancel(rid)

    def token_texts(self, ids: list[int], context: int = 8) -> list[str]:
        """Each token's share of the decoded text.

        SentencePiece drops a piece's leading space at the start of a decode and joins byte
        pieces into characters, so a token's text is decode(window + token) minus
        decode(window), over a few preceding tokens (linear time, unlike whole prefixes).
        """
        out = []
        for i in range(len(ids)):
            start = max(0, i - context)
            prev = self.tokenizer.decode(ids[start:i]) if i > start else ""
            cur = self.tokenizer.decode(ids[start:i + 1])
            out.append(cur[len(prev):] if cur.startswith(prev) else cur)
        return out

    def final_text(self, job: _Job, c: Completion) -> str:
        text = c.text or ""
        if job.kind == "chat" and c.finish_reason == "stop":
            text = text.removesuffix("\n")  # the template's newline before <extra_id_1>
        return text

    def logprobs_body(self, job: _Job, c: Completion) -> Any:
        """OpenAI's logprobs object for one choice (None unless the request asked for it)."""
        if not job.logprobs:
            return None
        lps = c.logprobs or []
        texts = self.token_texts(c.output_ids)
        if job.kind == "chat":
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                                 "top_logprobs": []} for t, lp in zip(texts, lps)]}
        offsets, pos = [], 0
        for t in texts:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": texts, "token_logprobs": list(lps), "top_logprobs": None,
                "text_offset": offsets}


def _choice_index(job: _Job, c: Completion | Progress) -> int:
    prompt_index = next(i for i, r in enumerate(job.requests) if r.id == c.request_id)
    return prompt_index * job.params.n + c.sample_index


def _usage(job: _Job, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(r.prompt_ids) for r in job.requests)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _failure_error(ev: Failure, job: _Job) -> APIError:
    if ev.client_error:
        return APIError(400, ev.message, param="messages" if job.kind == "chat" else "prompt")
    return APIError(503 if "shutting down" in ev.message else 500, ev.message, type="server_error")


async def _respond(server: _Server, job: _Job) -> dict[str, Any]:
    completions: list[Completion] = []
    async with contextlib.aclosing(server.events(job)) as events:
        async for ev in events:
            if isinstance(ev, Failure):
                raise _failure_error(ev, job)
            if isinstance(ev, Completion):
                completions.append(ev)
    completions.sort(key=lambda c: _choice_index(job, c))
    choices = []
    for c in completions:
        text = server.final_text(job, c)
        choice: dict[str, Any] = {"index": _choice_index(job, c)}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = server.logprobs_body(job, c)
        choice["finish_reason"] = c.finish_reason
        choices.append(choice)
    return {"id": job.id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": server.model_name, "choices": choices,
            "usage": _usage(job, sum(c.completion_tokens for c in completions))}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


def _holdback(text: str, stops: list[str], chat: bool) -> str:
    """The prefix of a partial output that is safe to send: it cannot change later.

    Held back: the last len(longest stop) - 1 characters (they may begin a stop string),
    an unfinished multi-byte character (decoded as U+FFFD), and for chat a trailing newline
    (the template's, if <extra_id_1> follows).
    """
    hold = max((len(s) for s in stops), default=1) - 1
    safe = text[: len(text) - hold] if hold else text
    safe = safe.rstrip("\ufffd")
    if chat and safe.endswith("\n"):
        safe = safe[:-1]
    return safe


async def _stream(server: _Server, job: _Job) -> AsyncIterator[bytes]:
    chat = job.kind == "chat"
    rid = job.id
    obj = "chat.completion.chunk" if chat else "text_completion"
    stops = list(job.params.stop)
    sent: dict[int, str] = {}
    completion_tokens = 0

    def chunk(index: int, text: str, finish: str | None, logprobs: Any) -> bytes:
        if chat:
            delta = {"content": text} if text or finish is None else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        body: dict[str, Any] = {"id": rid, "object": obj, "created": job.created,
                                "model": server.model_name, "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return _sse(body)

    if chat:
        for i in range(len(job.requests) * job.params.n):
            first = {"id": rid, "object": obj, "created": job.created, "model": server.model_name,
                     "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]}
            if job.include_usage:
                first["usage"] = None
            yield _sse(first)
    try:
        async with contextlib.aclosing(server.events(job)) as events:
            async for ev in events:
                if isinstance(ev, Failure):
                    yield _sse(_failure_error(ev, job).body())
                    return
                index = _choice_index(job, ev)
                prev = sent.get(index, "")
                if isinstance(ev, Progress):
                    text = _holdback(server.tokenizer.decode(ev.output_ids), stops, chat)
                    if len(text) > len(prev) and text.startswith(prev):
                        sent[index] = text
                        yield chunk(index, text[len(prev):], None, None)
                    continue
                # The completion: the rest of the text, the finish reason, and (since the
                # engine reports them only at the end) all the token log-probs.
                final = server.final_text(job, ev)
                delta = final[len(prev):] if final.startswith(prev) else ""
                completion_tokens += ev.completion_tokens
                yield chunk(index, delta, ev.finish_reason, server.logprobs_body(job, ev))
        if job.include_usage:
            yield _sse({"id": rid, "object": obj, "created": job.created, "model": server.model_name,
                        "choices": [], "usage": _usage(job, completion_tokens)})
        yield b"data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body())


def create_app(engine: Engine | EngineWorker, tokenizer: Any, *, model_name: str = "nemojax",
               bos: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` (or an already built `EngineWorker` over one).

    The worker thread starts with the app (its lifespan) and stops with it; use the app in a
    `with TestClient(app)` block, or run it with uvicorn (`nemojax serve`).
    `tokenizer` needs encode(text, bos=...) and decode(ids), and special_id("<extra_id_1>")
    to stop chat turns on the token (otherwise the string is used).
    """
    worker = engine if isinstance(engine, EngineWorker) else EngineWorker(engine)
    if worker.engine.tokenizer is None:
        worker.engine.tokenizer = tokenizer  # stop strings and `text` need it
    server = _Server(worker, tokenizer, model_name, bos)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="nemojax", summary="OpenAI-compatible API over the nemojax sampling engine",
                  lifespan=lifespan)
    app.state.server = server
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError(500, f"internal server error ({type(e).__name__}); see the server log",
                       type="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def json_body(request: HTTPRequest) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def answer(job: _Job) -> Any:
        if not worker.alive:
            raise APIError(503, worker.why_unavailable(), type="server_error")
        if job.stream:
            return StreamingResponse(_stream(server, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _respond(server, job))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_name,
                "active_requests": worker.stats["active_requests"], "steps": worker.stats["steps"]}
        if not ok:
            body["reason"] = worker.why_unavailable()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nemojax", "max_model_len": server.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await answer(server.parse_completion(await json_body(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await answer(server.parse_chat(await json_body(request)))

    return app
