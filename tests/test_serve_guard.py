"""The server's ASGI middleware (`_Guard`) around a stand-in app: what it hands the handlers and
what it counts when a handler fails. No engine and no HTTP server (the API key and body limits over
real HTTP are in test_serve_hardening.py and test_serve_limits.py).

Each test names, in its docstring, the mutants of nemojax/serve/app.py it kills
(scripts/mutation.py serve).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

pytest.importorskip("fastapi")
from nemojax.data.tokenizer import load_tokenizer  # noqa: E402
from nemojax.serve.app import BodyTooLarge, Server, _Guard  # noqa: E402
from nemojax.serve.metrics import UNMATCHED  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _count(server: Server, status: str) -> float:
    return server.metrics.requests.labels(UNMATCHED, status)._value.get()


def test_handlers_get_the_arrival_time_and_the_endpoint(tok):
    """The generation handlers read `scope["state"]` for the request's arrival time (TTFT is
    measured from it, not from when the handler starts) and its route template (the TTFT label).
    Kills: the state stored under another key, `started` or `endpoint` not stored."""
    server, seen = Server(None, tok, "m", True), {}

    async def app(scope, receive, send):
        seen.update(scope["state"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        pass

    before = time.monotonic()
    asyncio.run(_Guard(app, server)(_scope(), _receive, send))
    assert before <= seen["started"] <= time.monotonic()
    assert seen["endpoint"] == UNMATCHED  # the stand-in app has no routes
    assert _count(server, "200") == 1


def test_a_handler_that_fails_before_answering_counts_as_500(tok):
    """A handler that raises before sending its response start (nothing reached the client) is
    counted as a 500 and the exception goes on to the server. Kills: the default status 501, or
    stored under another key (the count then fails with a KeyError that hides the handler's
    error)."""
    server = Server(None, tok, "m", True)

    async def app(scope, receive, send):
        raise RuntimeError("handler broke")

    async def send(message):
        pass

    with pytest.raises(RuntimeError, match="handler broke"):
        asyncio.run(_Guard(app, server)(_scope(), _receive, send))
    assert _count(server, "500") == 1 and _count(server, "501") == 0


def test_latency_is_observed_once_per_response_at_its_last_byte(tok):
    """A streamed response (start, a chunk with more_body, 60 ms, the last chunk without the key):
    one latency sample of at least 60 ms under the route's label. Kills: observing on the start
    message or on every chunk, never observing, a last chunk told apart by another key or
    default, the label dropped, arrival time added instead of subtracted."""
    server = Server(None, tok, "m", True)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await asyncio.sleep(0.06)
        await send({"type": "http.response.body", "body": b"b"})

    async def send(message):
        pass

    asyncio.run(_Guard(app, server)(_scope(), _receive, send))
    samples = {s.name: s.value for s in server.metrics.latency.collect()[0].samples
               if s.labels.get("endpoint") == UNMATCHED}
    assert samples["nemojax_request_latency_seconds_count"] == 1
    assert 0.06 <= samples["nemojax_request_latency_seconds_sum"] < 5


@pytest.mark.parametrize("authorization, message", [
    (None, "missing API key: send 'Authorization: Bearer <key>'"),
    (b"Bearer nope", "missing or wrong API key: send 'Authorization: Bearer <key>'"),
    (b"Token: sesame", "missing or wrong API key: send 'Authorization: Bearer <key>'"),  # the key, not as Bearer
])
def test_a_request_without_the_key_is_told_which_header_to_send(tok, authorization, message):
    """No Authorization header: "missing API key"; a wrong key, or the right key in another
    scheme: "missing or wrong API key"; each 401 invalid_api_key with WWW-Authenticate, and the app
    is never called. Kills: a default header value that is not empty (an absent header then reads
    as a wrong key), the key taken from any 7-character scheme (`... or True`), a non-Bearer
    header read as a missing one (`given and auth`), the messages changed."""
    server = Server(None, tok, "m", True, api_key="sesame")
    sent, called = [], []

    async def app(scope, receive, send):
        called.append(True)

    async def send(message):
        sent.append(message)

    scope = _scope()
    if authorization is not None:
        scope["headers"] = [(b"authorization", authorization)]
    asyncio.run(_Guard(app, server)(scope, _receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert start["status"] == 401 and (b"www-authenticate", b"Bearer") in start["headers"] and not called
    error = json.loads(body)["error"]
    assert (error["message"], error["code"]) == (message, "invalid_api_key")


def test_a_declared_body_over_the_limit_is_refused_before_a_byte_is_read(tok):
    """Content-Length 101 with a 100-byte limit: 413 naming the size and the limit, with
    `Connection: close`, before the body is read or the app called; exactly 100 passes. Kills:
    the header looked up under another name, `>=` for `>`, the
    size left out of the message, the Connection header dropped."""
    for length, refused in ((101, True), (100, False)):
        server = Server(None, tok, "m", True, max_body_bytes=100)
        sent, reads, called = [], [], []

        async def receive():
            reads.append(True)
            return {"type": "http.request", "body": b"x" * length, "more_body": False}

        async def app(scope, receive, send):
            called.append((await receive())["body"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def send(message):
            sent.append(message)

        scope = {**_scope(), "headers": [(b"content-length", str(length).encode())]}
        asyncio.run(_Guard(app, server)(scope, receive, send))
        if not refused:
            assert sent[0]["status"] == 200 and called == [b"x" * 100]
            continue
        assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
        assert not reads and not called
        error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
        assert error["message"] == ("the request body has 101 bytes; this server accepts at most 100 "
                                    "(--max-body-mb); split the request")
        assert error["code"] == "request_too_large"


def test_a_body_without_a_length_is_cut_off_once_it_passes_the_limit(tok):
    """A chunked body (no Content-Length) is read through: 60 bytes pass a 100-byte limit, the
    next 60 raise BodyTooLarge carrying the limit, which the 413 handler puts in its message.
    Kills: the limit dropped from the exception (`BodyTooLarge(None)`: "at most None")."""
    server = Server(None, tok, "m", True, max_body_bytes=100)
    chunks, caught = [b"x" * 60, b"x" * 60], []

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def app(scope, receive, send):
        assert len((await receive())["body"]) == 60
        with pytest.raises(BodyTooLarge) as err:
            await receive()
        caught.append(err.value.args)

    async def send(message):
        pass

    asyncio.run(_Guard(app, server)(_scope(), receive, send))
    assert caught == [(100,)]
