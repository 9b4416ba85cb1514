"""Incremental detokenization and stop-string matching, O(new tokens) per step.

Decoding the whole output again after every token (and searching all of it for stop strings)
costs O(n^2) over a sample; at thousands of tokens per sample and dozens of samples per step
that host work would rival the decode step itself. Instead each sample keeps

- `IncrementalText`: the text of its tokens so far, extended per token by decoding only a
  short window (the last emitted token plus the new ones): SentencePiece drops a piece's
  leading space at the start of a decode and joins byte pieces into characters, so a token's
  text is decode(window + token) minus decode(window). A token that ends inside a multi-byte
  character contributes nothing until the character is complete;
- `StopMatcher`: searches only the newly added text plus the `longest stop - 1` characters
  before it, and knows how much of the text can no longer become part of a stop string (what
  a stream may send).
"""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


class IncrementalText:
    """The decoded text of a growing token list; `add` returns what each new token appended."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: the last token whose text was already emitted
        self._read = 0  # tokens [0, _read) are reflected in `text`

    def add(self, token: int) -> str:
        """Append one token; returns the text it completed ("" while a character is partial)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    @property
    def decoded(self) -> int:
        """Leading tokens whose text is in `text` (the rest wait for a character to complete)."""
        return self._read

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._tok.decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        now = self._tok.decode(self.ids[self._prefix:])
        if not final and now.endswith(REPLACEMENT):
            return ""
        delta = now[len(before):] if now.startswith(before) else now
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Finds the first occurrence of any stop string in text that grows at the end."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def search(self, text: str, old_len: int) -> int:
        """Index in `text` where a stop string starts, looking only at what may contain one
        that was not there when the text had `old_len` characters; -1 if none."""
        if not self.stops:
            return -1
        begin = max(0, old_len - self.hold)
        hits = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """Characters of `text` that no later token can turn into the start of a stop string."""
        return len(text) - self.hold if self.stops else len(text)
