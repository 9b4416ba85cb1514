"""Data: tokenizer and chat template, the built-in corpus, and the pretraining pipeline.

Modules (one idea each):
- `tokenizer`     SentencePiece wrapper (`Tokenizer`, `load_tokenizer`, `train_tokenizer`,
                  `unigram_entropy`)
- `chat_template` Nemotron-4 chat formatting (`format_chat`)
- `corpus`        the default corpus built from the Python stdlib (`builtin_documents`)
- `sources`       JSONL / Parquet / ArrayRecord readers (`write_array_record`)
- `length_index`  every document's token count per source file, so rows are planned without
                  reading documents (`nemojax tokenizer index`)
- `indexed_source` a source opened for host-local reading: lengths for all, tokens on demand
- `packing`       documents -> fixed-length rows with segment ids
- `pretrain`      the grain pipeline (`make_batch_iterator`)
- `prefetch`      grain's background-thread prefetch, keeping exact resume (`Prefetch`)

Names are re-exported lazily so `import nemojax.data` stays cheap (grain and
sentencepiece load only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "unigram_entropy": "tokenizer", "format_chat": "chat_template", "builtin_documents": "corpus",
    "write_array_record": "sources", "DataError": "sources", "make_batch_iterator": "pretrain",
    "BatchIterator": "pretrain", "Prefetch": "prefetch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
