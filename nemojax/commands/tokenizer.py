"""`nemojax tokenizer`: train a SentencePiece tokenizer, or measure one on a corpus.

    nemojax tokenizer train --input docs/*.txt data.jsonl --vocab-size 4096 --out DIR
    nemojax tokenizer train --builtin-corpus --vocab-size 4096 --out DIR   # the shipped model
    nemojax tokenizer stats --tokenizer builtin                             # bits/token etc.
    nemojax tokenizer encode --input data.jsonl --out data.arrayrecord      # pre-tokenize
    nemojax tokenizer index --input data.jsonl --tokenizer builtin          # length index

Inputs: .txt/.md/.py/.rst files (one document each), JSONL (--text-field, default "text")
and Parquet files; globs and directories are expanded.

`encode` writes the ArrayRecord file and its length index (`OUT.lenidx`) beside it. `index`
writes the length index of JSONL / Parquet files (`FILE.<tokenizer fingerprint>.lenidx`, one
full tokenization) or of ArrayRecord files without one (`FILE.lenidx`, one full read) beside
each file, so the training processes of a multi-host run start without building it
(nemojax.data.length_index).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model (writes DIR/tokenizer.model)")
    t.add_argument("--input", nargs="*", default=[], metavar="FILE",
                   help="text, JSONL or Parquet files, directories or globs")
    t.add_argument("--builtin-corpus", action="store_true",
                   help="also train on the built-in corpus (all prose + every second code file, "
                        "which is how nemojax/assets/tokenizer.model was made)")
    t.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--verbose", action="store_true", help="show SentencePiece's own training log")
    s = sub.add_parser("stats", help="tokens, chars/token and unigram entropy of a corpus")
    s.add_argument("--tokenizer", default="builtin", help="'builtin' or a .model path")
    s.add_argument("--input", nargs="*", default=[], metavar="FILE",
                   help="files to measure (default: the built-in corpus sources)")
    s.add_argument("--text-field", default="text")
    e = sub.add_parser("encode", help="pre-tokenize text files into an ArrayRecord file (one record of "
                                      "int32 ids per document) for fast pretraining input")
    e.add_argument("--tokenizer", default="builtin", help="'builtin' or a .model path")
    e.add_argument("--input", nargs="+", required=True, metavar="FILE")
    e.add_argument("--text-field", default="text")
    e.add_argument("--out", required=True, metavar="FILE.arrayrecord")
    x = sub.add_parser("index", help="write the length index of pretraining files beside them (token count of "
                                     "every document), so multi-host runs plan rows without tokenizing")
    x.add_argument("--tokenizer", default="builtin", help="'builtin' or a .model path (the one training uses)")
    x.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL, Parquet or ArrayRecord files, "
                   "directories or globs")
    x.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    x.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet", "arrayrecord"))


def _log(msg: str) -> None:
    print(f"[tokenizer] {msg}", file=sys.stderr, flush=True)


def _training_texts(args: argparse.Namespace) -> Iterator[str]:
    from nemojax.data.sources import iter_texts

    n_docs = n_chars = 0
    last = time.perf_counter()

    def counted(docs: Iterator[str], what: str) -> Iterator[str]:
        nonlocal n_docs, n_chars, last
        for d in docs:
            n_docs += 1
            n_chars += len(d)
            if time.perf_counter() - last > 2.0:
                _log(f"reading {what}: {n_docs:,} documents, {n_chars / 1e6:.1f} M chars")
                last = time.perf_counter()
            yield d

    if args.builtin_corpus:
        from nemojax.data.corpus import builtin_documents

        yield from counted(builtin_documents("prose"), "builtin:prose")
        yield from counted((d for k, d in enumerate(builtin_documents("code")) if k % 2 == 0), "builtin:code")
    for pattern in args.input:
        yield from counted(iter_texts(pattern, text_field=args.text_field), pattern)
    _log(f"read {n_docs:,} documents, {n_chars / 1e6:.2f} M chars; training (this can take a minute)")


def _train(args: argparse.Namespace) -> int:
    from nemojax.data.tokenizer import Tokenizer, train_tokenizer

    if not args.input and not args.builtin_corpus:
        _log("nothing to train on: give --input FILE... and/or --builtin-corpus")
        return 2
    t0 = time.perf_counter()
    path = train_tokenizer(_training_texts(args), args.out, args.vocab_size, model_type=args.model_type,
                           verbose=args.verbose)
    tok = Tokenizer(path)
    sample = "<extra_id_1>User\ndef add(a, b):\n    return a + b\n"
    ids = tok.encode(sample)
    _log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, vocab {tok.vocab_size}) in "
         f"{time.perf_counter() - t0:.1f}s")
    _log(f"sample: {len(sample)} chars -> {len(ids)} tokens: {[tok.id_to_piece(i) for i in ids]}")
    print(json.dumps({"model": str(path), "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id}))
    return 0


def corpus_stats(tok_spec: str = "builtin", inputs: list[str] | None = None,
                 text_field: str = "text") -> dict[str, dict[str, float]]:
    """Per corpus: documents, tokens, chars per token, unigram entropy (bits and nats per token)."""
    import numpy as np

    from nemojax.data.tokenizer import load_tokenizer, unigram_entropy

    tok = load_tokenizer(tok_spec)
    out: dict[str, dict[str, float]] = {}
    if inputs:
        from nemojax.data.sources import iter_texts

        groups = {p: list(iter_texts(p, text_field=text_field)) for p in inputs}
        tokenized = {k: (sum(map(len, v)), tok.encode_batch(v)) for k, v in groups.items()}
        arrays = {k: (chars, np.concatenate([np.asarray(x, np.int64) for x in ids] or [np.zeros(0, np.int64)]),
                      len(ids)) for k, (chars, ids) in tokenized.items()}
    else:
        from nemojax.data.corpus import BUILTIN_SOURCES, builtin_documents
        from nemojax.data.token_cache import builtin_tokens

        arrays = {}
        for name in BUILTIN_SOURCES:
            src = builtin_tokens(name, tok)
            chars = sum(len(d) for d in builtin_documents(name))
            arrays[f"builtin:{name}"] = (chars, np.asarray(src.tokens, np.int64), len(src))
    for k, (chars, flat, ndocs) in arrays.items():
        bits = unigram_entropy(flat, tok.vocab_size)
        out[k] = {"documents": ndocs, "tokens": int(flat.size), "chars_per_token": chars / max(1, flat.size),
                  "unigram_entropy_bits": bits, "unigram_entropy_nats": bits * math.log(2)}
    return out


def _encode(args: argparse.Namespace) -> int:
    import itertools

    from nemojax.data.sources import iter_texts, write_array_record
    from nemojax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    texts = itertools.chain.from_iterable(iter_texts(p, text_field=args.text_field) for p in args.input)
    n_tokens = 0
    t0 = last = time.perf_counter()

    def encoded() -> Iterator[list[int]]:
        nonlocal n_tokens, last
        while block := list(itertools.islice(texts, 256)):
            for ids in tok.encode_batch(block):
                n_tokens += len(ids)
                yield ids
            if time.perf_counter() - last > 2.0:
                _log(f"encoded {n_tokens:,} tokens")
                last = time.perf_counter()

    n_docs = write_array_record(args.out, encoded())
    _log(f"wrote {n_docs:,} documents, {n_tokens:,} tokens to {args.out} (and its length index "
         f"{args.out}.lenidx) in {time.perf_counter() - t0:.1f}s")
    print(json.dumps({"out": args.out, "index": f"{args.out}.lenidx", "documents": n_docs, "tokens": n_tokens,
                      "tokenizer": tok.fingerprint}))
    return 0


def _index(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from nemojax.data.length_index import write_beside
    from nemojax.data.sources import expand_paths, infer_format
    from nemojax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    for pattern in args.input:
        for f in expand_paths(pattern, "--input"):
            fmt = infer_format(str(f)) if args.format == "auto" else args.format
            t0 = last = time.perf_counter()

            def progress(done: int, name: Path = f) -> None:
                nonlocal last
                if time.perf_counter() - last > 2.0:
                    _log(f"{name}: {done:,} documents measured")
                    last = time.perf_counter()

            out, index = write_beside(Path(f), fmt, args.text_field, tok, progress)
            seconds = time.perf_counter() - t0
            tokens = int(np.sum(index.lengths, dtype=np.int64))
            _log(f"{f}: {len(index.lengths):,} documents, {tokens:,} tokens in {seconds:.1f}s -> {out}")
            print(json.dumps({"file": str(f), "index": str(out), "documents": len(index.lengths), "tokens": tokens,
                              "format": fmt, "tokenizer": None if fmt == "arrayrecord" else tok.fingerprint,
                              "seconds": round(seconds, 3)}))
    return 0


def run(args: argparse.Namespace) -> int:
    from nemojax.data.sources import DataError
    from nemojax.data.tokenizer import TokenizerError

    try:
        if args.action == "train":
            return _train(args)
        if args.action == "encode":
            return _encode(args)
        if args.action == "index":
            return _index(args)
        print(json.dumps(corpus_stats(args.tokenizer, args.input, args.text_field), indent=2))
        return 0
    except (DataError, TokenizerError) as e:
        print(f"nemojax tokenizer: {e}", file=sys.stderr)
        return 2
