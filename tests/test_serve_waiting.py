"""How the server waits for work it has accepted: a client that leaves has its work cancelled, the
request timeout is kept to the millisecond, and a streaming request leaves the ASGI channel to
the streaming response. No engine and no HTTP server: a fake worker and a fake ASGI `receive`
stand in for them, so each test runs in well under a second (the same paths over real HTTP are in
test_serve_limits.py and test_serve_hardening.py).

Each test names, in its docstring, the mutants of nemojax/serve/app.py it kills
(scripts/mutation.py serve).
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi")
from nemojax.data.tokenizer import load_tokenizer  # noqa: E402
from nemojax.inference.requests import Completion  # noqa: E402
from nemojax.serve.app import Server, Ticket, _ClientGone  # noqa: E402
from nemojax.serve.protocol import APIError  # noqa: E402
from nemojax.serve.worker import Failure, WorkerStopped  # noqa: E402

GIVE_UP_S = 3.0  # a test that would otherwise wait forever fails after this


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


class FakeClient:
    """An HTTP request whose body is already read: `receive` blocks until `leave()`, then answers
    the ASGI disconnect message. Counts how often it was read."""

    def __init__(self) -> None:
        self.reads = 0
        self._gone = asyncio.Event()

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        await self._gone.wait()
        return {"type": "http.disconnect"}


class FakeWorker:
    """Accepts requests; answers each after `delay` seconds (None: never) with one completion, or
    with `fail` (a Failure's message); `stopped`: submit raises WorkerStopped with that message."""

    engine = None

    def __init__(self, delay: float | None, fail: str | None = None, stopped: str | None = None) -> None:
        self.delay, self.fail, self.stopped, self.cancelled, self.alive = delay, fail, stopped, [], True

    def submit(self, request: Any, deliver: Any, stream: bool = False) -> None:
        if self.stopped is not None:
            raise WorkerStopped(self.stopped)
        if self.delay is not None:
            done = Failure(request.id, self.fail, False) if self.fail is not None else \
                Completion(request.id, 0, len(request.prompt_ids), [5, 6], "stop")
            asyncio.get_running_loop().call_later(self.delay, deliver, done)

    def cancel(self, request_id: Any) -> None:
        self.cancelled.append(request_id)


def _job() -> SimpleNamespace:
    return SimpleNamespace(requests=[SimpleNamespace(id="r1", params=SimpleNamespace(n=1), prompt_ids=[1, 2, 3])])


async def _collect(server: Server, http: Any, stream: bool) -> list[Any]:
    ticket = Ticket(server, 1)
    return [ev async for ev in server.events(_job(), ticket, http, stream=stream)]


async def _sleep_forever(cancelled: list[bool]) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        cancelled.append(True)
        raise


def test_a_client_that_leaves_during_scoring_has_the_work_cancelled(tok):
    """/v1/reward and /detokenize wait through `until_done` with the body already read: the client
    leaving ends the wait at once (_ClientGone) and cancels the work, with no request timeout to
    fall back on. Kills: no disconnect watcher (`... if http is not None and False`, `if http is
    None`), which waits for the work forever."""
    async def main() -> None:
        server, client, cancelled = Server(None, tok, "m", True), FakeClient(), []
        asyncio.get_running_loop().call_later(0.05, client.leave)
        with pytest.raises(_ClientGone):
            await asyncio.wait_for(server.until_done(_sleep_forever(cancelled), client), GIVE_UP_S)
        await asyncio.sleep(0)
        assert cancelled == [True]

    asyncio.run(main())


def test_work_that_finishes_first_returns_and_stops_watching(tok):
    """The work's result is returned while the client is still there, and the disconnect watcher
    is cancelled with it (no task left reading the ASGI channel)."""
    async def main() -> None:
        server, client = Server(None, tok, "m", True), FakeClient()

        async def work() -> str:
            await asyncio.sleep(0.01)
            return "scores"

        assert await asyncio.wait_for(server.until_done(work(), client), GIVE_UP_S) == "scores"
        await asyncio.sleep(0)
        assert client.reads == 1
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())


def test_the_request_timeout_is_kept_below_a_second(tok):
    """A 50 ms request timeout answers 504 after about 50 ms and cancels the work. Kills: the wait
    floored at 1 s (`max(1.0, deadline - now)`), which answers a second late."""
    async def main() -> None:
        server, cancelled = Server(None, tok, "m", True, request_timeout=0.05), []
        t0 = time.monotonic()
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(server.until_done(_sleep_forever(cancelled), None), GIVE_UP_S)
        waited = time.monotonic() - t0
        assert err.value.status == 504
        assert 0.04 <= waited < 0.6, waited
        await asyncio.sleep(0)
        assert cancelled == [True]

    asyncio.run(main())


def test_a_streaming_request_leaves_the_asgi_channel_to_the_stream(tok):
    """A streaming response reads the ASGI channel itself (Starlette listens for the disconnect
    there); a second reader in `events` would take its messages. Kills: the watcher started for
    streams too (`if http is not None or not stream`)."""
    async def main() -> None:
        server, client = Server(FakeWorker(delay=0.05), tok, "m", True), FakeClient()
        events = await asyncio.wait_for(_collect(server, client, stream=True), GIVE_UP_S)
        assert [type(e) for e in events] == [Completion]
        assert client.reads == 0
        assert server.outstanding == 0

    asyncio.run(main())


def test_a_client_that_leaves_a_generation_cancels_its_requests(tok):
    """Non-streaming generation watches the client: leaving ends the wait with _ClientGone, cancels
    the request in the worker and frees its place in the queue."""
    async def main() -> None:
        worker = FakeWorker(delay=None)
        server, client = Server(worker, tok, "m", True), FakeClient()
        asyncio.get_running_loop().call_later(0.05, client.leave)
        with pytest.raises(_ClientGone):
            await asyncio.wait_for(_collect(server, client, stream=False), GIVE_UP_S)
        assert worker.cancelled == ["r1"]
        assert server.outstanding == 0

    asyncio.run(main())


def test_a_generation_past_its_timeout_answers_504_within_the_timeout(tok):
    """The engine never answers: `events` raises 504 after the 50 ms timeout, cancels the request
    and frees its place. Kills: the wait floored at 1 s (`max(1.0, deadline - now)`)."""
    async def main() -> None:
        worker = FakeWorker(delay=None)
        server = Server(worker, tok, "m", True, request_timeout=0.05)
        t0 = time.monotonic()
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(_collect(server, None, stream=True), GIVE_UP_S)
        assert err.value.status == 504 and time.monotonic() - t0 < 0.6
        assert worker.cancelled == ["r1"] and server.outstanding == 0

    asyncio.run(main())


def test_a_failed_request_is_not_cancelled_again(tok):
    """A Failure ends the request in the worker: `events` yields it and stops without cancelling
    that request (it is no longer the worker's) or counting its sample as aborted. Kills: the
    failed request left among the remaining ones (`remaining.pop(None, None)`)."""
    async def main() -> None:
        worker = FakeWorker(delay=0.01, fail="prompt too long")
        server = Server(worker, tok, "m", True)
        events = await asyncio.wait_for(_collect(server, None, stream=True), GIVE_UP_S)
        assert [type(e) for e in events] == [Failure] and events[0].message == "prompt too long"
        assert worker.cancelled == [] and server.outstanding == 0

    asyncio.run(main())


def test_a_stopped_worker_answers_503_with_its_reason(tok):
    """Submitting to a worker that stopped gives OpenAI's 503 server_error with the worker's own
    reason, and the place in the queue back. Kills: another status (None, 504), no message or
    str(None), no or another error type."""
    async def main() -> None:
        worker = FakeWorker(delay=0.01, stopped="the server is shutting down")
        server = Server(worker, tok, "m", True)
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(_collect(server, None, stream=True), GIVE_UP_S)
        e = err.value
        assert (e.status, e.message, e.type) == (503, "the server is shutting down", "server_error")
        assert server.outstanding == 0

    asyncio.run(main())
