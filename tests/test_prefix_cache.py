"""The prefix cache's index (exact block chains, LRU eviction) and incremental detokenization,
on their own (no model): the engine tests check what they do to outputs."""

from __future__ import annotations

import numpy as np
import pytest

from nemojax.data.tokenizer import load_tokenizer
from nemojax.inference.detokenize import IncrementalText, StopMatcher
from nemojax.inference.prefix_cache import PrefixCache


def test_blocks_match_only_when_everything_before_them_matches():
    pc = PrefixCache(num_blocks=8, block_size=4)
    a = list(range(100, 113))  # 3 full blocks + 1 token
    assert pc.match(a) == []
    new = pc.insert(a)
    assert [i for i, _ in new] == [0, 1, 2] and len({b for _, b in new}) == 3
    assert pc.match(a) == [b for _, b in new]
    assert pc.match(a[:8] + [0] * 5) == [b for _, b in new][:2]  # diverges in block 3
    assert pc.match([0] + a[1:]) == []  # same later blocks, different first token: no match
    assert pc.insert(a) == []  # already cached
    b = a[:4] + [7, 7, 7, 7]
    extra = pc.insert(b)  # shares block 0, adds its own block 1
    assert [i for i, _ in extra] == [1] and pc.match(b) == [new[0][1], extra[0][1]]


def test_least_recently_used_blocks_are_evicted_first_and_parents_last():
    pc = PrefixCache(num_blocks=4, block_size=2)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    pc.insert(x)
    pc.insert(y)
    assert len(pc) == 4
    pc.match(x)  # x is now more recent than y
    z = [9, 9, 9, 9]
    got = pc.insert(z)  # needs 2 blocks: y's go
    assert len(got) == 2 and pc.match(y) == [] and len(pc.match(x)) == 2
    assert pc.stats["evicted_blocks"] == 2
    # a lookup refreshes a chain from its end, so a prefix's first block outlives its children
    pc.match(z)
    pc.match(x)
    pc.insert([3, 3])  # one block: the LRU one is z's second block (z's first was refreshed later)
    assert pc.match(z[:2] + [0, 0]) != [] and len(pc.match(z)) == 1


def test_protected_blocks_are_not_evicted_and_a_full_pool_shortens_the_insert():
    pc = PrefixCache(num_blocks=2, block_size=2)
    kept = pc.insert([1, 1, 2, 2])
    blocks = [b for _, b in kept]
    assert pc.insert([3, 3, 4, 4], protect=blocks) == []  # nothing evictable
    assert pc.match([1, 1, 2, 2]) == blocks
    pc.clear()
    assert pc.match([1, 1, 2, 2]) == [] and len(pc) == 0


def test_incremental_text_equals_decoding_everything_at_once():
    """Random ids (byte-fallback pieces, multi-byte characters, leading spaces included)."""
    tok = load_tokenizer("builtin")
    rng = np.random.default_rng(0)
    samples = [rng.integers(3, tok.vocab_size, size=int(rng.integers(1, 60))).tolist() for _ in range(40)]
    samples += [tok.encode(s) for s in ["naïve café 日本語 🙂 done", "  two  spaces", "x\n\ny", "Ünïcödé" * 5]]
    for ids in samples:
        inc = IncrementalText(tok)
        parts = [inc.add(t) for t in ids] + [inc.flush()]
        assert "".join(parts) == inc.text == tok.decode(ids)
        # a prefix of the text is final whenever it is emitted (never revised later)
        inc2, seen = IncrementalText(tok), ""
        for k, t in enumerate(ids):
            seen += inc2.add(t)
            assert tok.decode(ids[:k + 1]).startswith(seen)


def test_stop_matcher_looks_only_at_new_text_and_holds_back_a_possible_start():
    m = StopMatcher(["END", "\n\n"])
    assert m.search("abc", 0) == -1 and m.safe_length("abcEN") == 3  # "EN" may become "END"
    assert m.search("abcEN", 3) == -1 and m.search("abcEND", 5) == 3
    assert m.search("xx\n\nyy", 3) == 2
    assert StopMatcher([]).safe_length("abc") == 3 and StopMatcher([]).search("abc", 0) == -1


def test_counters_clear_partial_blocks_and_arguments():
    """Mutants (docs/TESTING.md, prefix_cache survivors): clear() rebuilding a shorter or wrong
    free list; `_chunks` taking a final partial block; a block inserted by this call evicted by
    the same call (`keep.add(None)`); stats counters starting at 1 or set / decremented instead of
    added (the server's prefix-cache metrics read them); the constructor's argument checks."""
    cache = PrefixCache(num_blocks=3, block_size=2)
    assert cache.stats == {"lookups": 0, "hit_blocks": 0, "inserted_blocks": 0, "evicted_blocks": 0}
    # full blocks only: 5 tokens of block size 2 are two blocks; 3 tokens are one
    assert [i for i, _ in cache.insert([1, 2, 3, 4, 5])] == [0, 1]
    assert [i for i, _ in cache.insert([7, 8, 9])] == [0]
    assert cache.stats["inserted_blocks"] == 3 and len(cache) == 3
    assert cache.match([1, 2, 3, 4, 6]) and cache.stats["lookups"] == 1 and cache.stats["hit_blocks"] == 2
    # a 3-block prefix into a full pool: its own new blocks are never evicted to make room for it
    got = cache.insert([11, 12, 13, 14, 15, 16])
    assert len({b for _, b in got}) == len(got) == 3 and cache.stats["evicted_blocks"] == 3
    assert cache.stats["inserted_blocks"] == 6
    # clear: every block is handed out again, each once
    cache.clear()
    assert len(cache) == 0 and cache.match([11, 12]) == []
    again = cache.insert([21, 22, 23, 24, 25, 26])
    assert sorted(b for _, b in again) == [0, 1, 2] and cache.stats["evicted_blocks"] == 3
    # arguments: an empty pool and one-token blocks are valid; negative sizes are refused by name
    assert PrefixCache(num_blocks=0, block_size=1).insert([1, 2]) == []
    assert len(PrefixCache(num_blocks=2, block_size=1).insert([1, 2])) == 2
    # more new blocks than the pool: the call stops early rather than evict its own first blocks
    assert [i for i, _ in PrefixCache(num_blocks=2, block_size=1).insert([1, 2, 3])] == [0, 1]
    for bad in ((-1, 2), (2, 0)):
        with pytest.raises(ValueError, match="num_blocks >= 0 and block_size >= 1"):
            PrefixCache(*bad)


def test_a_later_block_never_matches_as_a_prompts_first_block():
    """The third block of one prompt, seen as the first block of another, is not a hit: its
    cached KV was computed after two other blocks. Entry ids key their children, so an entry id
    equal to the root's (0) would file a third block under the root. Kills `_next_id -= 1`
    (ids 1, 0, -1: the second block takes the root's id)."""
    cache = PrefixCache(num_blocks=8, block_size=2)
    assert len(cache.insert([1, 2, 3, 4, 5, 6])) == 3
    assert cache.match([5, 6, 7, 8]) == [] and cache.match([3, 4]) == []
    assert len(cache.match([1, 2, 3, 4, 5, 6, 7])) == 3
