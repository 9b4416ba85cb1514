"""On-disk cache of the tokenized built-in corpus.

Tokenizing ~12 MB of stdlib text takes several seconds on a laptop core; caching it makes
every later run start instantly and lets the pipeline serve documents as array slices.
The cache key combines the corpus fingerprint (Python version + file list) and the
tokenizer's hash, so a different interpreter or tokenizer never reads stale tokens.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from nemojax.data.corpus import builtin_documents, corpus_fingerprint
from nemojax.data.sources import TokenArraySource, cache_dir
from nemojax.data.tokenizer import Tokenizer

_memo: dict[tuple[str, str], TokenArraySource] = {}


def builtin_tokens(name: str, tokenizer: Tokenizer, *, verbose: bool = True) -> TokenArraySource:
    """The built-in source `name` tokenized (without eos), from cache or built now."""
    key = (name, tokenizer.fingerprint)
    if key in _memo:
        return _memo[key]
    d = cache_dir() / "corpus" / f"{name}-{corpus_fingerprint(name)}-{tokenizer.fingerprint}"
    tok_file, off_file = d / "tokens.npy", d / "offsets.npy"
    if tok_file.exists() and off_file.exists():
        src = TokenArraySource(np.load(tok_file, mmap_mode="r"), np.load(off_file))
    else:
        t0 = time.perf_counter()
        if verbose:
            print(f"nemojax: tokenizing builtin:{name} (first use with this tokenizer; cached afterwards)",
                  file=sys.stderr, flush=True)
        docs = list(builtin_documents(name))
        ids = tokenizer.encode_batch(docs)
        dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
        tokens = np.fromiter((t for doc in ids for t in doc), dtype=dtype, count=sum(map(len, ids)))
        offsets = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
        _atomic_save(tok_file, tokens)
        _atomic_save(off_file, offsets)
        if verbose:
            print(f"nemojax: tokenized builtin:{name} ({len(docs)} documents, {len(tokens):,} tokens) in "
                  f"{time.perf_counter() - t0:.1f}s; cached at {d}", file=sys.stderr)
        src = TokenArraySource(tokens, offsets)
    _memo[key] = src
    return src


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write then rename, so concurrent processes never read a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
