"""One pretraining source opened for host-local reading: lengths for everyone, tokens on demand.

Planning the rows of the global stream needs every document's token count; filling a row needs
the tokens of its documents only. `open_source` gives both from a source config: `lengths`
(from the length index of each file, nemojax.data.length_index, or the built-in corpus cache)
and `read(ids)`, which reads and -- for text -- tokenizes just those documents, checks each
against its indexed length and the tokenizer's vocabulary, and counts what it did (`counts`),
so a process' data work can be measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemojax.data.length_index import concat_lengths, length_index
from nemojax.data.sources import (ArrayRecordFile, ConcatSource, DataError, JsonlFile, ParquetFile,
                                  TokenArraySource, expand_paths, infer_format)
from nemojax.data.tokenizer import Tokenizer


@dataclass
class ReadCounts:
    """Documents this source read (and tokenized) for rows, and the tokens they hold."""

    documents: int = 0
    tokenized: int = 0
    tokens: int = 0

    def add(self, other: ReadCounts) -> None:
        self.documents += other.documents
        self.tokenized += other.tokenized
        self.tokens += other.tokens


class IndexedSource:
    """Documents of one source: `lengths[i]` for any i, `read(ids)` for the few a process needs."""

    def __init__(self, label: str, docs: Any, lengths: np.ndarray, index_files: list[str], *,
                 tokenizer: Tokenizer, text: bool) -> None:
        self.label = label
        self.docs = docs
        self.lengths = lengths
        self.index_files = index_files
        self.tokenizer = tokenizer
        self.text = text
        self.counts = ReadCounts()

    def __len__(self) -> int:
        return len(self.lengths)

    def _index_of(self, i: int) -> str:
        if isinstance(self.docs, ConcatSource):
            return self.index_files[self.docs.locate(i)[0]]
        return self.index_files[0]

    def read(self, ids: Sequence[int]) -> list[np.ndarray]:
        """Token arrays of documents `ids` (no bos/eos), in that order."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        if isinstance(self.docs, TokenArraySource):
            raw: list[Any] = [self.docs[i] for i in ids]
        else:
            raw = self.docs.read_many(ids)
        if self.text:
            arrays = [np.asarray(x, np.int32) for x in self.tokenizer.encode_batch(raw)]
        else:
            arrays = [np.asarray(x, np.int32) for x in raw]
            vocab = self.tokenizer.vocab_size
            for i, a in zip(ids, arrays):
                if a.size and (a.max() >= vocab or a.min() < 0):
                    bad = int(a.max()) if a.max() >= vocab else int(a.min())
                    raise DataError(f"{self.label}: document {i} has token id {bad} outside the tokenizer's "
                                    f"vocabulary of {vocab}; it was tokenized with another model")
        for i, a in zip(ids, arrays):
            if len(a) != int(self.lengths[i]):
                raise DataError(f"{self.label}: document {i} has {len(a)} tokens but its length index says "
                                f"{int(self.lengths[i])}: {self._index_of(i)} does not describe this data (it "
                                f"changed after the index was written); delete the index to rebuild it")
        self.counts.documents += len(ids)
        self.counts.tokenized += len(ids) if self.text else 0
        self.counts.tokens += sum(len(a) for a in arrays)
        return arrays


def open_source(path: str, fmt: str, text_field: str, tokenizer: Tokenizer, label: str) -> IndexedSource:
    """Open a source (file, directory, glob or builtin:NAME) with the length index of each file."""
    fmt = infer_format(path) if fmt == "auto" else fmt
    if fmt == "builtin":
        from nemojax.data.token_cache import builtin_tokens

        name = path.split(":", 1)[1] if path.startswith("builtin:") else path
        try:
            docs = builtin_tokens(name, tokenizer)
        except ValueError as e:
            raise DataError(f"{label}: {e}") from None
        return IndexedSource(label, docs, np.asarray(docs.lengths(), np.int32), ["the built-in corpus cache"],
                             tokenizer=tokenizer, text=False)
    if fmt not in ("jsonl", "parquet", "arrayrecord"):
        raise DataError(f"{label}: unknown format {fmt!r}; use jsonl, parquet, arrayrecord or builtin")
    files, parts, where = [], [], []
    for f in expand_paths(path, label):
        index = length_index(Path(f), fmt, text_field, tokenizer, label)
        if fmt == "jsonl":
            files.append(JsonlFile(f, text_field, spans=index.spans))
        elif fmt == "parquet":
            files.append(ParquetFile(f, text_field))
        else:
            files.append(ArrayRecordFile(f))
        parts.append(index.lengths)
        where.append(index.where)
    docs = ConcatSource(files)
    lengths = concat_lengths(parts)
    for f, n, w in zip(files, parts, where):
        if len(f) != len(n):
            raise DataError(f"{label}: {w} lists {len(n)} documents, {f.path} holds {len(f)}; the index is stale, "
                            f"delete it to rebuild")
    return IndexedSource(label, docs, lengths, where, tokenizer=tokenizer, text=fmt != "arrayrecord")
