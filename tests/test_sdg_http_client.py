"""The OpenAI-compatible HTTP clients against a scripted local server (stdlib ThreadingHTTPServer
on 127.0.0.1): retries with backoff on 429 / 5xx / timeouts honouring Retry-After, no retry on
400, the concurrency limit, the API key from the environment, request bodies, and NVIDIA's
reward response shape."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nemojax.sdg.http_client import OpenAILLM
from nemojax.sdg.llm import GenRequest, LLMError
from nemojax.sdg.reward import HTTPReward


class FakeServer:
    """Answers POSTs from a per-test `plan(path, body, attempt) -> (status, headers, body, delay)`."""

    def __init__(self, plan):
        self.plan = plan
        self.requests = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, body, dict(self.headers)))
                    attempt = sum(1 for p, b, _ in server.requests if p == self.path and b == body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, headers, payload, delay = server.plan(self.path, body, attempt)
                    time.sleep(delay)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    try:
                        self.wfile.write(data)
                    except BrokenPipeError:
                        pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_ok(text):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


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
