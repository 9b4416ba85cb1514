"""The server's ASGI middleware (`_Guard`) around a stand-in app: what it hands the handlers and
what it counts when a handler fails. No engine and no HTTP server (the API key and body limits over
real HTTP are in test_serve_hardening.py and test_serve_limits.py).

Each test names, in its docstring, the mutants of nemojax/serve/app.py it kills
(scripts/mutation.py serve).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

pytest.importorskip("fastapi")
from nemojax.data.tokenizer import load_tokenizer  # noqa: E402
from nemojax.serve.app import Server, _Guard  # noqa: E402
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
