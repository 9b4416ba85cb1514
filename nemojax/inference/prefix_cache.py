"""Host-side index of the prefix cache: which pool block holds the keys/values of which tokens.

The device keeps a pool of KV blocks ([layers, blocks, block_size, kv_heads, head_dim], see
engine.py). A block is identified by its tokens *and everything before them*: its key is
(key of the previous block, its own tokens), so two prompts share a block only when they agree
on every token up to its end. Keys are exact (tuples compared by value, never a lossy hash).

- `match(tokens)`: the pool blocks of the longest run of full leading blocks already cached.
- `insert(tokens, have)`: reserve pool blocks for the full blocks not cached yet; the caller
  copies their keys/values in from the slot that just computed them.
- Eviction: least recently used first. A lookup refreshes the blocks it returns from the
  last to the first, so a prefix's first blocks (shared by the most prompts) are evicted last;
  a block whose parent was evicted can no longer be matched and ages out.

Cached keys/values are copied into a slot before use, so evicting a block never affects a
running sample.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

_ROOT = 0  # parent id of a prompt's first block


@dataclass
class _Entry:
    id: int  # unique, never reused: children refer to it
    key: tuple[int, tuple[int, ...]]
    block: int  # pool index


class PrefixCache:
    """LRU map from token-block chains to pool blocks (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"need num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self._by_key: dict[tuple[int, tuple[int, ...]], _Entry] = {}
        self._lru: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # by block, oldest first
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._next_id = 1
        self.stats = {"lookups": 0, "hit_blocks": 0, "inserted_blocks": 0, "evicted_blocks": 0}

    def __len__(self) -> int:
        return len(self._lru)

    def _chunks(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        bs = self.block_size
        return [tuple(tokens[i:i + bs]) for i in range(0, len(tokens) - bs + 1, bs)]

    def _walk(self, tokens: Sequence[int]) -> list[_Entry]:
        found, parent = [], _ROOT
        for chunk in self._chunks(tokens):
            entry = self._by_key.get((parent, chunk))
            if entry is None:
                break
            found.append(entry)
            parent = entry.id
        return found

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Pool blocks holding the longest cached run of full leading blocks of `tokens`."""
        if not self.num_blocks:
            return []
        found = self._walk(tokens)
        for entry in reversed(found):  # first blocks end up most recently used
            self._lru.move_to_end(entry.block)
        self.stats["lookups"] += 1
        self.stats["hit_blocks"] += len(found)
        return [e.block for e in found]

    def insert(self, tokens: Sequence[int], protect: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Reserve pool blocks for the full blocks of `tokens` that are not cached yet.

        Returns (block index within `tokens`, pool block) pairs the caller must fill. Evicts
        least recently used blocks when the pool is full, never one in `protect` or one of
        this prefix's own chain; stops early (a shorter cached prefix) when nothing is evictable.
        """
        if not self.num_blocks:
            return []
        chunks = self._chunks(tokens)
        chain = self._walk(tokens)
        keep = set(protect) | {e.block for e in chain}
        parent = chain[-1].id if chain else _ROOT
        out = []
        for index in range(len(chain), len(chunks)):
            block = self._allocate(keep)
            if block is None:
                break
            entry = _Entry(self._next_id, (parent, chunks[index]), block)
            self._next_id += 1
            self._by_key[entry.key] = entry
            self._lru[block] = entry
            keep.add(block)
            parent = entry.id
            out.append((index, block))
        for entry in reversed(chain):
            self._lru.move_to_end(entry.block)
        self.stats["inserted_blocks"] += len(out)
        return out

    def _allocate(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for block, entry in self._lru.items():  # oldest first
            if block not in keep:
                del self._lru[block]
                del self._by_key[entry.key]
                self.stats["evicted_blocks"] += 1
                return block
        return None

    def clear(self) -> None:
        self._by_key.clear()
        self._lru.clear()
        self._free = list(range(self.num_blocks - 1, -1, -1))
