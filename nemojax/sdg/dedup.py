"""Deduplication and decontamination of text records.

- exact: a hash of the normalised text (lowercased, punctuation dropped, whitespace collapsed);
- near: MinHash signatures of word n-gram shingles in a datasketch LSH index; a record whose
  estimated Jaccard similarity to an already kept one reaches `threshold` is dropped;
- decontamination (`Decontaminator`): a record is dropped when it holds an evaluation text
  * `contaminated_exact`: the same text once normalised (case, whitespace, punctuation);
  * `contaminated_prompt`: the evaluation text inside it, clause by clause (normalised; a
    numbered list that goes on past the evaluation text's end is another task, not a copy);
  * `contaminated_twin`: the evaluation text with its list of items in another order ("the
    largest number of 5, 3" for "... of 3, 5": the same task, the same answer);
  * `contaminated_ngram`: a share (`overlap`) of the evaluation text's *distinctive* word
    n-grams. An n-gram found in more than `template_fraction` of all the texts (evaluation and
    pool) belongs to a task template ("Write a Python function f that takes an integer x"),
    which every prompt of the family shares; it is not evidence of contamination, so it is
    ignored. Evaluation answers (`answers=`) are checked this way too. A text shorter than 2n
    words is left to the clause checks above: its n-grams cover nearly all of it, and they
    cannot tell "... of 3, 5" from "... of 3, 5, 7".
Records are visited in order, so the first of a group of duplicates is the one kept.
"""

from __future__ import annotations

import collections
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

_PUNCT = re.compile(r"[^\w\s]")
# Clause boundaries: what ends a question, a statement or a label ("Question:"). Everything else
# that is not a word or an arithmetic sign is spacing.
_TOKEN = re.compile(r"[a-z0-9]+|[+\-*/=<>]|[.?!:;\n,]")
_BOUNDARY = frozenset(".?!:;\n")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def clauses(text: str, *, items_sorted: bool = False) -> tuple[tuple[str, ...], ...]:
    """`text` as normalised clauses: lowercased word / number / arithmetic-sign tokens, split at
    sentence and label punctuation. Case, spacing, quotes and commas never matter; the clause
    structure does (it tells "largest to smallest: 3, 5" from "... 3, 5, 7").

    `items_sorted`: the canonical form a reordered twin shares. A clause that ends in a list of
    comma-separated one-token items ("the largest number of 5, 3", "Sort: b, a, c") has that list
    sorted, so "... of 5, 3" and "... of 3, 5" (the same task, the same answer) read the same."""
    out: list[tuple[str, ...]] = []
    cur: list[str] = []

    def close() -> None:
        if cur:
            out.append(tuple(_sort_items(cur) if items_sorted else [t for t in cur if t != ","]))
            cur.clear()

    for tok in _TOKEN.findall(text.lower()):
        if tok in _BOUNDARY:
            close()
        else:
            cur.append(tok)
    close()
    return tuple(out)


def _sort_items(toks: list[str]) -> list[str]:
    """Commas dropped; a clause-final run `a , b , c` of one-token items sorted (numbers by value)."""
    while toks and toks[-1] == ",":
        toks = toks[:-1]
    start = len(toks) - 1
    while start >= 2 and toks[start - 1] == "," and toks[start - 2] != ",":
        start -= 2
    if start < len(toks) - 1:
        items = sorted(toks[start::2], key=lambda t: (0, int(t), "") if t.isdigit() else (1, 0, t))
        toks = toks[:start] + items
    return [t for t in toks if t != ","]


def ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _joined(cl: Sequence[Sequence[str]]) -> str:
    return " | ".join(" ".join(c) for c in cl)


class ClauseMatcher:
    """Finds given texts inside other texts, clause-aligned (`clauses`).

    A text of one clause matches anywhere inside a clause of the other text; a text of several
    clauses matches a run of clauses whose first ends with its first clause, whose middle ones
    equal its middle ones and whose last starts with its last clause. A match never ends right
    before, or starts right after, a number when the text ends / starts with a number: a list
    that goes on is another list. `find_twins` matches the same way on the canonical forms
    (`clauses(items_sorted=True)`): the texts again, with their item lists in any order.
    `whole_clauses=True`: every clause of a text must equal a whole clause of the other (for short
    texts such as answers: "cat" is not found in "cat has 3 letters")."""

    def __init__(self, texts: Iterable[str], *, whole_clauses: bool = False) -> None:
        texts = list(texts)
        self._copy = _PatternIndex([clauses(t) for t in texts], whole_clauses)
        self._twin = _PatternIndex([clauses(t, items_sorted=True) for t in texts], whole_clauses)

    def find(self, text: str, cl: tuple[tuple[str, ...], ...] | None = None) -> list[int]:
        """Indices of the patterns found in `text` (as copies); `cl`: its clauses, if at hand."""
        return sorted(self._copy.find(clauses(text) if cl is None else cl))

    def find_twins(self, text: str) -> list[int]:
        """Indices of the patterns found in `text` with their item lists reordered (copies included)."""
        return sorted(self._twin.find(clauses(text, items_sorted=True)))


class _PatternIndex:
    """Patterns (clause tuples) by their first clause, with that clause's lengths by last token,
    so a text position costs a few dictionary lookups whatever the number of patterns."""

    def __init__(self, patterns: list[tuple[tuple[str, ...], ...]], whole: bool) -> None:
        self.patterns = patterns
        self.whole = whole
        self.by_first: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
        self.lengths: dict[str, set[int]] = collections.defaultdict(set)
        for i, cl in enumerate(patterns):
            if cl:
                self.by_first[cl[0]].append(i)
                self.lengths[cl[0][-1]].add(len(cl[0]))

    def find(self, cl: tuple[tuple[str, ...], ...]) -> set[int]:
        hits: set[int] = set()
        for j, c in enumerate(cl):
            for end, tok in enumerate(c):
                for n in self.lengths.get(tok, ()):
                    start = end - n + 1
                    if start < 0:
                        continue
                    first = c[start:end + 1]
                    for i in self.by_first.get(first, ()):
                        if self._rest_matches(cl, j, c, start, end, self.patterns[i]):
                            hits.add(i)
        return hits

    def _rest_matches(self, cl: tuple[tuple[str, ...], ...], j: int, c: tuple[str, ...], start: int, end: int,
                      pat: tuple[tuple[str, ...], ...]) -> bool:
        """The pattern's first clause sits at c[start:end + 1] (clause j of cl); does the rest fit?"""
        if _continues_list(c, start, end, pat[0]):
            return False
        if len(pat) == 1:
            return not self.whole or (start == 0 and end == len(c) - 1)
        if end != len(c) - 1 or (self.whole and start != 0) or j + len(pat) > len(cl):
            return False
        if any(cl[j + k] != pat[k] for k in range(1, len(pat) - 1)):
            return False
        last, tail = pat[-1], cl[j + len(pat) - 1]
        if tail[:len(last)] != last or (self.whole and len(tail) != len(last)):
            return False
        return not _continues_list(tail, 0, len(last) - 1, last)


def _continues_list(clause: Sequence[str], start: int, end: int, pat: Sequence[str]) -> bool:
    """Does a number list in the pattern go on in the clause (before its start or after its end)?"""
    after = end + 1 < len(clause) and pat[-1].isdigit() and clause[end + 1].isdigit()
    before = start > 0 and pat[0].isdigit() and clause[start - 1].isdigit()
    return after or before


class Decontaminator:
    """Is a text contaminated by an evaluation set? (the module docstring lists the checks)

    `eval_texts`: evaluation prompts (every check); `answers`: evaluation answers (the n-gram
    check only: short answers such as "The answer is 5." are shared by many tasks).
    `fit_templates(pool)` counts the pool's n-grams too, so template text is known from the
    data being filtered; without it the evaluation texts alone decide what is template."""

    def __init__(self, eval_texts: Iterable[str], n: int = 13, *, answers: Iterable[str] = (),
                 template_fraction: float = 0.01, overlap: float = 0.8, span: int = 8) -> None:
        if not 0.0 < template_fraction <= 1.0 or not 0.0 < overlap <= 1.0 or n < 1 or span < 1:
            raise ValueError("decontamination needs n >= 1, span >= 1, template_fraction and overlap in (0, 1]")
        self.n = n
        self.template_fraction = template_fraction
        self.overlap = overlap
        self.span = span
        prompts = [t for t in eval_texts if clauses(t)]
        self._exact = {_joined(clauses(t)) for t in prompts}
        self._matcher = ClauseMatcher(prompts)
        self._gram_sets = [self._grams(t) for t in [*prompts, *(a for a in answers if clauses(a))]]
        self._df: collections.Counter[str] = collections.Counter()
        self._texts = 0
        self._count(g for g in self._gram_sets)
        self._index()

    def _grams(self, text: str) -> set[str]:
        return ngrams([w for c in clauses(text) for w in c], self.n)

    def _count(self, gram_sets: Iterable[set[str]]) -> None:
        for g in gram_sets:
            self._df.update(g)
            self._texts += 1

    def fit_templates(self, pool_texts: Iterable[str]) -> "Decontaminator":
        """Count the n-grams of the texts to be filtered: an n-gram in more than
        `template_fraction` of evaluation + pool texts is template."""
        self._count(self._grams(t) for t in pool_texts)
        self._index()
        return self

    def is_template(self, gram: str) -> bool:
        """In more than `template_fraction` of the texts counted, and in at least 3 of them (an
        evaluation text and one copy of it are 2)."""
        df = self._df[gram]
        return df >= 3 and df > self.template_fraction * self._texts

    def _index(self) -> None:
        """Each evaluation text's distinctive n-grams and how many of them a record must share."""
        self._need: list[int] = []
        self._by_gram: dict[str, list[int]] = collections.defaultdict(list)
        for i, grams in enumerate(self._gram_sets):
            if len(grams) <= self.n:  # shorter than 2n words: the clause checks see all of it
                self._need.append(0)
                continue
            own = [g for g in grams if not self.is_template(g)]
            self._need.append(min(self.span, max(1, math.ceil(self.overlap * len(own)))))
            for g in own:
                self._by_gram[g].append(i)

    def contaminated(self, text: str) -> str | None:
        """The reason `text` is contaminated (see the module docstring), or None when clean."""
        if _joined(clauses(text)) in self._exact:
            return "contaminated_exact"
        if self._matcher.find(text):
            return "contaminated_prompt"
        if self._matcher.find_twins(text):
            return "contaminated_twin"
        shared: collections.Counter[int] = collections.Counter()
        for g in self._grams(text):
            for i in self._by_gram.get(g, ()):
                shared[i] += 1
        if any(k >= self._need[i] > 0 for i, k in shared.items()):
            return "contaminated_ngram"
        return None


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


def dedup_verdicts(texts: Sequence[str], *, decontaminate: Decontaminator | None = None,
                   **kw: Any) -> list[str | None]:
    """Per text: None when kept, else the drop reason (contamination first, then duplication)."""
    d = Deduplicator(**kw)
    out: list[str | None] = []
    for t in texts:
        reason = decontaminate.contaminated(t) if decontaminate is not None else None
        out.append(reason or d.check(t))
    return out


def dedup_texts(texts: Sequence[str], *, decontaminate: Decontaminator | None = None,
                **kw: Any) -> tuple[list[int], collections.Counter[str]]:
    """Indices of the texts kept, and drops by reason."""
    verdicts = dedup_verdicts(texts, decontaminate=decontaminate, **kw)
    return [i for i, v in enumerate(verdicts) if v is None], collections.Counter(v for v in verdicts if v)


def counts_by_group(groups: Sequence[Any], verdicts: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """{group: {"in", "kept", "dropped": {reason: n}}} for one label per text (e.g. task family)."""
    out: dict[str, dict[str, Any]] = {}
    for g, v in zip(groups, verdicts):
        entry = out.setdefault(str(g), {"in": 0, "kept": 0, "dropped": {}})
        entry["in"] += 1
        if v is None:
            entry["kept"] += 1
        else:
            entry["dropped"][v] = entry["dropped"].get(v, 0) + 1
    return {k: out[k] for k in sorted(out)}
