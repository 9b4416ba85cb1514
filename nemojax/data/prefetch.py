"""Background prefetching for a resumable batch iterator, without losing exact resume.

Reading and tokenizing raw JSONL/Parquet text costs real CPU time (the built-in corpus is
cached pre-tokenized and rarely needs this). `Prefetch` runs the wrapped iterator in a
thread a few batches ahead, so that work overlaps the (asynchronously dispatched) train
step; SentencePiece and numpy release the GIL while they work.

Resume stays exact: each prefetched batch travels with the iterator state *after* it, and
`get_state()` returns the state of the last batch actually handed out, not of the ones
waiting in the queue.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol


class ResumableIterator(Protocol):
    def __next__(self) -> dict[str, Any]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


class Prefetch:
    """Wrap `inner` (e.g. a BatchIterator) to produce up to `depth` batches ahead in a thread."""

    def __init__(self, inner: ResumableIterator, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.inner = inner
        self.depth = depth
        self._state = inner.get_state()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Prefetch:
        return self

    def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item: tuple[Any, Any, BaseException | None] = (next(self.inner), self.inner.get_state(), None)
                self._put(q, stop, item)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(q, stop, (None, None, e))

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            self._queue = queue.Queue(self.depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._worker, args=(self._queue, self._stop),
                                            name="nemojax-data-prefetch", daemon=True)
            self._thread.start()
        assert self._queue is not None
        batch, state, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        self._state = state
        return batch

    def get_state(self) -> dict[str, Any]:
        """The stream position after the last batch returned by `__next__`."""
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.inner.set_state(state)
        self._state = self.inner.get_state()

    def close(self) -> None:
        """Stop the worker and drop prefetched batches, rewinding the inner iterator to the
        last batch handed out (so iterating again continues exactly where the consumer is)."""
        if self._thread is None:
            return
        self._stop.set()
        assert self._queue is not None
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        self._queue = None
        self.inner.set_state(self._state)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
