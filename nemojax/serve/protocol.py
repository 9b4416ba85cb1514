"""OpenAI request parsing and validation: JSON body -> engine requests, or an `APIError`.

Why bodies are parsed by hand instead of with pydantic models: every bad request must come back
as a 4xx in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) naming the
offending field, including for fields we do not support (an unknown or unsupported argument is
rejected rather than silently ignored, so a typo like `max_token` cannot go unnoticed), and
including numbers JSON should not carry (NaN, Infinity, or overflows like 1e999).

Semantics worth knowing:
- Text prompts get bos prepended (like `nemojax generate`) unless the app is built with
  `bos=False`. Chat messages are tokenized by `nemojax.data.chat.prompt_ids`, exactly as
  training tokenizes them: text inside a message that looks like a template control token
  (`<extra_id_1>`, `<s>` ...) is escaped and never becomes one. Generation stops at
  `<extra_id_1>`; the newline the template puts before it is not returned. A tokenizer without
  the chat control tokens serves completions only: chat requests get a 400 saying so.
- Extensions: `top_k` (0 or -1 = off) and `min_p` (0 = off).
- `max_tokens` must fit: prompt + max_tokens <= the server's context, else 400 (param
  max_tokens). Chat's default is "until the context is full"; completions' default is 16, as in
  OpenAI's API. Completions with `echo` and `max_tokens: 0` score a prompt without generating.
- Log-probs are those of the model's own distribution. Completions: `logprobs: k` (0-20) adds
  the k most likely alternatives per position; with `echo`, the prompt tokens' log-probs too
  (the first is null). Chat: `logprobs: true` and `top_logprobs: k` (0-20).

Work is bounded before it is done: a body nested deeper than MAX_JSON_DEPTH is refused; the
number of prompts x n is checked before any prompt is tokenized; a text longer than any prompt
that could fit the context (`Parser.max_chars`) is refused before it is tokenized; a token-id
prompt longer than the context is refused before its ids are checked; stop strings are bounded
in number (MAX_STOPS) and length (MAX_STOP_CHARS). Parsing and tokenizing run on a worker
thread of the app, never on its event loop.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nemojax.data.chat_template import TURN_TOKEN, ChatFormatError
from nemojax.data.tokenizer import TokenizerError
from nemojax.inference.requests import Request
from nemojax.inference.sampling import MAX_TOP_LOGPROBS, SamplingError, SamplingParams

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
MAX_STOP_CHARS = 1024  # a stream holds back the longest stop string's length - 1 characters
MAX_JSON_DEPTH = 32  # the deepest legitimate body (chat content parts) nests 5 levels
# json.loads holds the GIL, so it stalls the event loop even on a worker thread; a body of many
# tiny arrays is the slowest to parse (8 MiB of "[1]," takes over a second), and no request that
# could fit the limits below needs this many arrays and objects (counted before parsing, "["
# and "{" inside strings included).
MAX_JSON_CONTAINERS = 2**16


class APIError(Exception):
    """An error returned to the client as OpenAI's error body; `param` names the bad field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# --------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _child(path: str, key: Any, in_dict: bool) -> str:
    if in_dict:
        return f"{path}.{key}" if path else str(key)
    return f"{path}[{key}]"


def _check_tree(body: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and non-finite numbers (1e999 parses to inf).

    Iterative, so no body can exhaust the stack; paths are built only for containers."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        in_dict = isinstance(value, dict)
        for key, item in (value.items() if in_dict else enumerate(value)):
            if type(item) is float:
                if not math.isfinite(item):
                    where = _child(path, key, in_dict)
                    raise APIError(400, f"{where}: numbers must be finite", param=where.split(".")[0].split("[")[0])
            elif isinstance(item, (dict, list)):
                stack.append((item, _child(path, key, in_dict), depth + 1))


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; NaN, Infinity, overflowing numbers and nesting deeper
    than MAX_JSON_DEPTH are rejected (400, never a RecursionError)."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise APIError(400, f"the request body has more than {MAX_JSON_CONTAINERS} JSON arrays and objects")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_tree(body)
    return body


# --------------------------------------------------------------------------- fields


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _opt(body: dict[str, Any], name: str, default: Any) -> Any:
    """body[name], with JSON null meaning "use the default" (as OpenAI treats it)."""
    value = body.get(name)
    return default if value is None else value


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad(name, "unrecognized request argument (not supported by this server)")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _opt(body, name, 0)
        if not _is_num(v) or v != 0:
            raise bad(name, "only 0 is supported")
    if body.get("logit_bias"):
        raise bad("logit_bias", "not supported")


def sampling_params(body: dict[str, Any], max_tokens_default: int | None,
                    max_tokens_field: str = "max_tokens", allow_zero_tokens: bool = False) -> SamplingParams:
    """The sampling fields shared by both endpoints, validated; errors name the field.

    max_tokens_default None: the caller fills it in later (chat: the room left in the context).
    """
    raw: dict[str, Any] = {}
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0)):
        v = _opt(body, name, default)
        if not _is_num(v):
            raise bad(name, f"must be a number, got {v!r}")
        raw[name] = v
    if raw["temperature"] > 100:
        raise bad("temperature", "must be <= 100")
    top_k = _opt(body, "top_k", 0)
    if not _is_int(top_k) or top_k < -1:
        raise bad("top_k", f"must be an integer >= 0 (0 or -1 = off), got {top_k!r}")
    raw["top_k"] = max(top_k, 0)
    max_tokens = _opt(body, max_tokens_field, max_tokens_default if max_tokens_default is not None else 1)
    lowest = 0 if allow_zero_tokens else 1
    if not _is_int(max_tokens) or max_tokens < lowest:
        raise bad(max_tokens_field, f"must be an integer >= {lowest}, got {max_tokens!r}")
    raw["max_tokens"] = max_tokens
    n = _opt(body, "n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise bad("n", f"must be an integer in [1, {MAX_N}], got {n!r}")
    raw["n"] = n
    stop = _opt(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", "must be a string or a list of strings")
    stop = [s for s in stop if s]  # OpenAI ignores empty stop strings
    if len(stop) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad("stop", f"a stop string has at most {MAX_STOP_CHARS} characters")
    raw["stop"] = stop
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise bad("seed", f"must be an integer in [0, 2**32) or null, got {seed!r}")
    raw["seed"] = seed
    raw["prompt_logprobs"] = allow_zero_tokens  # max_tokens 0 is only valid when scoring the prompt
    try:
        params = SamplingParams.from_dict(raw)
    except SamplingError as e:  # messages start with "name=value: ..."
        name = str(e).split("=", 1)[0]
        raise APIError(400, str(e), param=name) from None
    params.prompt_logprobs = False
    return params


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _opt(body, "stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    opts = _opt(body, "stream_options", {})
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise bad("stream_options", "only {\"include_usage\": bool} is supported")
    if opts and not stream:
        raise bad("stream_options", "only allowed with stream: true")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options", "include_usage must be true or false")
    return stream, include


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{role, content}] with string content (text parts joined)."""
    if messages is None:
        raise bad("messages", "required")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
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
                    raise APIError(400, f"{where}.content: only text parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"{where}: needs a string 'content'", param="messages")
        out.append({"role": role, "content": content})
    return out


@dataclass
class Job:
    """One parsed HTTP request: the engine requests it becomes and how to answer."""

    id: str  # the response id; engine request ids are derived from it
    kind: str  # "completion" | "chat"
    requests: list[Request]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int = 0
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)  # echo: each prompt as given
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def samples(self) -> int:
        return len(self.requests) * self.params.n


def longest_piece(tokenizer: Any, default: int = 64) -> int:
    """Characters of the tokenizer's longest piece: no token covers more of a text (`default`
    when the tokenizer cannot list its pieces)."""
    try:
        return max(len(tokenizer.id_to_piece(i)) for i in range(int(tokenizer.vocab_size)))
    except Exception:
        return default


class Parser:
    """Turns request bodies into `Job`s for one tokenizer, context length and vocabulary.

    max_chars: the most characters a text prompt (or a chat's messages together) may have. A
    token covers at most `longest_piece` characters, so a longer text cannot fit max_len tokens
    whatever it says; the factor 2 leaves room for normalization that merges characters (NFKC
    composing an accent onto its letter). Longer texts are refused without tokenizing them.
    """

    def __init__(self, tokenizer: Any, model_name: str, max_len: int, vocab_size: int, bos: bool) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.bos = bos
        self.max_chars = 2 * max_len * longest_piece(tokenizer)
        try:
            self.turn_id: int | None = int(tokenizer.special_id(TURN_TOKEN))
        except Exception:  # a tokenizer without the chat symbols: completions only
            self.turn_id = None

    def check_model(self, body: dict[str, Any], names: tuple[str, ...] | None = None) -> None:
        model = body.get("model")
        names = names or (self.model_name,)
        if model is not None and model not in names:
            raise APIError(404, f"model {model!r} does not exist; this server serves {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")

    def check_text(self, text: str, param: str) -> str:
        """`text` if it could fit the context, else 400 (before any tokenizing)."""
        if len(text) > self.max_chars:
            raise APIError(400, f"{param}: {len(text)} characters cannot fit this server's context of "
                                f"{self.max_len} tokens (at most {self.max_chars} characters are accepted)",
                           param=param, code="context_length_exceeded")
        return text

    def check_prompt_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise bad(param, "the prompt is empty")
        if len(ids) >= self.max_len:  # before looking at each id
            raise bad(param, f"the prompt has {len(ids)} tokens but this server's context is {self.max_len} "
                             f"tokens (prompt + completion), so at most {self.max_len - 1} prompt tokens fit")
        badids = [t for t in ids if not 0 <= t < self.vocab_size]
        if badids:
            raise bad(param, f"token ids {badids[:5]} outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check_room(self, prompts: list[list[int]], params: SamplingParams, field_name: str) -> None:
        longest = max(len(p) for p in prompts)
        if longest + params.max_tokens > self.max_len:
            raise APIError(400, f"{field_name}: the context is {self.max_len} tokens; the prompt has {longest} "
                                f"and {field_name}={params.max_tokens} asks for more than the "
                                f"{self.max_len - longest} left; lower {field_name} or shorten the prompt",
                           param=field_name, code="context_length_exceeded")

    def _top_logprobs(self, body: dict[str, Any], chat: bool) -> tuple[bool, int]:
        v = body.get("logprobs")
        if chat:
            if v is not None and not isinstance(v, bool):
                raise bad("logprobs", "must be true or false")
            top = _opt(body, "top_logprobs", 0)
            if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
            if top and not v:
                raise bad("top_logprobs", "needs logprobs: true")
            return bool(v), top
        if v is None:
            return False, 0
        if not _is_int(v) or not 0 <= v <= MAX_TOP_LOGPROBS:
            raise bad("logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}] or null")
        return True, v

    def completion(self, body: dict[str, Any]) -> Job:
        check_fields(body, COMPLETION_FIELDS)
        self.check_model(body)
        echo = _opt(body, "echo", False)
        if not isinstance(echo, bool):
            raise bad("echo", "must be true or false")
        if body.get("suffix") is not None:
            raise bad("suffix", "not supported")
        if "prompt" not in body or body["prompt"] is None:
            raise bad("prompt", "required")
        logprobs, top = self._top_logprobs(body, chat=False)
        params = sampling_params(body, 16, allow_zero_tokens=echo)
        best_of = body.get("best_of")
        if best_of is not None and best_of != params.n:
            raise bad("best_of", "only null or equal to n is supported")
        params.logprobs, params.top_logprobs = logprobs, top
        params.prompt_logprobs = echo and logprobs
        stream, include_usage = stream_flags(body)
        prompts, texts = self._prompts(body["prompt"], params.n)
        self.check_room(prompts, params, "max_tokens")
        base = f"cmpl-{uuid.uuid4().hex}"
        reqs = [Request(f"{base}-{i}", ids, params, stream=True) for i, ids in enumerate(prompts)]
        return Job(base, "completion", reqs, params, stream, include_usage, logprobs, top, echo, texts)

    def _prompts(self, prompt: Any, n: int) -> tuple[list[list[int]], list[str]]:
        """prompt: a string, a list of strings, a list of token ids, or a list of such lists.

        The count of prompts x n is checked before anything is tokenized or walked."""
        from nemojax.data.chat import prompt_ids

        shape_error = bad("prompt", "must be a string, a non-empty list of strings, a non-empty list of token "
                                    "ids, or a list of such lists")
        if isinstance(prompt, str):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            items = prompt  # several prompts
        elif isinstance(prompt, list) and prompt:
            items = [prompt]  # one prompt of token ids
        else:
            raise shape_error
        if len(items) * n > MAX_SAMPLES:
            raise bad("prompt", f"{len(items)} prompts x n={n} samples exceeds the limit of "
                                f"{MAX_SAMPLES} samples per request; split the request")
        if all(isinstance(p, str) for p in items):
            for p in items:
                self.check_text(p, "prompt")
            return [self.check_prompt_ids(prompt_ids(self.tokenizer, p, bos=self.bos), "prompt") for p in items], \
                list(items)
        for p in items:
            if not (isinstance(p, list) and p) or (len(p) < self.max_len and not all(_is_int(t) for t in p)):
                raise shape_error
            self.check_prompt_ids(p, "prompt")  # its length first, then each id
        return [list(p) for p in items], [self.tokenizer.decode(p) for p in items]

    def chat_prompt(self, messages: Any, bos: bool | None = None) -> list[int]:
        """Token ids of a chat prompt (bos + template + `<extra_id_1>Assistant\\n`), validated.
        bos None: the parser's setting."""
        from nemojax.data.chat import prompt_ids

        msgs = normalize_messages(messages)
        chars = sum(len(m["content"]) for m in msgs)
        if chars > self.max_chars:
            raise APIError(400, f"messages: {chars} characters cannot fit this server's context of {self.max_len} "
                                f"tokens (at most {self.max_chars} characters are accepted)",
                           param="messages", code="context_length_exceeded")
        try:
            ids = prompt_ids(self.tokenizer, msgs, bos=self.bos if bos is None else bos)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        except TokenizerError as e:  # no <extra_id_*> pieces: a completion-only tokenizer
            raise APIError(400, f"messages: this server's tokenizer has no chat control tokens ({e}); send a "
                                f"formatted prompt to /v1/completions instead", param="messages") from None
        return self.check_prompt_ids(ids, "messages")

    def chat(self, body: dict[str, Any]) -> Job:
        check_fields(body, CHAT_FIELDS)
        self.check_model(body)
        for name in ("tools", "functions"):
            if body.get(name):
                raise bad(name, "tool / function calling is not supported")
        for name in ("tool_choice", "function_call"):
            if body.get(name) not in (None, "none"):
                raise bad(name, "tool / function calling is not supported")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad("response_format", "only {\"type\": \"text\"} is supported")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        explicit = body.get(field_name) is not None
        params = sampling_params(body, None, field_name)
        params.logprobs, params.top_logprobs = self._top_logprobs(body, chat=True)
        stream, include_usage = stream_flags(body)
        ids = self.chat_prompt(body.get("messages"))
        if explicit:
            self.check_room([ids], params, field_name)
        else:
            params.max_tokens = self.max_len - len(ids)
        params.stop_token_ids.append(self.turn_id)  # not None: chat_prompt found the chat tokens
        req = Request(f"chatcmpl-{uuid.uuid4().hex}", ids, params, stream=True)
        return Job(req.id, "chat", [req], params, stream, include_usage, params.logprobs, params.top_logprobs)
