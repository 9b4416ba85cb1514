"""OpenAI-compatible HTTP clients: text generation and reward scoring.

Works unchanged against `nemojax serve`, vLLM and NVIDIA NIM / build.nvidia.com:
- at most `max_concurrency` requests in flight (an asyncio semaphore);
- retries with exponential backoff and jitter on 408/409/429/5xx, timeouts and connection errors,
  honouring a `Retry-After` header (seconds or an HTTP date); other 4xx fail at once with the
  server's message, since retrying them now cannot help;
- failures are classified (LLMError.transport): 400/413/422 say the request itself is wrong
  (reason `bad_request`, a result for that item); everything else (retries exhausted, 401/403/404,
  a body that is not the API's JSON) is a transport failure, which the runner never records as a
  result: the stage stays incomplete and a rerun retries those items;
- a per-request timeout;
- the API key is read from an environment variable (`api_key_env`), never from the config file.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from typing import Any

import httpx

from nemojax.sdg.llm import GenRequest, GenResult, LLMError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
ITEM_STATUS = {400, 413, 422}  # the request itself is wrong: an outcome of the item, not of the transport


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


class OpenAIHTTP:
    """The transport both clients share: one httpx.AsyncClient, a semaphore, retries."""

    def __init__(self, base_url: str, *, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 120.0,
                 max_concurrency: int = 16, max_retries: int = 6, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, seed: int = 0) -> None:
        headers = {}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._headers = headers
        self._timeout = timeout_s
        self._sem: asyncio.Semaphore | None = None
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._jitter = random.Random(seed)
        self.retries = 0  # total retries so far (reported in stage summaries)

    def _ensure(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                             timeout=self._timeout, limits=limits)
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._client, self._sem  # type: ignore[return-value]

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        client, sem = self._ensure()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                async with sem:
                    response = await client.post(path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise LLMError(f"{self.base_url}{path}: response is not JSON: {response.text[:200]!r}",
                                       "bad_response", transport=True) from None
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code in ITEM_STATUS:
                    raise LLMError(f"{self.base_url}{path}: {last}", "bad_request")
                if response.status_code not in RETRY_STATUS:
                    raise LLMError(f"{self.base_url}{path}: {last}", "http_error", transport=True)
                wait = _retry_after(response)
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + self._jitter.random() / 2)
            self.retries += 1
            await asyncio.sleep(wait)
        raise LLMError(f"{self.base_url}{path}: gave up after {self.max_retries + 1} attempts; last error: {last}",
                       "http_error", transport=True)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class OpenAILLM:
    """Generation over /v1/chat/completions (messages) or /v1/completions (prompt)."""

    def __init__(self, base_url: str, model: str, *, name: str = "openai", extra_body: dict[str, Any] | None = None,
                 **http: Any) -> None:
        self.name = name
        self.model = model
        self.extra_body = dict(extra_body or {})
        self.http = OpenAIHTTP(base_url, **http)

    async def generate(self, request: GenRequest) -> GenResult:
        body: dict[str, Any] = {"model": self.model, "temperature": request.temperature, "top_p": request.top_p,
                                "max_tokens": request.max_tokens, "n": request.n, **self.extra_body}
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        chat = request.messages is not None
        if chat:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt
        data = await self.http.post("/chat/completions" if chat else "/completions", body)
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            texts = [(c["message"]["content"] if chat else c["text"]) or "" for c in choices]
            reasons = [c.get("finish_reason") or "stop" for c in choices]
        except (KeyError, TypeError) as e:
            raise LLMError(f"unexpected response shape (missing {e}): {str(data)[:200]}", "bad_response",
                           transport=True) from None
        usage = data.get("usage") or {}
        return GenResult(texts, reasons, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    async def aclose(self) -> None:
        await self.http.aclose()
