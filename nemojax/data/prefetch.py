"""Background prefetching for a resumable batch iterator, without losing exact resume.

Reading and tokenizing raw JSONL/Parquet text costs real CPU time. `Prefetch` runs the wrapped
iterator a few batches ahead in a thread, so that work overlaps the (asynchronously
dispatched) train step; SentencePiece and numpy release the GIL while they work.

It is grain's own thread prefetcher, `grain.experimental.ThreadPrefetchDatasetIterator`, whose
semantics are the ones exact resume needs: it accepts any iterator with `get_state` /
`set_state` (a `BatchIterator`), each prefetched batch travels with a copy of the iterator
state *after* it, and `get_state()` returns the state of the last batch handed out, not of
those waiting in the queue; an error raised in the thread reaches the consumer after the
batches produced before it, with the state of the last of them. One thing is added: `close()`
stops the thread and rewinds the wrapped iterator to the consumer's position (grain's `close`
ends the iterator for good), so a caller may pause and go on.
"""

from __future__ import annotations

from typing import Any, Protocol

from grain.experimental import ThreadPrefetchDatasetIterator


class ResumableIterator(Protocol):
    def __next__(self) -> dict[str, Any]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


class Prefetch(ThreadPrefetchDatasetIterator):
    """Wrap `inner` (e.g. a BatchIterator) to produce up to `depth` batches ahead in a thread."""

    def __init__(self, inner: ResumableIterator, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        super().__init__(inner, depth)
        self.inner = inner
        self.depth = depth

    def close(self) -> None:
        """Stop the worker and drop prefetched batches, rewinding the inner iterator to the
        last batch handed out (so iterating again continues exactly where the consumer is)."""
        self.set_state(self.get_state())
