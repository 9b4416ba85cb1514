"""The server's admission answers as values: Retry-After from the recent finish rate, the 429 /
504 / 413 error bodies. No engine and no HTTP: `Server(None, ...)` holds the admission state, and
the clock is replaced, so each formula is checked at its edges (the HTTP paths that raise these
errors are in test_serve_limits.py).

Each test names, in its docstring, the mutants of nemojax/serve/app.py it kills
(scripts/mutation.py serve).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
from nemojax.data.tokenizer import load_tokenizer  # noqa: E402
from nemojax.serve import app as app_module  # noqa: E402
from nemojax.serve.app import Server, _too_large  # noqa: E402
from nemojax.serve.protocol import APIError  # noqa: E402

NOW = 1000.0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture
def server(tok, monkeypatch):
    monkeypatch.setattr(app_module.time, "monotonic", lambda: NOW)
    return Server(None, tok, "m", True, max_queue=3, request_timeout=2.5)


def _expected(done: list[float], queued: int) -> int:
    """Retry-After from its definition: queued work over the finish rate of the last minute."""
    recent = [t for t in done if NOW - t < 60]
    if len(recent) < 2:
        return 1
    rate = len(recent) / max(NOW - recent[0], 1e-3)
    return int(min(60, max(1, math.ceil(queued / rate))))


def test_retry_after_is_queued_work_over_the_finish_rate(server):
    """10 finished over the last 5 s (2/s) and 9 queued: 5 s. Kills: the rate multiplied instead
    of divided (`len * span`), the span measured from the second completion or as `now + t0`,
    the queue depth multiplied by the rate."""
    server._done_times = [NOW - 5 + 5 * i / 9 for i in range(10)]
    server.outstanding = 9
    assert server.retry_after() == 5 == _expected([NOW - 5 + 5 * i / 9 for i in range(10)], 9)


def test_retry_after_rate_over_a_short_burst(server):
    """Three completions within half a second: the rate is 6/s, not 3 per the 1 ms floor raised to
    a second. Kills: the floor `1e-3` replaced by 1.001."""
    server._done_times = [NOW - 0.5, NOW - 0.25, NOW]
    server.outstanding = 30
    assert server.retry_after() == 5


def test_retry_after_counts_only_the_last_minute(server):
    """A completion exactly 60 s ago, or 60.5 s ago, is outside the window; with one left the answer
    is the 1 s default. Kills: `now - t <= 60`, `< 61`, `now + t < 60` (nothing recent ever)."""
    server.outstanding = 50
    server._done_times = [NOW - 60.0, NOW - 1.0]
    assert server.retry_after() == 1
    server._done_times = [NOW - 60.5, NOW - 1.0]
    assert server.retry_after() == 1
    server._done_times = [NOW - 59.0, NOW - 1.0]  # both inside: 2 per 59 s, 50 queued -> capped
    assert server.retry_after() == 60


def test_retry_after_with_two_recent_completions_uses_the_rate(server):
    """Two completions are enough for a rate (2 over 10 s, 3 queued: 15 s); one is not (1 s). Kills:
    `len(recent) <= 2`, `< 3`, and the default answer 2 instead of 1."""
    server.outstanding = 3
    server._done_times = [NOW - 10, NOW]
    assert server.retry_after() == 15
    server._done_times = [NOW]
    assert server.retry_after() == 1


def test_retry_after_is_between_one_second_and_a_minute(server):
    """An empty queue still says 1 s (never 0: clients would hammer); an overloaded one says at most
    60 s. Kills: `max(2, ...)`, `min(61, ...)`."""
    server._done_times = [NOW - 1, NOW]
    server.outstanding = 0
    assert server.retry_after() == 1
    server.outstanding = 10_000
    assert server.retry_after() == 60


def test_retry_after_remembers_at_most_200_completions(server):
    """The completion log is bounded (a busy server must not grow it forever) and keeps the newest.
    Kills: `recent[+200:]` (keeps the oldest beyond 200), `recent[-201:]`."""
    server._done_times = [NOW - 50 + i * 0.1 for i in range(250)]
    server.retry_after()
    assert server._done_times == [NOW - 50 + i * 0.1 for i in range(50, 250)]


def test_queue_full_error_names_the_load_and_retry_after(server):
    """429 with OpenAI's rate-limit type, code queue_full, a message naming what is in flight and the
    capacity, and a Retry-After header equal to the estimate. Kills: message None, type None / missing
    / misspelt."""
    server._done_times = [NOW - 10, NOW]
    server.outstanding = 4
    e = server._full()
    assert (e.status, e.type, e.code) == (429, "rate_limit_error", "queue_full")
    assert "4 samples in flight" in e.message and "capacity 4" in e.message and "queue of 3" in e.message
    assert {k.lower(): v for k, v in e.headers.items()} == {"retry-after": str(server.retry_after())}
    assert e.body()["error"]["type"] == "rate_limit_error"


def test_timeout_error_names_the_timeout(server):
    """504, type timeout_error, code request_timeout, the message naming the timeout in seconds.
    Kills: message None, type None / missing / misspelt."""
    e = server.timeout_error()
    assert (e.status, e.type, e.code) == (504, "timeout_error", "request_timeout")
    assert "(2.5 s)" in e.message and "cancelled" in e.message


def test_too_large_names_the_size_or_the_limit():
    """413, code request_too_large: a declared Content-Length is named in bytes; a streamed body
    (no length) says "more than" the limit. Kills: `what = None`, the branch inverted or forced,
    code None / missing / misspelt."""
    e = _too_large(5_000, 1_000)
    assert (e.status, e.code, e.type) == (413, "request_too_large", "invalid_request_error")
    assert "has 5000 bytes" in e.message and "at most 1000" in e.message and "--max-body-mb" in e.message
    e = _too_large(None, 1_000)
    assert e.code == "request_too_large"
    assert "has more than 1000 bytes" in e.message and "None" not in e.message


def test_queue_depth_is_what_waits_beyond_the_running_slots(server):
    """Samples accepted minus those running (never negative): the gauge and Retry-After's
    numerator. Kills: `outstanding + running` (scripts/mutation.py serve; written after its run)."""
    server.engine = type("Engine", (), {"running": lambda self: 3})()
    server.outstanding = 5
    assert server.queue_depth() == 2.0
    server.outstanding = 1
    assert server.queue_depth() == 0.0


class _Worker:
    engine = None

    def __init__(self, alive: bool, why: str = "") -> None:
        self.alive, self._why = alive, why

    def why_unavailable(self) -> str:
        return self._why


def _job(samples: int):
    from types import SimpleNamespace

    return SimpleNamespace(samples=samples)


def test_admit_generation_needs_a_live_engine(tok):
    """No generation model: 503 "no generation model"; a dead worker: 503 with the worker's own
    reason; a live one: a ticket for the job's samples; draining: admit's 503 whatever the worker.
    Kills: `if self.draining and ...`, `worker is None and not worker.alive`, the reason replaced
    by None / the fixed text / its case changed, and the error without its message."""
    server = Server(None, tok, "m", True)
    with pytest.raises(APIError) as err:
        server.admit_generation(_job(1))
    assert (err.value.status, err.value.message, err.value.type) == (503, "no generation model", "server_error")

    server.worker = _Worker(alive=False, why="the engine failed earlier (OOM); restart the server")
    with pytest.raises(APIError) as err:
        server.admit_generation(_job(1))
    assert (err.value.status, err.value.message) == (503, "the engine failed earlier (OOM); restart the server")

    server.worker = _Worker(alive=True)
    ticket = server.admit_generation(_job(3))
    assert ticket.size == 3 and server.outstanding == 3
    ticket.release()

    server.draining = True
    server.worker = _Worker(alive=False, why="the server is shutting down")
    with pytest.raises(APIError) as err:
        server.admit_generation(_job(1))
    assert err.value.status == 503 and "shutting down" in err.value.message


DRAINING = "the server is shutting down; retry on another replica"


def test_draining_refuses_with_503_and_says_where_to_go(server):
    """While draining, both the early check (before the body is read) and admission answer 503
    server_error telling the client to retry on another replica. Kills: the message dropped or
    changed, the error type dropped or changed, in either place."""
    server.draining = True
    for refuse in (server.refuse_early, lambda: server.admit(1)):
        with pytest.raises(APIError) as err:
            refuse()
        assert (err.value.status, err.value.message, err.value.type) == (503, DRAINING, "server_error")


def test_a_request_larger_than_the_capacity_is_a_400_naming_its_field(server):
    """Capacity 1 reward batch + 3 queued = 4: 5 samples can never run (400 on `n`), 5
    conversations neither (400 on `conversations`), each message naming the size, what it counts
    and the capacity; 4 fit. Kills: no capacity check (`cap = None`), the param dropped, swapped or
    renamed, the message dropped, the default `what` changed (its param turns to conversations)."""
    assert server.capacity == 4
    with pytest.raises(APIError) as err:
        server.admit(5)
    e = err.value
    assert (e.status, e.param) == (400, "n")
    assert e.message == "n: 5 samples (prompts x n) exceed this server's capacity of 4 (slots + queue); split the request"
    with pytest.raises(APIError) as err:
        server.admit(5, "conversations")
    assert (err.value.param, err.value.message) == (
        "conversations", "conversations: 5 conversations exceed this server's capacity of 4 (slots + queue); split the request")
    ticket = server.admit(4)
    assert server.outstanding == 4
    ticket.release()
    assert server.outstanding == 0
