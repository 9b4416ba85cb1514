"""The one thread that drives the sampling engine for the HTTP server.

JAX state (the KV cache, the compiled prefill/decode) lives in a single `Engine` that is not
thread-safe, while HTTP requests arrive on the server's event loop at any time. So exactly one
background thread owns the engine: handlers only put messages into its inbox (submit / cancel)
and get events back through a callback, which the thread calls for

- `Progress`: the tokens a running sample generated since its last Progress, one
  `TokenDelta` each (for requests the engine streams, `Request.stream`; always before that
  sample's Completion),
- `Completion` (the engine's record): a sample finished,
- `Failure`: the request could not run (`client_error=True`: the engine rejected it, e.g. a
  prompt too long) or the engine itself failed (`client_error=False`; the worker then stops
  taking work and `error` holds the exception, so /health can report it).

Between decode chunks the thread drains its inbox, so a request that arrives while others are
decoding is prefilled into the next free slot and joins the running batch (continuous batching):
concurrent HTTP requests share every decode step instead of queueing behind each other.
Callbacks run on this thread and must be quick (the app's only hops onto its event loop).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

from nemojax.inference.engine import Engine
from nemojax.inference.requests import Completion, Request, TokenDelta

log = logging.getLogger("nemojax.serve")


@dataclass
class Progress:
    """New tokens of one running sample: `deltas` (one TokenDelta per token, in order) and
    `output_ids`, all its output ids so far."""

    request_id: Any
    sample_index: int
    output_ids: list[int]
    deltas: list[TokenDelta] = field(default_factory=list)


@dataclass
class Failure:
    """A request that will produce no (more) completions; `message` says why."""

    request_id: Any
    message: str
    client_error: bool


Event = Union[Progress, Completion, Failure]
Callback = Callable[[Event], None]


@dataclass
class _Subscription:
    callback: Callback
    stream: bool
    remaining: int  # samples not finished yet
    ids: dict[int, list[int]] = field(default_factory=dict)  # streaming: ids reported per sample


class WorkerStopped(RuntimeError):
    """The worker is not running (never started, stopped, or failed); no request can run."""


class EngineWorker:
    """Owns `engine` on a background thread; see the module docstring.

    stats (read from any thread, approximate while running): "steps" (engine steps run),
    "max_running" (most samples decoded together in one step, i.e. the batch size reached),
    "requests" (requests accepted), "completion_tokens" (tokens generated), "active_requests"
    (requests accepted and not yet finished or cancelled)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._subs: dict[Any, _Subscription] = {}
        self._paused = False
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.error: BaseException | None = None
        self.stats: dict[str, int] = {"steps": 0, "max_running": 0, "requests": 0,
                                      "completion_tokens": 0, "active_requests": 0}

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> "EngineWorker":
        """Start the thread (idempotent while it runs)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nemojax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail whatever is still in flight, then end the thread."""
        self._stopped = True
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self.error is None
                and not self._stopped)

    def pause(self) -> None:
        """Keep accepting submissions but run no engine step until `resume` (drain / tests)."""
        self._inbox.put(("pause", True))

    def resume(self) -> None:
        self._inbox.put(("pause", False))

    def submit(self, request: Request, callback: Callback, stream: bool = False) -> None:
        """Queue `request`; `callback` gets its events on the worker thread.

        Raises WorkerStopped when no thread would ever answer. Request ids must be unique
        among requests in flight.
        """
        if not self.alive:
            raise WorkerStopped(self.why_unavailable())
        if stream and not request.stream:  # the engine keeps per-token deltas only when asked
            request = dataclasses.replace(request, stream=True)
        self._inbox.put(("submit", request, callback, stream))

    def cancel(self, request_id: Any) -> None:
        """Forget `request_id` (client gone): its slots are freed, no more events are sent."""
        self._inbox.put(("cancel", request_id))

    def generate(self, requests: Iterable[Request], timeout: float | None = None) -> list[Completion]:
        """Blocking convenience: submit `requests`, wait for all their samples.

        Returns the completions ordered by (request order, sample index); raises ValueError
        (client error) or RuntimeError (engine failure) when a request fails.
        """
        reqs = list(requests)
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        for r in reqs:
            self.submit(r, events.put)
        want = sum(r.params.n for r in reqs)
        done: list[Completion] = []
        while len(done) < want:
            ev = events.get(timeout=timeout)
            if isinstance(ev, Failure):
                for r in reqs:
                    self.cancel(r.id)
                raise (ValueError if ev.client_error else RuntimeError)(ev.message)
            if isinstance(ev, Completion):
                done.append(ev)
        index = {r.id: i for i, r in enumerate(reqs)}
        return sorted(done, key=lambda c: (index[c.request_id], c.sample_index))

    def why_unavailable(self) -> str:
        """Why `alive` is False, in words for an error body or /health."""
        if self.error is not None:
            return f"the engine failed earlier ({type(self.error).__name__}: {self.error}); restart the server"
        if self._stopped:
            return "the server is shutting down"
        return "the engine worker is not running"

    # ------------------------------------------------------------------ the thread

    def _emit(self, sub: _Subscription, event: Event) -> None:
        try:
            sub.callback(event)
        except Exception:  # a client that went away must not take the engine down
            log.exception("dropping an event for request %r: its callback failed", event.request_id)

    def _handle(self, msg: tuple[Any, ...]) -> bool:
        """Apply one inbox message; False on stop."""
        kind = msg[0]
        if kind == "stop":
            return False
        if kind == "pause":
            self._paused = bool(msg[1])
        elif kind == "cancel":
            if self._subs.pop(msg[1], None) is not None:
                self.engine.cancel(msg[1])
        elif kind == "submit":
            _, request, callback, stream = msg
            sub = _Subscription(callback, stream, request.params.n)
            if request.id in self._subs:
                self._emit(sub, Failure(request.id, f"request id {request.id!r} is already in flight",
                                        client_error=True))
            elif self.error is not None or self._stopped:
                self._emit(sub, Failure(request.id, self.why_unavailable(), client_error=False))
            else:
                try:
                    self.engine.submit(request)
                except ValueError as e:
                    self._emit(sub, Failure(request.id, str(e), client_error=True))
                else:
                    self._subs[request.id] = sub
                    self.stats["requests"] += 1
        return True

    def _loop(self) -> None:
        running = True
        while running:
            idle = self._paused or not self.engine.has_work
            try:
                msg = self._inbox.get() if idle else self._inbox.get_nowait()
            except queue.Empty:
                msg = None
            while msg is not None and running:
                running = self._handle(msg)
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
            self.stats["active_requests"] = len(self._subs)
            if not running or self._paused or not self.engine.has_work:
                continue
            try:
                self._step()
            except Exception as e:  # device / compile failure: nothing in flight can finish
                log.exception("engine step failed; failing %d request(s) in flight", len(self._subs))
                self.error = e
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                running = False
            self.stats["active_requests"] = len(self._subs)
        self._stopped = True
        self._fail_all(self.why_unavailable())
        # Answer submissions that raced with the stop.
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "submit":
                self._emit(_Subscription(msg[2], msg[3], 0),
                           Failure(msg[1].id, self.why_unavailable(), client_error=False))

    def _step(self) -> None:
        engine = self.engine
        done = engine.step()
        take = getattr(engine, "take_deltas", None)
        deltas = take() if take is not None else []
        self.stats["steps"] += 1
        running = engine.running() if hasattr(engine, "running") else len(engine.in_flight())
        # Samples that shared this step: those still running plus those that just finished.
        self.stats["max_running"] = max(self.stats["max_running"], running + len(done))
        grouped: dict[tuple[Any, int], list[TokenDelta]] = {}
        for d in deltas:
            grouped.setdefault((d.request_id, d.sample_index), []).append(d)
        for (rid, index), items in grouped.items():
            sub = self._subs.get(rid)
            if sub is None or not sub.stream:
                continue
            ids = sub.ids.setdefault(index, [])
            ids += [d.token_id for d in items]
            self._emit(sub, Progress(rid, index, list(ids), items))
        for c in done:
            self.stats["completion_tokens"] += c.completion_tokens
            sub = self._subs.get(c.request_id)
            if sub is None:  # cancelled meanwhile
                continue
            sub.remaining -= 1
            if sub.remaining <= 0:
                del self._subs[c.request_id]
            self._emit(sub, c)

    def _fail_all(self, message: str) -> None:
        subs, self._subs = self._subs, {}
        for rid, sub in subs.items():
            try:
                self.engine.cancel(rid)
            except Exception:
                pass
            self._emit(sub, Failure(rid, message, client_error=False))
