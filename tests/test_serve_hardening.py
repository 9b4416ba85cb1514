"""A real `nemojax serve` process under the conditions production throws at it.

The server (API key from $NEMOJAX_API_KEY, 4 slots + a queue of 4 samples) is checked for: the
key on every guarded route, at least 20 kinds of bad request (each a 4xx in OpenAI's error
shape, the server answering a good request right after), 429 with Retry-After when full, the
slots of a client that disconnects (streaming or not) being freed, and, last, SIGTERM: the
stream in flight completes, new connections are refused, the process exits 0.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time

import pytest
from serve_process import ENGINE_ARGS, ServerProcess, tiny_checkpoint

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS, QUEUE = 4, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("serve-hard") / "tiny")
    proc = ServerProcess(ckpt, tmp_path_factory.mktemp("logs") / "server.log", *ENGINE_ARGS,
                         "--max-queue", str(QUEUE), "--drain-timeout", "60", env={"NEMOJAX_API_KEY": KEY})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def good(server) -> None:
    status, body, _ = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0}, AUTH)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body


def open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def events(resp: http.client.HTTPResponse):
    """The JSON payloads of an SSE response as they arrive (stops at [DONE])."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[6:])


def test_api_key_guards_the_api_but_not_probes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1}), ("/tokenize", {"prompt": "x"})):
            status, out, hdrs = server.post(path, body, headers)
            assert status == 401 and out["error"]["code"] == "invalid_api_key" and out["error"]["message"]
            assert hdrs.get("www-authenticate") == "Bearer"
        status, out, _ = server.get("/v1/models", headers)
        assert status == 401
    status, out, _ = server.get("/v1/models", AUTH)
    assert status == 200 and out["data"][0]["id"] == "tiny"
    for path in ("/health", "/version", "/metrics"):
        assert server.get(path)[0] == 200
    good(server)


BAD = [  # (path, body or raw JSON text, status, param)
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),  # beyond the context
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, None),
    ("/v1/completions", '{"prompt": "x", "top_p": Infinity}', 400, None),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e999}', 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -3}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": SLOTS + QUEUE + 1}, 400, "n"),  # more than the capacity
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokenz": 5}, 400, "max_tokenz"),
    ("/v1/completions", {"prompt": [2, 999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 300}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, "a"]}, 400, "tokens"),
]


def test_bad_requests_get_4xx_errors_and_the_server_keeps_serving(server):
    assert len(BAD) >= 20
    for path, body, status, param in BAD:
        raw = body.encode() if isinstance(body, str) else body
        got, out, _ = server.post(path, raw, AUTH)
        assert got == status, (path, body, got, out)
        err = out["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
        assert "Traceback" not in json.dumps(out)
        good(server)
    status, out, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                          "stream": True, "stream_options": {"include_usage": 1}},
                                 AUTH)
    assert status == 400 and out["error"]["param"] == "stream_options"


def test_a_full_queue_answers_429_with_retry_after(server):
    conn, resp = open_stream(server, {"prompt": "Once upon a time", "max_tokens": 200, "n": SLOTS + QUEUE,
                                      "temperature": 0})
    try:
        stream = events(resp)
        next(stream)  # the request holds every slot and queue place now
        status, out, hdrs = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, AUTH)
        assert status == 429 and out["error"]["code"] == "queue_full"
        assert int(hdrs["retry-after"]) >= 1
        finished = sum(1 for e in stream if e["choices"][0]["finish_reason"])
        assert finished == SLOTS + QUEUE
    finally:
        conn.close()
    good(server)


def _wait_idle(server, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.metric("nemojax_running_slots") == 0 and server.metric("nemojax_queue_depth") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("slots were not freed")


def test_a_client_that_disconnects_frees_its_slots(server):
    before = server.metric("nemojax_completion_tokens_total")
    conn, resp = open_stream(server, {"prompt": "The quick brown fox", "max_tokens": 220, "n": SLOTS,
                                      "temperature": 0})
    stream = events(resp)
    next(stream), next(stream)
    assert server.metric("nemojax_running_slots") == SLOTS
    conn.close()  # mid-stream
    _wait_idle(server)
    # Not streaming: the connection closes while the answer is being generated.
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "Dear Sir or Madam,", "max_tokens": 220, "n": SLOTS, "temperature": 0})
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    deadline = time.time() + 20
    while server.metric("nemojax_running_slots") == 0 and time.time() < deadline:
        time.sleep(0.01)
    sock.close()
    _wait_idle(server)
    # Cancelled samples never complete: far fewer than 2 x 4 x 220 tokens were finished.
    assert server.metric("nemojax_completion_tokens_total") - before < SLOTS * 220
    good(server)


def test_metrics_are_prometheus_text(server):
    status, text, hdrs = server.get("/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    for name in ("nemojax_requests_total", "nemojax_prompt_tokens_total", "nemojax_completion_tokens_total",
                 "nemojax_queue_depth", "nemojax_running_slots", "nemojax_time_to_first_token_seconds_bucket",
                 "nemojax_request_latency_seconds_bucket"):
        assert name in text, name
    assert 'nemojax_requests_total{endpoint="/v1/completions",status="401"}' in text
    assert 'nemojax_requests_total{endpoint="/v1/completions",status="429"}' in text


def test_sigterm_drains_the_request_in_flight_then_exits_0(server):
    """Last in the module: the server goes away."""
    conn, resp = open_stream(server, {"prompt": "In 1905, Einstein", "max_tokens": 200, "n": SLOTS + QUEUE,
                                      "temperature": 0})
    stream = events(resp)
    first = next(stream)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # the listening socket is closed: no new connections
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    rest = list(stream)  # ... but the stream in flight runs to its end
    finished = [e for e in [first, *rest] if e["choices"][0]["finish_reason"]]
    assert len(finished) == SLOTS + QUEUE and {e["choices"][0]["finish_reason"] for e in finished} == {"length"}
    tokens = [e for e in [first, *rest] if not e["choices"][0]["finish_reason"]]
    assert len(tokens) == (SLOTS + QUEUE) * 200  # one chunk per token, none lost
    conn.close()
    assert server.proc.wait(90) == 0
    log = server.log()
    assert "draining" in log and "Traceback" not in log
