"""The OpenAI-compatible HTTP clients against a scripted local server (stdlib ThreadingHTTPServer
on 127.0.0.1): retries with backoff on 429 / 5xx / timeouts honouring Retry-After, no retry on
400, the concurrency limit, the API key from the environment, request bodies, and NVIDIA's
reward response shape."""

from __future__ import annotations

import asyncio
import time

import pytest

from nemojax.sdg.http_client import OpenAILLM
from nemojax.sdg.llm import GenRequest, LLMError
from nemojax.sdg.reward import HTTPReward
from tests.fake_openai import FakeServer, chat_ok


@pytest.fixture
def server():
    servers = []

    def make(plan):
        s = FakeServer(plan)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_retries_on_429_and_5xx_honouring_retry_after(server, monkeypatch):
    def plan(path, body, attempt):
        if attempt == 1:
            return 429, {"Retry-After": "0.3"}, {"error": {"message": "slow down"}}, 0
        if attempt == 2:
            return 503, {}, {"error": {"message": "busy"}}, 0
        return 200, {}, chat_ok("hello"), 0
    s = server(plan)
    monkeypatch.setenv("MY_KEY", "sekrit")
    llm = OpenAILLM(s.url, "m", api_key_env="MY_KEY", backoff_s=0.01, max_retries=3)

    async def go():
        t0 = time.perf_counter()
        r = await llm.generate(GenRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.5,
                                          max_tokens=7, stop=["\n"], seed=3))
        await llm.aclose()
        return r, time.perf_counter() - t0
    r, took = asyncio.run(go())
    assert r.texts == ["hello"] and r.prompt_tokens == 3 and r.completion_tokens == 2
    assert took >= 0.3  # waited as told by Retry-After
    assert len(s.requests) == 3 and llm.http.retries == 2
    path, body, headers = s.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekrit"
    assert body == {"model": "m", "temperature": 0.5, "top_p": 1.0, "max_tokens": 7, "n": 1, "stop": ["\n"],
                    "seed": 3, "messages": [{"role": "user", "content": "hi"}]}


def test_timeout_retried_then_gives_up_and_400_not_retried(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = server(lambda path, body, attempt: (200, {}, chat_ok("late"), 1.0) if body.get("prompt") == "slow"
               else (400, {}, {"error": {"message": "max_tokens: must be >= 1"}}, 0))
    llm = OpenAILLM(s.url, "m", timeout_s=0.2, backoff_s=0.01, max_retries=2)

    async def go():
        with pytest.raises(LLMError, match="gave up after 3 attempts.*Timeout"):
            await llm.generate(GenRequest(prompt="slow"))
        with pytest.raises(LLMError, match="HTTP 400.*max_tokens"):
            await llm.generate(GenRequest(prompt="bad"))
        await llm.aclose()
    asyncio.run(go())
    assert [b["prompt"] for _, b, _ in s.requests] == ["slow"] * 3 + ["bad"]
    assert s.requests[-1][0] == "/v1/completions" and "Authorization" not in s.requests[-1][2]


def test_concurrency_limit(server):
    s = server(lambda path, body, attempt: (200, {}, chat_ok(body["messages"][0]["content"]), 0.1))
    llm = OpenAILLM(s.url, "m", max_concurrency=3)

    async def go():
        out = await asyncio.gather(*(llm.generate(GenRequest(messages=[{"role": "user", "content": str(i)}]))
                                     for i in range(12)))
        await llm.aclose()
        return out
    out = asyncio.run(go())
    assert [r.text for r in out] == [str(i) for i in range(12)]
    assert s.max_in_flight == 3


def test_reward_api_shape(server):
    def plan(path, body, attempt):
        assert body["model"] == "nvidia/nemotron-4-340b-reward"
        scores = [{"token": "helpfulness", "logprob": 3.0}, {"token": "correctness", "logprob": 2.0},
                  {"token": "coherence", "logprob": 4.0}, {"token": "complexity", "logprob": 1.0},
                  {"token": "verbosity", "logprob": 2.0}]
        if body["messages"][-1]["content"] == "broken":
            return 200, {}, {"choices": [{"message": {"content": ""}}]}, 0
        return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                      "logprobs": {"content": scores}}]}, 0
    s = server(plan)
    rm = HTTPReward(s.url, "nvidia/nemotron-4-340b-reward")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]

    async def go():
        good = await rm.score(conv)
        with pytest.raises(LLMError, match="logprobs.content"):
            await rm.score([conv[0], {"role": "assistant", "content": "broken"}])
        await rm.aclose()
        return good
    scores = asyncio.run(go())
    assert scores["helpfulness"] == 3.0
    assert scores["reward"] == pytest.approx(0.3 * 3 + 0.74 * 2 + 0.46 * 4 + 0.47 * 1 - 0.33 * 2)
    assert s.requests[0][1]["messages"] == conv


def test_failures_are_classified_as_transport_or_as_the_requests_own(server):
    """400/413/422 say the request itself is wrong (an outcome of the item, reason bad_request);
    retries exhausted, 401/403/404 and a body that is not JSON are transport failures, which the
    SDG runner never records as results. Mutants killed: any of them classified the other way."""
    status = {"bad": 400, "large": 413, "auth": 401, "gone": 404, "busy": 503}

    def plan(path, body, attempt):
        key = body["messages"][0]["content"]
        if key == "html":
            return 200, {}, "<html>proxy error</html>", 0
        return status[key], {}, {"error": {"message": key}}, 0
    s = server(plan)
    llm = OpenAILLM(s.url, "m", max_retries=1, backoff_s=0.01, api_key_env=None)

    async def go():
        out = {}
        for key in [*status, "html"]:
            with pytest.raises(LLMError) as e:
                await llm.generate(GenRequest(messages=[{"role": "user", "content": key}]))
            out[key] = (e.value.reason, e.value.transport)
        await llm.aclose()
        return out
    got = asyncio.run(go())
    assert got == {"bad": ("bad_request", False), "large": ("bad_request", False), "auth": ("http_error", True),
                   "gone": ("http_error", True), "busy": ("http_error", True), "html": ("bad_response", True)}
