"""Deduplication and decontamination of text records.

- exact: a hash of the normalised text (lowercased, punctuation dropped, whitespace collapsed);
- near: MinHash signatures of word n-gram shingles in a datasketch LSH index; a record whose
  estimated Jaccard similarity to an already kept one reaches `threshold` is dropped;
- decontamination: a record sharing any word n-gram (default 13 words, as in GPT-3's and
  Nemotron's filtering) with a given evaluation set is dropped; an evaluation text shorter than
  n words counts when it occurs whole in the record.
Records are visited in order, so the first of a group of duplicates is the one kept.
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Iterable
from typing import Any

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    def __init__(self, eval_texts: Iterable[str], n: int = 13) -> None:
        self.n = n
        self.grams: set[str] = set()
        self.short: list[str] = []
        for t in eval_texts:
            words = normalise(t).split()
            if len(words) >= n:
                self.grams |= ngrams(words, n)
            elif words:
                self.short.append(" ".join(words))

    def contaminated(self, text: str) -> bool:
        norm = normalise(text)
        words = norm.split()
        if len(words) >= self.n and not self.grams.isdisjoint(ngrams(words, self.n)):
            return True
        padded = f" {norm} "
        return any(f" {s} " in padded for s in self.short)


class Deduplicator:
    def __init__(self, *, exact: bool = True, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
                 shingle: int = 3, seed: int = 1) -> None:
        self.exact = exact
        self.near = near
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        self._hashes: set[str] = set()
        self._lsh = None
        self._count = 0
        if near:
            from datasketch import MinHashLSH

            try:
                self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            except ValueError as e:
                raise ValueError(f"near-duplicate threshold {threshold} with num_perm {num_perm}: {e}; "
                                 f"raise num_perm or lower the threshold") from None

    def _minhash(self, words: list[str]) -> Any:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        grams = ngrams(words, self.shingle) if len(words) >= self.shingle else {" ".join(words)}
        for g in sorted(grams):
            m.update(g.encode("utf-8"))
        return m

    def check(self, text: str) -> str | None:
        """None when `text` is new (it is then remembered), else the drop reason."""
        norm = normalise(text)
        digest = hashlib.sha1(norm.encode()).hexdigest()
        if self.exact and digest in self._hashes:
            return "exact_duplicate"
        m = None
        if self._lsh is not None and norm:
            m = self._minhash(norm.split())
            if self._lsh.query(m):
                return "near_duplicate"
        self._hashes.add(digest)
        if m is not None:
            self._lsh.insert(f"r{self._count}", m)
        self._count += 1
        return None


def dedup_texts(texts: list[str], *, decontaminate: Decontaminator | None = None, **kw: Any
                ) -> tuple[list[int], collections.Counter[str]]:
    """Indices of the texts kept, and drops by reason."""
    d = Deduplicator(**kw)
    kept, dropped = [], collections.Counter()
    for i, t in enumerate(texts):
        if decontaminate is not None and decontaminate.contaminated(t):
            dropped["contaminated"] += 1
            continue
        reason = d.check(t)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(i)
    return kept, dropped
