"""The one interface every SDG stage talks to: `await llm.generate(GenRequest) -> GenResult`.

Implementations: `EngineLLM` (in-process nemojax engine, engine_client.py), `OpenAILLM` (any
OpenAI-compatible server: `nemojax serve`, vLLM, NVIDIA NIM; http_client.py) and `ScriptedLLM`
(deterministic replies from Python or YAML rules, for tests and dry runs). Stages issue requests
from many items concurrently (asyncio); each client turns that concurrency into full engine
slots or parallel HTTP requests.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class LLMError(RuntimeError):
    """A request the backend could not answer (after retries).

    transport False: the answer is a property of the request (a prompt too long for the model,
    parameters the server rejects with 400): stages count `reason` as a drop and the item's
    outcome is final. transport True: the backend was unreachable or broke (refused connection,
    timeout, HTTP 5xx / 429 after every retry, 401/403/404, an engine crash): nothing was learnt
    about the item, so the runner records no outcome for it, marks the stage incomplete and a
    rerun retries exactly those items.
    """

    def __init__(self, message: str, reason: str = "llm_error", *, transport: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.transport = transport


@dataclass
class GenRequest:
    """One prompt: `messages` (chat, rendered with the Nemotron template) or `prompt` (raw text)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenRequest needs exactly one of messages or prompt")

    def last_user(self) -> str:
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages or [] if m.get("role") == "user"]
        return users[-1] if users else ""


@dataclass
class GenResult:
    texts: list[str]  # n samples
    finish_reasons: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return self.texts[0]


class LLM(Protocol):
    name: str

    async def generate(self, request: GenRequest) -> GenResult: ...

    async def aclose(self) -> None: ...


class ScriptedLLM:
    """Deterministic replies: `reply(request, sample_index) -> str`, or ordered regex rules.

    rules: [(pattern, reply)]; the first pattern found (re.search, DOTALL) in the request's
    rendered text wins; `reply` may use `\\1`-style groups. `default` answers the rest.
    Token counts are whitespace-separated words. Used by the tests (exact expected outputs)
    and by `type: scripted` clients in pipelines.
    """

    def __init__(self, reply: Callable[[GenRequest, int], str] | None = None, *,
                 rules: list[tuple[str, str]] | None = None, default: str = "", name: str = "scripted",
                 delay_s: float = 0.0) -> None:
        self.name = name
        self.delay_s = delay_s
        self._reply = reply
        self._rules = [(re.compile(p, re.DOTALL), r) for p, r in (rules or [])]
        self._default = default
        self.requests: list[GenRequest] = []

    @staticmethod
    def render(request: GenRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in request.messages or [])

    def _answer(self, request: GenRequest, i: int) -> str:
        if self._reply is not None:
            return self._reply(request, i)
        text = self.render(request)
        for pattern, reply in self._rules:
            m = pattern.search(text)
            if m:
                return m.expand(reply)
        return self._default

    async def generate(self, request: GenRequest) -> GenResult:
        self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        texts = [self._answer(request, i) for i in range(request.n)]
        for i, t in enumerate(texts):
            cut = [t.find(s) for s in request.stop if s in t]
            if cut:
                texts[i] = t[:min(cut)]
        return GenResult(texts, ["stop"] * request.n, len(self.render(request).split()),
                         sum(len(t.split()) for t in texts))

    async def aclose(self) -> None:
        return None


def sampling_fields(request: GenRequest) -> dict[str, Any]:
    return {"temperature": request.temperature, "top_p": request.top_p, "max_tokens": request.max_tokens,
            "stop": list(request.stop), "seed": request.seed, "n": request.n}
